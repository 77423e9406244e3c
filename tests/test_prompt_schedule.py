"""Prompt editing during sampling: every sampler resolves a ScheduledConditioning at the step it computes.

A1111 resolves the conditioning at its denoiser's call counter (0-based) and switches texts when the
counter passes a schedule entry's end step (`step <= end_at_step` keeps the entry), so `[red:blue:0.5]`
over 10 steps is red at step indices 0..5 and blue at 6..9.
"""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.bundled import BUNDLED
from ldm.checkpoint import load_model_from_config
from ldm.models.diffusion.registry import make_sampler
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.prompts import PromptEncoder, ScheduledConditioning, encode_conditioning

RED, BLUE, GREEN, NEG_A, NEG_B = 1.0, 2.0, 3.0, -1.0, -2.0


def constant(value: float) -> torch.Tensor:
    return torch.full((77, 8), value)


class RecordingModel:
    """The sampler interface with the SD v1 schedule; records the conditioning of every model call."""

    def __init__(self):
        betas = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012), dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.num_timesteps = 1000
        self.betas = betas.float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]
        ).float()
        self.conds: list[torch.Tensor] = []

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.conds.append(cond.clone())
        return 0.1 * x

    def seen(self) -> list[list[float]]:
        """For each call, the value of each batch row of its conditioning (uncond rows first)."""
        return [c[:, 0, 0].tolist() for c in self.conds]


def red_then_blue() -> ScheduledConditioning:
    return ScheduledConditioning([[(5, constant(RED)), (10, constant(BLUE))]])


@pytest.mark.parametrize(("sampler", "calls_at_step_0"), [("ddim", 1), ("plms", 2), ("dpm", 1)])
def test_every_sampler_switches_after_the_edit_step(sampler, calls_at_step_0):
    model = RecordingModel()
    uncond = ScheduledConditioning([[(10, constant(NEG_A))]])
    steps_reported = []
    make_sampler(sampler, model).sample(
        10,
        1,
        (4, 8, 8),
        conditioning=red_then_blue(),
        unconditional_conditioning=uncond,
        unconditional_guidance_scale=7.0,
        x_T=torch.randn(1, 4, 8, 8),
        callback=steps_reported.append,
        verbose=False,
    )
    extra = calls_at_step_0 - 1  # PLMS evaluates the model twice in its first step
    assert model.seen() == [[NEG_A, RED]] * (6 + extra) + [[NEG_A, BLUE]] * 4
    assert steps_reported == list(range(10))


def test_scheduled_unconditioning_and_a_batch():
    model = RecordingModel()
    cond = ScheduledConditioning([[(5, constant(RED)), (10, constant(BLUE))], [(10, constant(GREEN))]])
    uncond = ScheduledConditioning([[(2, constant(NEG_A)), (10, constant(NEG_B))]] * 2)
    make_sampler("ddim", model).sample(
        10,
        2,
        (4, 8, 8),
        conditioning=cond,
        unconditional_conditioning=uncond,
        unconditional_guidance_scale=5.0,
        verbose=False,
    )
    seen = model.seen()
    assert seen[:3] == [[NEG_A, NEG_A, RED, GREEN]] * 3
    assert seen[3:6] == [[NEG_B, NEG_B, RED, GREEN]] * 3
    assert seen[6:] == [[NEG_B, NEG_B, BLUE, GREEN]] * 4


def test_without_guidance_and_with_a_plain_unconditioning():
    model = RecordingModel()
    make_sampler("ddim", model).sample(10, 1, (4, 8, 8), conditioning=red_then_blue(), verbose=False)
    assert model.seen() == [[RED]] * 6 + [[BLUE]] * 4
    model = RecordingModel()
    make_sampler("ddim", model).sample(
        10,
        1,
        (4, 8, 8),
        conditioning=red_then_blue(),
        unconditional_conditioning=constant(NEG_A)[None],
        unconditional_guidance_scale=3.0,
        verbose=False,
    )
    assert model.seen() == [[NEG_A, RED]] * 6 + [[NEG_A, BLUE]] * 4


def test_img2img_decode_counts_the_steps_it_runs():
    """As A1111's img2img: the counter starts at 0 for the steps actually run."""
    model = RecordingModel()
    sampler = make_sampler("ddim", model)
    sampler.make_schedule(10, verbose=False)
    sampler.decode(torch.randn(1, 4, 8, 8), red_then_blue(), 8, verbose=False)
    assert model.seen() == [[RED]] * 6 + [[BLUE]] * 2


def test_batch_size_is_checked():
    model = RecordingModel()
    with pytest.raises(ValueError, match="batch size 1 but batch_size is 2"):
        make_sampler("ddim", model).sample(10, 2, (4, 8, 8), conditioning=red_then_blue(), verbose=False)


def test_at_chooses_the_first_entry_not_yet_ended():
    cond = ScheduledConditioning([[(1, constant(RED)), (2, constant(BLUE)), (4, constant(GREEN))]])
    assert [cond.at(step)[0, 0, 0].item() for step in range(5)] == [RED, RED, BLUE, GREEN, GREEN]
    assert cond.shape == (1, 77, 8) and cond.batch_size == 1 and not cond.is_constant
    padded = cond.padded(154, torch.zeros(77, 8))
    assert padded.shape == (1, 154, 8) and torch.equal(padded.at(0)[0, 77:], torch.zeros(77, 8))
    assert padded.to(torch.float64).at(3).dtype == torch.float64
    with pytest.raises(ValueError, match="differ in shape"):
        ScheduledConditioning([[(1, torch.zeros(77, 8))], [(1, torch.zeros(154, 8))]])


def test_prompt_editing_end_to_end_on_the_bundled_model():
    """Encoded on the shapes model and sampled: the edited run is neither the first nor the second text's."""
    shapes = BUNDLED["shapes"]
    model = load_model_from_config(OmegaConf.load(shapes.config), shapes.ckpt, verbose=False)
    encoder = PromptEncoder(model.cond_stage_model)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(prompt: str) -> torch.Tensor:
        c, uc = encode_conditioning(encoder, [prompt], [""], steps=10)
        return make_sampler("ddim", model).sample(
            10,
            1,
            (4, 8, 8),
            conditioning=c,
            unconditional_conditioning=uc,
            unconditional_guidance_scale=3.0,
            x_T=x_T,
            verbose=False,
        )[0]

    edited = sample("a [red:blue:0.5] circle on a white background")
    red = sample("a red circle on a white background")
    blue = sample("a blue circle on a white background")
    assert not torch.allclose(edited, red) and not torch.allclose(edited, blue)
    with torch.no_grad():
        plain = make_sampler("ddim", model).sample(
            10,
            1,
            (4, 8, 8),
            conditioning=model.get_learned_conditioning(["a red circle on a white background"]),
            unconditional_conditioning=model.get_learned_conditioning([""]),
            unconditional_guidance_scale=3.0,
            x_T=x_T,
            verbose=False,
        )[0]
    assert torch.equal(red, plain)  # a plain prompt through the prompt layer is the original's run

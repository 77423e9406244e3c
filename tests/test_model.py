"""LatentDiffusion as a whole: the SD v1 state_dict layout, the schedule, and the latent round trip."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "tests" / "data" / "sd-v1-state-dict-manifest.json").read_text())


@pytest.fixture(scope="module")
def sd_v1_on_meta():
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def test_v1_state_dict_matches_the_released_checkpoints(sd_v1_on_meta):
    state_dict = sd_v1_on_meta.state_dict()
    expected = {
        entry["key"]: entry["shape"]
        for entry in MANIFEST["keys"]
        if entry.get("present_in_instantiated_state_dict", True)
    }
    assert len(state_dict) == MANIFEST["num_keys_in_instantiated_state_dict"] == len(expected)
    assert sorted(state_dict) == sorted(expected)
    wrong_shapes = {
        k: (list(v.shape), expected[k]) for k, v in state_dict.items() if list(v.shape) != expected[k]
    }
    assert wrong_shapes == {}
    n_params = sum(p.numel() for p in sd_v1_on_meta.parameters())
    assert n_params == MANIFEST["total_parameter_elements"]


def test_v1_schedule_buffers_are_real_even_on_meta(sd_v1_on_meta):
    model = sd_v1_on_meta
    assert model.alphas_cumprod.device.type == "cpu"
    assert model.lvlb_weights.device.type == "cpu"
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    torch.testing.assert_close(model.alphas_cumprod, torch.tensor(alphas_cumprod, dtype=torch.float32))
    assert model.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    torch.testing.assert_close(
        model.sqrt_recipm1_alphas_cumprod, torch.tensor(np.sqrt(1 / alphas_cumprod - 1), dtype=torch.float32)
    )
    assert model.scale_factor == 0.18215
    assert model.num_timesteps == 1000 and model.parameterization == "eps"


def test_q_sample_and_eps_inversion(tiny_ldm: LatentDiffusion):
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 900])
    xt = tiny_ldm.q_sample(x0, t, noise)
    a = tiny_ldm.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(tiny_ldm.predict_start_from_noise(xt, t, noise), x0, atol=1e-4, rtol=1e-4)


def test_first_stage_scaling_and_conditioning(tiny_ldm: LatentDiffusion):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    posterior = tiny_ldm.encode_first_stage(image)
    z = tiny_ldm.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(0))
    z_again = tiny_ldm.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)
    torch.testing.assert_close(z, z_again)
    torch.testing.assert_close(
        tiny_ldm.get_first_stage_encoding(posterior.mode()), 0.18215 * posterior.mode()
    )
    decoded = tiny_ldm.decode_first_stage(z)
    torch.testing.assert_close(decoded, tiny_ldm.first_stage_model.decode(z / 0.18215))
    c = tiny_ldm.get_learned_conditioning(["a photo of a cat", ""])
    assert c.shape == (2, 77, 32)
    eps = tiny_ldm.apply_model(z.repeat(2, 1, 1, 1), torch.tensor([1, 999]), c)
    assert eps.shape == (2, 4, 8, 8)
    torch.testing.assert_close(
        eps, tiny_ldm.model.diffusion_model(z.repeat(2, 1, 1, 1), torch.tensor([1, 999]), c)
    )


def test_frozen_stages_stay_in_eval_and_without_grad(tiny_ldm: LatentDiffusion):
    tiny_ldm.train()
    assert tiny_ldm.model.training
    assert not tiny_ldm.first_stage_model.training and not tiny_ldm.cond_stage_model.training
    assert not any(p.requires_grad for p in tiny_ldm.first_stage_model.parameters())
    assert not any(p.requires_grad for p in tiny_ldm.cond_stage_model.parameters())


def test_loss_is_the_noise_prediction_mse(tiny_ldm: LatentDiffusion):
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 500])
    c = tiny_ldm.get_learned_conditioning(["a", "b"])
    loss, logs = tiny_ldm.p_losses(x0, c, t, noise=noise)
    eps = tiny_ldm.apply_model(tiny_ldm.q_sample(x0, t, noise), t, c)
    expected = ((eps - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["val/loss_simple"], expected)


@pytest.mark.parametrize("key", ["concat", "hybrid", "adm"])
def test_conditioning_keys_route_into_the_unet(key):
    from ldm.models.diffusion.ddpm import DiffusionWrapper

    class Recorder(torch.nn.Module):
        def forward(self, x, t, context=None, y=None):
            self.seen = (x, context, y)
            return x

    wrapper = DiffusionWrapper({"target": "torch.nn.Identity"}, key)
    wrapper.diffusion_model = Recorder()
    x, extra, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(1, 77, 16)
    if key == "adm":
        wrapper(x, torch.tensor([1]), c_crossattn=[ctx])
        assert wrapper.diffusion_model.seen[2] is ctx
    else:
        wrapper(x, torch.tensor([1]), c_concat=[extra], c_crossattn=[ctx])
        assert wrapper.diffusion_model.seen[0].shape == (1, 9, 8, 8)
        context = wrapper.diffusion_model.seen[1]
        assert torch.equal(context, ctx) if key == "hybrid" else context is None

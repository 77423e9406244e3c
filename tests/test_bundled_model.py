"""The bundled "shapes" text-to-image model: its files load, and it draws what short prompts ask for."""

import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, randomize_
from omegaconf import OmegaConf
from PIL import Image

from ldm.bundled import BUNDLED, bundled_model, export_bundled, resolve_model
from ldm.checkpoint import load_model_from_config, read_state_dict, save_checkpoint
from ldm.data.shape_analysis import analyze_shape_image, caption_attributes
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config

SHAPES = BUNDLED["shapes"]
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a black background",
    "a green square on a white background",
]


@pytest.fixture(scope="module")
def model():
    config = OmegaConf.load(SHAPES.config)
    return load_model_from_config(config, SHAPES.ckpt, verbose=False)


def test_registry_resolves_names_and_paths(tmp_path):
    assert bundled_model("Shapes") is SHAPES
    assert bundled_model("no-such-model") is None
    assert resolve_model("shapes") == (str(SHAPES.config), str(SHAPES.ckpt))
    assert resolve_model("shapes", "my.yaml") == ("my.yaml", str(SHAPES.ckpt))
    ckpt = tmp_path / "shapes"  # an existing file wins over the bundled name
    ckpt.write_bytes(b"")
    assert resolve_model(str(ckpt), "c.yaml") == ("c.yaml", str(ckpt))
    with pytest.raises(ValueError, match="needs a config"):
        resolve_model(str(ckpt))


def test_bundled_files_are_self_contained():
    config = OmegaConf.load(SHAPES.config)
    params = config.model.params
    assert "ckpt_path" not in params.first_stage_config.params
    assert not params.get("use_ema", True)
    state_dict, _ = read_state_dict(SHAPES.ckpt)
    networks = {key.split(".")[0] for key in state_dict if "." in key}
    assert networks == {"model", "first_stage_model", "cond_stage_model"}  # no model_ema, no loss
    assert state_dict["alphas_cumprod"].dtype == torch.float32
    assert "scale_factor" not in state_dict
    size = SHAPES.ckpt.stat().st_size + sum(
        p.stat().st_size for p in (SHAPES.ckpt.parents[2] / "first_stage_models").rglob("*") if p.is_file()
    )
    assert size <= 25 * 2**20


def test_checkpoint_loads_every_weight(model):
    state_dict, _ = read_state_dict(SHAPES.ckpt)
    own = model.state_dict()
    assert set(state_dict) == {k for k in own if not k.endswith("position_ids")}
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(own[key], state_dict[key].float())
    assert model.scale_factor == pytest.approx(float(OmegaConf.load(SHAPES.config).model.params.scale_factor))


@pytest.mark.parametrize("sampler_cls", [PLMSSampler, DDIMSampler])
@torch.no_grad()
def test_short_generation_draws_the_prompt(model, sampler_cls):
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(len(PROMPTS), 4, 8, 8, generator=generator)
    c = model.get_learned_conditioning(PROMPTS)
    uc = model.get_learned_conditioning(len(PROMPTS) * [""])
    samples, _ = sampler_cls(model).sample(
        S=20,
        batch_size=len(PROMPTS),
        shape=(4, 8, 8),
        conditioning=c,
        unconditional_guidance_scale=SHAPES.scale,
        unconditional_conditioning=uc,
        eta=0.0,
        x_T=x_T,
        verbose=False,
    )
    images = model.decode_first_stage(samples)
    assert images.shape == (len(PROMPTS), 3, 64, 64)
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for prompt, image in zip(PROMPTS, images, strict=True):
        want, got = caption_attributes(prompt), analyze_shape_image(image)
        assert (got["color"], got["background"]) == (want["color"], want["background"]), prompt


def test_export_takes_ema_weights_and_a_fine_tuned_decoder(tiny_config, tmp_path):
    training = OmegaConf.merge(tiny_config, {"model": {"params": {"use_ema": True, "scale_by_std": True}}})
    torch.manual_seed(0)
    run = randomize_(instantiate_from_config(training.model))
    run.model_ema.copy_to(randomize_(run.model, seed=1))  # EMA weights != the live UNet's
    randomize_(run.model, seed=2)
    run.scale_factor.fill_(0.4321)
    autoencoder = randomize_(instantiate_from_config(training.model.params.first_stage_config), seed=3)
    training.model.params.first_stage_config.params.ckpt_path = "logs/ae/last.ckpt"
    training.model.params.first_stage_config.params.train_decoder_only = True
    OmegaConf.save(training, tmp_path / "project.yaml")
    save_checkpoint(tmp_path / "last.ckpt", run.state_dict(), global_step=7)
    save_checkpoint(tmp_path / "ae.ckpt", {**autoencoder.state_dict(), "loss.logvar": torch.zeros(())})

    export_bundled(
        tmp_path / "project.yaml",
        tmp_path / "last.ckpt",
        tmp_path / "out",
        torch.float32,
        tmp_path / "ae.ckpt",
    )

    config = OmegaConf.load(tmp_path / "out" / "config.yaml")
    params = config.model.params
    assert params.scale_factor == pytest.approx(0.4321) and not params.scale_by_std and not params.use_ema
    assert {"ckpt_path", "train_decoder_only"}.isdisjoint(params.first_stage_config.params)
    model = load_model_from_config(config, tmp_path / "out" / "model.safetensors", verbose=False)
    ema = dict(run.model_ema.named_buffers())
    for name, param in model.model.named_parameters():
        torch.testing.assert_close(param, ema[name.replace(".", "")], rtol=0, atol=0)
    for name, param in model.first_stage_model.state_dict().items():
        torch.testing.assert_close(param, autoencoder.state_dict()[name], rtol=0, atol=0)
    torch.testing.assert_close(
        model.cond_stage_model.state_dict(), run.cond_stage_model.state_dict(), rtol=0, atol=0
    )


def test_readme_first_command_draws_its_prompt(tmp_path):
    """README's install-and-run line: its txt2img part, run as a user would (outputs redirected to tmp_path)."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    command = shlex.split(line.split("&&")[-1])
    assert command[:2] == ["python", "scripts/txt2img.py"] and "shapes" in command
    result = subprocess.run(
        [sys.executable, *command[1:], "--outdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    prompt = command[command.index("--prompt") + 1]
    images = sorted((tmp_path / "samples").glob("*.png"))
    assert (
        len(images) == 6 and len(list(tmp_path.glob("grid-*.png"))) == 1
    )  # defaults: 3 samples x 2 iterations
    want = caption_attributes(prompt)
    for path in images:
        got = analyze_shape_image(np.asarray(Image.open(path).convert("RGB")))
        assert (got["color"], got["background"]) == (want["color"], want["background"]), path.name

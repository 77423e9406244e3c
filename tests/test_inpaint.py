"""scripts/inpaint.py on the tiny model (masked sampling) and a tiny 9-channel inpainting model."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import load_model_from_config, save_checkpoint
from ldm.latents import encode_image, inpainting_concat, is_inpainting_model, latent_keep_mask, masked_image
from ldm.outputs import read_parameters

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inpaint.py"
INPAINT_CONFIG = "tests/configs/tiny-inpaint.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
import inpaint  # noqa: E402


def make_ckpt(directory: Path, config) -> Path:
    from conftest import randomize_

    from ldm.util import instantiate_from_config

    model = randomize_(instantiate_from_config(config.model), std=0.1)
    path = directory / "tiny.ckpt"
    save_checkpoint(path, model.state_dict(), global_step=0)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_config):
    return make_ckpt(tmp_path_factory.mktemp("model"), tiny_config)


@pytest.fixture(scope="module")
def inpaint_config():
    return OmegaConf.load(ROOT / INPAINT_CONFIG)


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory, inpaint_config):
    return make_ckpt(tmp_path_factory.mktemp("inpaint-model"), inpaint_config)


def make_inputs(directory: Path, width: int, height: int) -> tuple[Path, Path, np.ndarray]:
    """A noise image and a mask with a white rectangle (repaint) in its middle; the mask as a bool array."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(directory / "in.png")
    repaint = np.zeros((height, width), dtype=bool)
    repaint[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = True
    Image.fromarray(repaint.astype(np.uint8) * 255).save(directory / "mask.png")
    return directory / "in.png", directory / "mask.png", repaint


def run(ckpt, config, outdir, init_img, mask, *extra):
    argv = [
        "--config", config, "--ckpt", str(ckpt), "--outdir", str(outdir), "--init-img", str(init_img),
        "--mask", str(mask), "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
        "--no-safety-checker", "--prompt", "a red circle", *extra,
    ]  # fmt: skip
    inpaint.main(argv)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def check_result(path: Path, init_img: Path, repaint: np.ndarray) -> None:
    result, original = pixels(path), pixels(init_img)
    assert result.shape == original.shape
    assert np.array_equal(result[~repaint], original[~repaint])  # kept pixels: exactly the input's
    assert np.abs(result[repaint] - original[repaint]).mean() > 10  # repainted pixels: new


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_masked_sampling_keeps_unmasked_pixels(tiny_ckpt, tmp_path, sampler):
    init_img, mask, repaint = make_inputs(tmp_path, 100, 70)  # not multiples of 16: resized and back
    run(
        tiny_ckpt,
        "tests/configs/tiny-ldm.yaml",
        tmp_path / "out",
        init_img,
        mask,
        "--sampler",
        sampler,
        "--n_samples",
        "2",
    )
    for path in sorted((tmp_path / "out" / "samples").glob("*.png")):
        check_result(path, init_img, repaint)
    params = read_parameters(tmp_path / "out" / "samples" / "00001.png")
    assert params["inpainting"] == "masked sampling" and params["mask"] == str(mask.resolve())
    # the blend noise is drawn for the whole batch, so the re-make command re-makes the batch
    assert params["batch_index"] == 1 and "--seed 42 --n_samples 2" in params["remake"]


def test_inpainting_model_path(inpaint_ckpt, tmp_path):
    init_img, mask, repaint = make_inputs(tmp_path, 96, 64)
    run(inpaint_ckpt, INPAINT_CONFIG, tmp_path / "a", init_img, mask, "--sampler", "dpm", "--seed", "3")
    run(inpaint_ckpt, INPAINT_CONFIG, tmp_path / "b", init_img, mask, "--sampler", "dpm", "--seed", "3")
    first = tmp_path / "a" / "samples" / "00000.png"
    check_result(first, init_img, repaint)
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "samples" / "00000.png"))
    params = read_parameters(first)
    assert params["inpainting"] == "model" and "batch_index" not in params


def test_inpainting_inputs(tiny_config, inpaint_config, inpaint_ckpt, tiny_ckpt):
    model = load_model_from_config(inpaint_config, inpaint_ckpt, verbose=False)
    assert is_inpainting_model(model)
    assert not is_inpainting_model(load_model_from_config(tiny_config, tiny_ckpt, verbose=False))
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    repaint = torch.zeros(1, 1, 32, 48)
    repaint[..., 8:24, 16:40] = 1.0
    masked = masked_image(image, repaint)
    assert masked[..., 8:24, 16:40].abs().max() == 0 and torch.equal(masked[..., :8, :], image[..., :8, :])
    with torch.no_grad():
        posterior = model.encode_first_stage(masked)
        c_concat = inpainting_concat(
            model, posterior, repaint, [torch.Generator().manual_seed(s) for s in (1, 2)]
        )
        latent = encode_image(model, posterior, [torch.Generator().manual_seed(2)])
    assert c_concat.shape == (2, 5, 4, 6)
    expected_mask = torch.zeros(4, 6)
    expected_mask[1:3, 2:5] = 1.0  # nearest: the mask at each latent cell's top-left pixel
    assert torch.equal(c_concat[0, 0], expected_mask) and torch.equal(c_concat[1, 0], expected_mask)
    assert torch.equal(c_concat[1:, 1:], latent) and not torch.equal(c_concat[0, 1:], c_concat[1, 1:])
    keep = latent_keep_mask(repaint, (4, 6))
    assert keep.shape == (1, 1, 4, 6) and torch.equal(keep[0, 0], 1.0 - expected_mask)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init-img", "{img}", "--mask", "no/such/mask.png"], "--mask no/such/mask.png: no such file"),
        (
            ["--init-img", "{img}", "--mask", "{small}"],
            "is 32x32 but the image is 96x64: make the mask the same size",
        ),
        (["--init-img", "{img}"], "inpainting needs an image and a mask: pass --init-img IMAGE --mask MASK"),
        (
            ["--init-img", "{img}", "--mask", "{mask}", "--sampler", "dpm"],
            "the dpm sampler cannot do masked sampling",
        ),
        (
            ["--init-img", "{img}", "--mask", "{mask}", "--max-pixels", "1000"],
            "96x64 = 6144 pixels, more than --max-pixels 1000",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tiny_ckpt, tmp_path, args, message):
    init_img, mask, _ = make_inputs(tmp_path, 96, 64)
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    args = [arg.format(img=init_img, mask=mask, small=tmp_path / "small.png") for arg in args]
    base = [
        "--config",
        "tests/configs/tiny-ldm.yaml",
        "--ckpt",
        str(tiny_ckpt),
        "--outdir",
        str(tmp_path / "out"),
    ]
    result = cli(*base, *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_inpainting_checkpoint_with_an_ordinary_config_names_the_config_to_use(inpaint_ckpt, tmp_path):
    """Recognised from the checkpoint's UNet input shape (9 channels) against the config's (4), before loading."""
    init_img, mask, _ = make_inputs(tmp_path, 64, 64)
    args = ["--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(inpaint_ckpt), "--init-img", str(init_img),
            "--mask", str(mask), "--outdir", str(tmp_path / "out"), "--device", "cpu", "--no-safety-checker"]  # fmt: skip
    result = cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    expected = "this is an inpainting checkpoint (UNet input 9 channels, the config's 4): pass --config "
    assert expected + "configs/stable-diffusion/v1-inpainting-inference.yaml" in result.stderr

"""scripts/img2img.py end to end on the tiny model, and the image loading it relies on."""

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import load_model_from_config, save_checkpoint
from ldm.errors import UserError
from ldm.image_input import fit_size, image_to_tensor, load_image, load_mask
from ldm.outputs import read_parameters, to_pil

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "img2img.py"
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import txt2img  # noqa: E402

ORIGINAL_FLAGS = [
    "--prompt", "--init-img", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms", "--fixed_code",
    "--ddim_eta", "--n_iter", "--C", "--f", "--n_samples", "--n_rows", "--scale", "--strength", "--from-file",
    "--config", "--ckpt", "--seed", "--precision",
]  # fmt: skip
NEW_FLAGS = ["--negative-prompt", "--device", "--sampler", "--max-pixels"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_config):
    from conftest import randomize_

    from ldm.util import instantiate_from_config

    model = randomize_(instantiate_from_config(tiny_config.model), std=0.1)
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(path, model.state_dict(), global_step=0)
    return path


def noise_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def run(tiny_ckpt, outdir, init_img, *extra):
    argv = [
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(tiny_ckpt), "--outdir", str(outdir),
        "--init-img", str(init_img), "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
        "--no-safety-checker", "--prompt", "a red circle", *extra,
    ]  # fmt: skip
    img2img.main(argv)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("size", [(480, 360), (333, 517)])
def test_output_has_the_input_size(tiny_ckpt, tmp_path, size):
    init = noise_image(tmp_path / "in.png", *size)
    assert fit_size(*size, 16) in ((480, 368), (336, 512))  # the model runs at multiples of 16
    run(tiny_ckpt, tmp_path / "out", init, "--strength", "0.5", "--n_samples", "2")
    written = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(written) == 2
    assert all(Image.open(p).size == size for p in written)
    with Image.open(tmp_path / "out" / "grid-0000.png") as grid:
        assert grid.size == (2 * (size[0] + 2) + 2, size[1] + 4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_strength_zero_is_the_models_own_reconstruction(tiny_ckpt, tiny_config, tmp_path, sampler):
    init = noise_image(tmp_path / "in.png", 64, 48)
    # the reference below is fp32 (--precision auto is bf16 on CPUs with bf16 units)
    argv = ("--strength", "0", "--seed", "7", "--sampler", sampler, "--precision", "full")
    run(tiny_ckpt, tmp_path / "out", init, *argv)
    result = pixels(tmp_path / "out" / "samples" / "00000.png")

    model = load_model_from_config(tiny_config, tiny_ckpt, verbose=False)
    generator = torch.Generator().manual_seed(7)
    torch.randn((4, 6, 8), generator=generator)  # the seed's first draw is the noise, unused at strength 0
    with torch.no_grad():
        posterior = model.encode_first_stage(image_to_tensor(Image.open(init)))
        z = model.get_first_stage_encoding(posterior, generator=generator)
        reference = np.asarray(to_pil(model.decode_first_stage(z))[0]).astype(np.int16)
    assert result.shape == reference.shape == (48, 64, 3)
    assert np.abs(result - reference).max() <= 1
    assert np.abs(result - pixels(init)).mean() > 10  # a random autoencoder does not return its input


def test_strength_one_is_txt2img_from_the_same_seed(tiny_ckpt, tmp_path):
    run(
        tiny_ckpt,
        tmp_path / "i2i",
        noise_image(tmp_path / "in.png", 64, 64),
        "--strength",
        "1",
        "--seed",
        "3",
    )
    txt2img.main([
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "t2i"),
        "--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
        "--no-safety-checker", "--prompt", "a red circle", "--seed", "3", "--scale", "5.0",
    ])  # fmt: skip
    both = [pixels(tmp_path / d / "samples" / "00000.png") for d in ("i2i", "t2i")]
    assert np.array_equal(*both)


def test_fixed_seed_reproducible_and_metadata(tiny_ckpt, tmp_path):
    init = noise_image(tmp_path / "in.png", 80, 64)
    run(tiny_ckpt, tmp_path / "a", init, "--seed", "5", "--n_samples", "2")
    run(tiny_ckpt, tmp_path / "b", init, "--seed", "5", "--n_samples", "2")
    run(tiny_ckpt, tmp_path / "c", init, "--seed", "6")
    first, second = (tmp_path / "a" / "samples" / f"0000{i}.png" for i in range(2))
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "samples" / "00000.png"))
    assert np.array_equal(pixels(second), pixels(tmp_path / "b" / "samples" / "00001.png"))
    assert not np.array_equal(pixels(first), pixels(second))
    # image k has seed + k: alone it is the same image, up to float differences between batch sizes
    assert np.abs(pixels(second) - pixels(tmp_path / "c" / "samples" / "00000.png")).max() <= 1
    params = read_parameters(second)
    assert params["seed"] == 6 and params["strength"] == 0.75 and params["init_img"] == str(init.resolve())
    assert params["steps"] == 4 and params["scale"] == 5.0 and (params["width"], params["height"]) == (80, 64)
    assert "--seed 6 --n_samples 1" in params["remake"] and "--strength 0.75" in params["remake"]
    remake = shlex.split(params["remake"])
    assert remake[:2] == ["python", "scripts/img2img.py"]
    img2img.main([*remake[2:], "--outdir", str(tmp_path / "d"), "--device", "cpu", "--no-safety-checker"])
    assert np.abs(pixels(second) - pixels(tmp_path / "d" / "samples" / "00000.png")).max() <= 1


@pytest.mark.parametrize("sampler_flag", [["--plms"], ["--sampler", "dpm"]])
def test_plms_and_dpm_start_mid_schedule(tiny_ckpt, tmp_path, sampler_flag):
    init = noise_image(tmp_path / "in.png", 64, 64)
    run(tiny_ckpt, tmp_path / "ddim", init, "--strength", "0.5")
    run(tiny_ckpt, tmp_path / "other", init, "--strength", "0.5", *sampler_flag)
    run(tiny_ckpt, tmp_path / "other_zero", init, "--strength", "0", *sampler_flag)
    run(tiny_ckpt, tmp_path / "ddim_zero", init, "--strength", "0")
    ddim, other, other_zero, ddim_zero = (
        pixels(tmp_path / d / "samples" / "00000.png") for d in ("ddim", "other", "other_zero", "ddim_zero")
    )
    assert np.array_equal(other_zero, ddim_zero)  # no steps: only the autoencoder
    assert np.abs(other - other_zero).max() > 0 and np.abs(other - ddim).max() > 0
    assert read_parameters(tmp_path / "other" / "samples" / "00000.png")["sampler"] in ("plms", "dpm")


def test_help_lists_every_original_flag():
    result = cli("--help")
    assert result.returncode == 0
    assert [flag for flag in ORIGINAL_FLAGS + NEW_FLAGS if flag not in result.stdout] == []


def test_image_conversions(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 128)  # half-transparent red over white
    rgba[1, 1] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = np.asarray(load_image(str(tmp_path / "rgba.png")))
    assert tuple(loaded[0, 0]) == (255, 127, 127) and tuple(loaded[1, 1]) == (0, 0, 255)
    assert tuple(loaded[2, 2]) == (255, 255, 255)  # transparent -> white

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.asarray(load_image(str(tmp_path / "gray16.png")))[0, 0].tolist() == [128, 128, 128]

    palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, "L").convert("P")
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(
        np.asarray(load_image(str(tmp_path / "palette.png"))), np.asarray(palette.convert("RGB"))
    )

    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8), "L").save(tmp_path / "gray.jpg")
    assert load_image(str(tmp_path / "gray.jpg")).mode == "RGB"

    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2] = (255, 255, 255, 255)  # white strokes on a transparent layer
    Image.fromarray(mask, "RGBA").save(tmp_path / "mask.png")
    loaded_mask = np.asarray(load_mask(str(tmp_path / "mask.png"), (4, 4)))
    assert loaded_mask[:2].min() == 255 and loaded_mask[2:].max() == 0

    with pytest.raises(UserError, match="more than --max-pixels 15"):
        load_image(str(tmp_path / "gray.jpg"), max_pixels=15)


@pytest.mark.parametrize(
    "make_input, args, message",
    [
        (None, ["--init-img", "no/such/image.png"], "--init-img no/such/image.png: no such file"),
        ("text", [], "is not a readable image"),
        ("small", ["--strength", "1.5"], "--strength must be between 0.0 and 1.0, got 1.5"),
        ("small", ["--strength", "-0.1"], "--strength must be between 0.0 and 1.0, got -0.1"),
        ("huge", [], "more than --max-pixels 4194304: downscale it, or pass --max-pixels 4305000"),
        ("small", ["--max-pixels", "100"], "is 64x64 = 4096 pixels, more than --max-pixels 100"),
        ("small", ["--plms", "--ddim_eta", "0.5"], "--ddim_eta 0.5 needs a sampler that takes eta"),
        ("small", ["--C", "3"], "--C 3 does not match the model's 4 latent channels"),
        (None, [], "no input image: pass --init-img"),
        ("small", ["--config", "tests/configs/tiny-inpaint.yaml"], "conditioned on an image too"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_ckpt, tmp_path, make_input, args, message):
    extra = []
    if make_input == "text":
        (tmp_path / "notes.png").write_text("not an image")
        extra = ["--init-img", str(tmp_path / "notes.png")]
    elif make_input == "small":
        extra = ["--init-img", str(noise_image(tmp_path / "in.png", 64, 64))]
    elif make_input == "huge":
        Image.new("RGB", (2100, 2050)).save(tmp_path / "huge.png")
        extra = ["--init-img", str(tmp_path / "huge.png")]
    base = [
        "--config",
        "tests/configs/tiny-ldm.yaml",
        "--ckpt",
        str(tiny_ckpt),
        "--outdir",
        str(tmp_path / "out"),
    ]
    result = cli(*base, *extra, *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert not (tmp_path / "out").exists()

"""Bigger pictures on the bundled shapes model (trained at 64x64): txt2img's hires fix, img2img's upscaling and
outpainting, judged by the model's own analysis (ldm.data.shape_analysis), their metadata and re-make commands,
and the options' checks."""

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.shape_analysis import analyze_shape_image
from ldm.errors import UserError
from ldm.hires import Hires, decide_vae_tiling, hires_options, parse_outpaint
from ldm.infotext import parse_infotext, read_png_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import inpaint  # noqa: E402
import txt2img  # noqa: E402

PROMPT = "a red circle on a white background"
WANT = {"background": "white", "color": "red", "shape": "circle"}
COMMON = ["--ckpt", "shapes", "--ddim_steps", "12", "--n_iter", "1", "--device", "cpu", "--no-safety-checker",
          "--skip_grid", "--threads", "1"]  # fmt: skip


def run(script, outdir: Path, *extra: str) -> list[Path]:
    script.main([*COMMON, "--outdir", str(outdir), *extra])
    return sorted((outdir / "samples").glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def downscaled(path: Path) -> np.ndarray:
    """The image at the model's 64x64 (box filter: each pixel the mean of the block it covers)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BOX))


@pytest.fixture(scope="module")
def first_pass(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("first")
    return run(txt2img, out, "--prompt", PROMPT, "--n_samples", "2", "--seed", "5")


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_refines_the_first_pass_at_twice_the_size(first_pass, tmp_path, upscaler):
    """128x128 images that, brought back to 64x64, stay close to the first pass and show what the prompt asks."""
    hires = run(txt2img, tmp_path, "--prompt", PROMPT, "--n_samples", "2", "--seed", "5", "--hr-scale", "2",
                "--hr-upscaler", upscaler, "--hr-steps", "8")  # fmt: skip
    assert len(hires) == 2
    for k, (first, big) in enumerate(zip(first_pass, hires, strict=True)):
        assert Image.open(big).size == (128, 128)
        assert analyze_shape_image(pixels(first)) == WANT  # the seed draws the prompt at 64x64
        small = downscaled(big).astype(np.float32)
        difference = np.abs(small - pixels(first)).mean()
        to_the_other = np.abs(small - pixels(first_pass[1 - k])).mean()
        # measured (mean absolute difference, 8-bit levels): 11.4 and 14.1 (latent), 11.7 and 12.0 (lanczos);
        # to the batch's other first-pass image 50 to 56; between two seeds' first passes 20 to 51
        assert difference < 16, difference
        assert difference < to_the_other / 3, (difference, to_the_other)
        assert analyze_shape_image(small.astype(np.uint8)) == WANT


def test_hires_metadata_and_remake(tmp_path):
    """The PNG carries A1111's hires fields, and its re-make command makes the same pixels."""
    (image,) = run(txt2img, tmp_path / "a", "--prompt", PROMPT, "--n_samples", "1", "--seed", "7",
                   "--hr-scale", "2", "--hr-steps", "6", "--hr-strength", "0.6", "--sampler", "Euler a")  # fmt: skip
    record = read_png_parameters(image)
    info = parse_infotext(Image.open(image).text["parameters"])
    assert info["Size"] == "64x64" and info["Steps"] == "12" and info["Sampler"] == "Euler a"
    assert info["Hires upscale"] == "2.0" and info["Hires upscaler"] == "Latent"
    assert info["Hires steps"] == "6" and info["Denoising strength"] == "0.6"
    assert (record["hr_width"], record["hr_height"]) == (128, 128)
    words = shlex.split(record["remake"])
    assert words[1] == "scripts/txt2img.py" and "--hr-scale" in words
    again = tmp_path / "b"
    # the run's thread count too (not an image flag): on a Zen 1 CPU torch's fp32 1x1 convolutions of a batch
    # round differently with 1 and 2 threads (one level in ~0.01% of the pixels)
    txt2img.main(
        [*words[2:], "--outdir", str(again), "--device", "cpu", "--no-safety-checker", "--threads", "1"]
    )
    (remade,) = sorted((again / "samples").glob("*.png"))
    assert np.array_equal(pixels(remade), pixels(image))


def test_hires_images_do_not_depend_on_their_batch(tmp_path):
    """The first pass's seed rules hold in the second pass: image 2 of a batch is seed + 1's image alone."""
    hires = ["--prompt", PROMPT, "--hr-scale", "2", "--hr-steps", "4", "--sampler", "DPM++ 2M",
             "--hr-sampler", "Euler a"]  # fmt: skip
    batch = run(txt2img, tmp_path / "batch", *hires, "--n_samples", "2", "--seed", "20")
    alone = run(txt2img, tmp_path / "alone", *hires, "--n_samples", "1", "--seed", "21")
    assert np.abs(pixels(batch[1]).astype(int) - pixels(alone[0])).max() <= 1
    assert parse_infotext(Image.open(alone[0]).text["parameters"])["Hires sampler"] == "Euler a"


def test_img2img_scale_by_upscales_then_refines(first_pass, tmp_path):
    (result,) = run(img2img, tmp_path, "--prompt", PROMPT, "--init-img", str(first_pass[0]), "--n_samples", "1",
                    "--scale-by", "2", "--strength", "0.5")  # fmt: skip
    assert Image.open(result).size == (128, 128)
    assert read_png_parameters(result)["width"] == 128
    small = downscaled(result)
    assert np.abs(small.astype(np.float32) - pixels(first_pass[0])).mean() < 20
    assert analyze_shape_image(small) == WANT
    (wide,) = run(img2img, tmp_path / "w", "--prompt", PROMPT, "--init-img", str(first_pass[0]), "--n_samples",
                  "1", "--W", "128", "--strength", "0.5")  # fmt: skip
    assert Image.open(wide).size == (128, 128)  # --W alone keeps the aspect ratio


@pytest.mark.parametrize("background", ["white", "black"])
def test_outpainting_keeps_every_pixel_and_paints_the_background(first_pass, tmp_path, background):
    source = first_pass[0]
    if background == "black":  # a black-background image of the same circle, to extend on black
        inverted = np.where(pixels(source).min(axis=-1, keepdims=True) > 200, 15, pixels(source))
        source = tmp_path / "black.png"
        Image.fromarray(inverted.astype(np.uint8)).save(source)
    prompt = f"a red circle on a {background} background"
    (result,) = run(inpaint, tmp_path / "out", "--prompt", prompt, "--init-img", str(source), "--n_samples", "1",
                    "--outpaint", "left=32,top=16,bottom=8")  # fmt: skip
    out = pixels(result)
    assert out.shape == (16 + 64 + 8, 32 + 64, 3)
    assert np.array_equal(out[16:80, 32:], pixels(source))  # bit for bit
    border = np.ones(out.shape[:2], dtype=bool)
    border[16:80, 32:] = False
    level = np.array([245, 245, 245] if background == "white" else [15, 15, 15])
    near = np.abs(out[border].astype(int) - level).max(axis=-1) < 40
    assert near.mean() > 0.9, near.mean()  # measured: 1.0 on either background (the model may draw a shape)
    assert read_png_parameters(result)["outpaint"] == "left=32,right=0,top=16,bottom=8"


def options(**values) -> argparse.Namespace:
    defaults = dict(W=64, H=64, ddim_steps=10, hr_scale=None, hr_width=None, hr_height=None, hr_upscaler=None,
                    hr_steps=None, hr_strength=None, hr_sampler=None, hr_prompt=None, hr_negative_prompt=None)  # fmt: skip
    return argparse.Namespace(**{**defaults, **values})


def test_hires_options():
    assert hires_options(options(), 64) is None
    hires = hires_options(options(hr_scale=2.0), 64)
    assert (hires.width, hires.height, hires.upscaler) == (128, 128, "latent")
    assert (hires.steps, hires.strength) == (10, 0.7)
    assert hires_options(options(hr_width=192), 64).height == 192  # aspect ratio kept
    assert Hires(128, 128, "latent", 20, 0.7, None, None, None).schedule_steps == 28  # int(20 / 0.7), A1111
    for bad in (dict(hr_scale=1.3), dict(hr_scale=2.0, hr_width=128), dict(hr_steps=5), dict(hr_width=32)):
        with pytest.raises(UserError):
            hires_options(options(**bad), 64)


def test_outpaint_flag_and_hostile_values(tmp_path, capsys):
    assert parse_outpaint("left=8, top=16") == {"left": 8, "right": 0, "top": 16, "bottom": 0}
    for bad in ("left=12", "up=8", "left=-8", "left=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_outpaint(bad)
    with pytest.raises(SystemExit) as exit_:
        inpaint.main(["--init-img", "x.png", "--outpaint", "left=12"])
    assert exit_.value.code == 2 and "multiples of 8" in capsys.readouterr().err


def test_vae_tiles_by_default_on_the_cpu_from_1024_pixels_when_the_decode_would_not_fit(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\0" * 2**20)  # 1 MiB of "weights"

    def tiled(height: int, width: int, limit_gib: float, batch: int = 1, **options) -> bool:
        opt = argparse.Namespace(
            vae_tiling=False, no_vae_tiling=False, device="cpu", ckpt=str(ckpt), n_samples=batch,
            memory_limit=limit_gib,
        )  # fmt: skip
        vars(opt).update(options)
        decide_vae_tiling(opt, height, width)
        return opt.vae_tiling

    # an untiled 1024² decode adds about 3.3 GiB (DECODE_BYTES_PER_PIXEL)
    assert tiled(1024, 512, limit_gib=1) and tiled(2048, 2048, limit_gib=8)
    assert not tiled(1024, 1024, limit_gib=8) and tiled(1024, 1024, limit_gib=8, batch=4)
    assert not tiled(512, 1000, limit_gib=0.1)  # small images: never
    assert not tiled(2048, 2048, limit_gib=1, no_vae_tiling=True)
    assert not tiled(2048, 2048, limit_gib=1, device="cuda")
    with pytest.raises(UserError):
        decide_vae_tiling(argparse.Namespace(vae_tiling=True, no_vae_tiling=True, device="cpu"), 64, 64)


def test_hires_infotext_fields():
    """A1111 writes Hires upscale for a scale, Hires resize-1/-2 for a size, and the second pass's own sampler."""
    from ldm.infotext import record_infotext

    base = {"prompt": "p", "steps": 20, "sampler": "euler_a", "width": 512, "height": 512, "seed": 1}
    hires = {"hr_width": 1024, "hr_height": 768, "hr_upscaler": "latent-bicubic", "hr_steps": 10,
             "hr_strength": 0.55, "hr_sampler": "dpmpp_2m"}  # fmt: skip
    sized = parse_infotext(record_infotext({**base, **hires}))
    assert (sized["Hires resize-1"], sized["Hires resize-2"]) == (
        "1024",
        "768",
    ) and "Hires upscale" not in sized
    assert sized["Hires upscaler"] == "Latent (bicubic)" and sized["Hires sampler"] == "DPM++ 2M"
    assert sized["Denoising strength"] == "0.55" and sized["Size"] == "512x512"
    scaled = parse_infotext(record_infotext({**base, **hires, "hr_scale": 2.0}))
    assert scaled["Hires upscale"] == "2.0" and "Hires resize-1" not in scaled
    assert not any(key.startswith("Hires") for key in parse_infotext(record_infotext(base)))


def test_from_png_reads_a1111_hires_fields(tmp_path, capsys):
    """An A1111 hires image: the first pass's size, the upscale, steps, strength and a known upscaler are
    honoured; an upscaler this project does not have is named."""
    from PIL import PngImagePlugin

    from ldm.cli import png_flags

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle on a white background\nSteps: 3, Sampler: Euler a, CFG scale: 3, "
                  "Seed: 5, Size: 64x64, Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, "
                  "Hires upscaler: Latent (bicubic)")  # fmt: skip
    Image.new("RGB", (128, 128)).save(tmp_path / "hires.png", pnginfo=info)
    flags = png_flags(str(tmp_path / "hires.png"), "txt2img")
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert (pairs["--W"], pairs["--hr-scale"], pairs["--hr-steps"]) == ("64", "2", "2")
    assert (pairs["--hr-strength"], pairs["--hr-upscaler"]) == ("0.6", "latent-bicubic")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 3, Sampler: Euler, Seed: 5, Size: 64x64, Hires upscale: 2, "
                  "Hires upscaler: R-ESRGAN 4x+")  # fmt: skip
    Image.new("RGB", (128, 128)).save(tmp_path / "esrgan.png", pnginfo=info)
    png_flags(str(tmp_path / "esrgan.png"), "txt2img")
    assert "Hires upscaler cannot be honoured" in capsys.readouterr().out

"""Images of the three scripts with the bundled `shapes` model, pinned: a refactor must not change a pixel.

The references in tests/data/pinned/ were drawn where its capability.txt says (the CPU, torch's kernel level, e.g.
AVX512, torch's version and thread count): there each image must be bit-identical. Other CPUs and thread counts
sum in another order, which may move a pixel by a level here and there, so there the images must be within
rounding of the references.
`LDM_RECORD_PINNED=1 pytest tests/test_pinned_images.py` re-draws the references (only after a deliberate change).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm.runtime.bf16 import cpu_has_amx, cpu_identity

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "data" / "pinned"
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import inpaint  # noqa: E402
import txt2img  # noqa: E402

# --precision full: the references are fp32 (auto is bf16 on CPUs with bf16 units)
COMMON = ["--ckpt", "shapes", "--device", "cpu", "--no-safety-checker", "--n_iter", "1", "--skip_grid"]
COMMON += ["--precision", "full"]
CASES = {
    "txt2img-ddim": (txt2img, ["--prompt", "a red circle on a white background", "--ddim_steps", "8",
                               "--n_samples", "2", "--seed", "3"]),
    "txt2img-ddim-eta": (txt2img, ["--prompt", "a green triangle on a black background", "--sampler", "ddim",
                                   "--ddim_eta", "0.7", "--ddim_steps", "6", "--n_samples", "2", "--seed", "11"]),
    "txt2img-plms": (txt2img, ["--prompt", "a blue square on a white background", "--plms", "--ddim_steps", "6",
                               "--n_samples", "1", "--seed", "5"]),
    "img2img-dpm": (img2img, ["--prompt", "a yellow circle on a black background", "--sampler", "dpm",
                              "--ddim_steps", "8", "--strength", "0.6", "--n_samples", "2", "--seed", "7"]),
    "inpaint-ddim": (inpaint, ["--prompt", "a red square on a white background", "--ddim_steps", "6",
                               "--n_samples", "2", "--seed", "9"]),
}  # fmt: skip
# the original's literal prompt handling draws the same pixels as the A1111 prompt language on plain prompts
CASES["txt2img-ddim-plain"] = (txt2img, [*CASES["txt2img-ddim"][1], "--prompt-syntax", "plain"])
REFERENCE = {"txt2img-ddim-plain": "txt2img-ddim"}  # case -> the references it must equal


def inputs(directory: Path) -> list[str]:
    """A 64x64 blue circle on white (img2img and inpaint input) and a mask of its right half."""
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((14, 14, 50, 50), fill=(20, 40, 230))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)
    image.save(directory / "init.png")
    mask.save(directory / "mask.png")
    return ["--init-img", str(directory / "init.png"), "--mask", str(directory / "mask.png")]


def capability() -> str:
    """What decides the float kernels' rounding: the CPU (oneDNN blocks its loops by the CPU's units and caches:
    an AVX512 Zen 4 and an AVX512 Xeon with AMX round differently), its kernel level, torch and the thread count."""
    version = torch.__version__.split("+")[0]
    kernels = torch.backends.cpu.get_cpu_capability() + (" AMX" if cpu_has_amx() else "")
    return f"{cpu_model()}: {kernels} torch {version} threads {torch.get_num_threads()}"


def cpu_model() -> str:
    """The CPU's name and model number (`cpu_identity`)."""
    name, model, _ = cpu_identity()
    return f"{name} model {model}"


@pytest.mark.parametrize("case", CASES)
def test_pinned_images(case, tmp_path):
    script, argv = CASES[case]
    image_args = inputs(tmp_path)
    if script is img2img:
        image_args = image_args[:2]
    elif script is txt2img:
        image_args = []
    script.main([*COMMON, *argv, *image_args, "--outdir", str(tmp_path / "out")])
    written = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert written
    if os.environ.get("LDM_RECORD_PINNED") and case not in REFERENCE:
        PINNED.mkdir(parents=True, exist_ok=True)
        (PINNED / "capability.txt").write_text(capability() + "\n")
        for k, path in enumerate(written):
            with Image.open(path) as image:
                image.save(PINNED / f"{case}-{k}.png")
    exact = (PINNED / "capability.txt").read_text().strip() == capability()
    for k, path in enumerate(written):
        with Image.open(path) as image, Image.open(PINNED / f"{REFERENCE.get(case, case)}-{k}.png") as pinned:
            got, want = (np.asarray(im.convert("RGB")).astype(np.int16) for im in (image, pinned))
        diff = np.abs(got - want)
        if exact:
            assert diff.max() == 0, f"{case} image {k}: {int((diff > 0).sum())} values differ"
        else:
            assert diff.mean() < 1.0 and diff.max() <= 24, (case, k, diff.mean(), diff.max())

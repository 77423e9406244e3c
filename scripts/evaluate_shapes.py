"""Measure a "shapes" text-to-image model: how often its images show what the caption asks, and how fast.

For every (color, shape, background) caption of ldm.data.shapes and seeds 0..n-1, generate a 64x64 image
(initial noise seeded per image, as txt2img draws it) with each sampler setting, read its attributes back
with ldm.data.shape_analysis.analyze_shape_image, and print a markdown table of the fraction of images whose
background, color, shape (and all three) match. Then time single-image generations.

    python scripts/evaluate_shapes.py                       # the bundled model, default settings
    python scripts/evaluate_shapes.py --config C --ckpt W   # a checkpoint of your own (e.g. a training run)
"""

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.bundled import bundled_model, resolve_model
from ldm.checkpoint import load_model_from_config
from ldm.data.shape_analysis import analyze_shape_image, caption_attributes
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS = {"plms": PLMSSampler, "ddim": DDIMSampler}
ATTRIBUTES = ("background", "color", "shape")


def all_captions() -> list[str]:
    """The 24 captions, in a fixed order."""
    return [
        caption(color, shape, background)
        for background, color, shape in itertools.product(BACKGROUNDS, COLORS, SHAPES)
    ]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(
    model,
    prompts: list[str],
    seeds: list[int],
    sampler: str,
    steps: int,
    scale: float,
    size: tuple[int, int] = (64, 64),
) -> np.ndarray:
    """One image per (prompt, seed) pair, uint8 [B, H, W, 3]; the noise of each is drawn from its own seed."""
    shape = (model.channels, size[0] // 8, size[1] // 8)
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with model.ema_scope():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
        samples, _ = SAMPLERS[sampler](model).sample(
            S=steps,
            batch_size=len(prompts),
            shape=shape,
            conditioning=c,
            unconditional_guidance_scale=scale,
            unconditional_conditioning=uc,
            eta=0.0,
            x_T=x_T.to(model.device),
            verbose=False,
        )
        return to_uint8(model.decode_first_stage(samples))


def accuracy(model, sampler: str, steps: int, scale: float, n_seeds: int, batch_size: int) -> dict:
    """Fractions of images matching their caption: per attribute and all three ("all")."""
    pairs = [(p, s) for p in all_captions() for s in range(n_seeds)]
    hits = {name: 0 for name in (*ATTRIBUTES, "all")}
    for i in range(0, len(pairs), batch_size):
        prompts, seeds = zip(*pairs[i : i + batch_size], strict=True)
        images = generate(model, list(prompts), list(seeds), sampler, steps, scale)
        for prompt, image in zip(prompts, images, strict=True):
            want, got = caption_attributes(prompt), analyze_shape_image(image)
            matches = [want[name] == got[name] for name in ATTRIBUTES]
            for name, match in zip(ATTRIBUTES, matches, strict=True):
                hits[name] += match
            hits["all"] += all(matches)
    return {name: count / len(pairs) for name, count in hits.items()}


def seconds_per_image(model, sampler: str, steps: int, scale: float, repeats: int) -> list[float]:
    """Wall-clock seconds of single-image generations (text encoding, sampling, decoding), one per repeat."""
    prompt = caption("red", "circle", "white")
    generate(model, [prompt], [0], sampler, steps, scale)  # warm-up
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        generate(model, [prompt], [seed], sampler, steps, scale)
        times.append(time.perf_counter() - start)
    return times


def parse_settings(text: str, default_scale: float) -> tuple[str, int, float]:
    """ "plms:50" or "ddim:20:1.0" -> (sampler, steps, scale)."""
    parts = text.split(":")
    if parts[0] not in SAMPLERS or len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"bad setting {text!r}: write SAMPLER:STEPS[:SCALE], e.g. plms:50")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else default_scale


def main(argv: list[str] | None = None) -> None:
    bundled = bundled_model("shapes")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default="shapes", help="checkpoint path, or a bundled model's name")
    parser.add_argument("--config", default=None, help="model config (default: the bundled model's)")
    parser.add_argument("--scale", type=float, default=bundled.scale, help="default guidance scale")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="SAMPLER:STEPS[:SCALE] to measure (default: plms:50, ddim:20 and plms:50:1.0)",
    )
    parser.add_argument("--seeds", type=int, default=8, help="seeds per caption (0: skip the accuracy table)")
    parser.add_argument("--batch_size", type=int, default=64, help="images sampled together")
    parser.add_argument("--repeats", type=int, default=7, help="timed single-image runs (0: skip timing)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    opt = parser.parse_args(argv)

    torch.set_num_threads(opt.threads)
    config_path, ckpt_path = resolve_model(opt.ckpt, opt.config)
    model = load_model_from_config(OmegaConf.load(config_path), ckpt_path, verbose=False)
    settings = [parse_settings(s, opt.scale) for s in opt.settings or ("plms:50", "ddim:20", "plms:50:1.0")]

    if opt.seeds > 0:
        n_images = len(all_captions()) * opt.seeds
        print(f"Model {ckpt_path}: {n_images} images per setting (24 captions x {opt.seeds} seeds), 64x64\n")
        print("| sampler | steps | scale | background | color | shape | all three |")
        print("|---|---|---|---|---|---|---|")
        for sampler, steps, scale in settings:
            acc = accuracy(model, sampler, steps, scale, opt.seeds, opt.batch_size)
            cells = " | ".join(f"{100 * acc[name]:.1f}%" for name in (*ATTRIBUTES, "all"))
            print(f"| {sampler.upper()} | {steps} | {scale:g} | {cells} |", flush=True)

    if opt.repeats > 0:
        sampler, steps, scale = "plms", 50, opt.scale
        times = seconds_per_image(model, sampler, steps, scale, opt.repeats)
        print(
            f"\nOne 64x64 image, {sampler.upper()} {steps} steps, scale {scale:g}, {opt.threads} threads: "
            f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
            f"{opt.repeats} runs)"
        )


if __name__ == "__main__":
    main()

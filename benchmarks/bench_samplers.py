"""Quality per step of every sampler on the bundled `shapes` model (64x64, CPU).

For each sampler (with its default schedule) and step count, generate one image per (caption, seed) of
scripts/evaluate_shapes.py from the same seeded x_T and report: the mean absolute pixel distance (0..255) to a
converged reference (DPM++ 2M Karras, 500 steps, same x_T; ancestral and SDE samplers converge to other images,
so their distance stays large), the prompt adherence (all three attributes read back right), and the seconds per
image of the batched run (sampling and decoding). PLMS 50 is the project's default to beat.

    python benchmarks/bench_samplers.py --seeds 2 --steps 5 10 20 30
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate_shapes import ATTRIBUTES, all_captions, to_uint8  # noqa: E402

from ldm.bundled import resolve_model  # noqa: E402
from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.data.shape_analysis import analyze_shape_image, caption_attributes  # noqa: E402
from ldm.models.diffusion.registry import SAMPLERS, make_sampler  # noqa: E402


@torch.no_grad()
def generate(
    model, c, uc, x_T, generators, sampler: str, steps: int, scale: float, scheduler=None
) -> np.ndarray:
    """uint8 images [B, H, W, 3] of one batched run."""
    extra = {"scheduler": scheduler} if scheduler else {}
    samples, _ = make_sampler(sampler, model).sample(
        S=steps, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]), conditioning=c,
        unconditional_guidance_scale=scale, unconditional_conditioning=uc, x_T=x_T,
        generator=generators, verbose=False, **extra,
    )  # fmt: skip
    return to_uint8(model.decode_first_stage(samples))


def adherence(prompts: list[str], images: np.ndarray) -> float:
    hits = 0
    for prompt, image in zip(prompts, images, strict=True):
        want, got = caption_attributes(prompt), analyze_shape_image(image)
        hits += all(want[name] == got[name] for name in ATTRIBUTES)
    return hits / len(prompts)


def cpu_line() -> str:
    flags = set()
    name = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not flags:
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return f"{name}; flags: {', '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption (24 captions)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--samplers", nargs="+", default=[s for s in SAMPLERS if s not in ("plms", "dpm")])
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--reference_steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    opt = parser.parse_args(argv)
    torch.set_num_threads(opt.threads)

    config, ckpt = resolve_model("shapes")
    model = load_model_from_config(OmegaConf.load(config), ckpt, verbose=False)
    pairs = [(p, s) for p in all_captions() for s in range(opt.seeds)]
    prompts = [p for p, _ in pairs]
    shape = (model.channels, 8, 8)
    with model.ema_scope():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning(len(prompts) * [""])

    def run(sampler: str, steps: int, scheduler=None) -> tuple[np.ndarray, float]:
        generators = [torch.Generator().manual_seed(seed) for _, seed in pairs]
        x_T = torch.stack([torch.randn(shape, generator=g) for g in generators])
        start = time.perf_counter()
        images = generate(model, c, uc, x_T, generators, sampler, steps, opt.scale, scheduler)
        return images, (time.perf_counter() - start) / len(pairs)

    reference, _ = run("dpmpp_2m", opt.reference_steps, "karras")
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {opt.threads} thread(s)")
    print(f"{len(pairs)} images per cell (24 captions x {opt.seeds} seeds), 64x64, scale {opt.scale:g}; ")
    print(f"distance: mean |pixel - DPM++ 2M Karras {opt.reference_steps} steps| (0..255)\n")
    plms, plms_seconds = run("plms", 50)
    plms_adherence = adherence(prompts, plms)
    plms_distance = np.abs(plms.astype(float) - reference).mean()
    print(
        f"PLMS 50: adherence {100 * plms_adherence:.1f}%, distance {plms_distance:.2f}, {plms_seconds:.3f} s/image\n"
    )
    header = " | ".join(f"{s} steps: adh. / dist. / s" for s in opt.steps)
    print(f"| sampler (schedule) | {header} |")
    print("|---|" + "---|" * len(opt.steps))
    best = None
    for name in opt.samplers:
        sampler = make_sampler(name, model)
        cells = []
        for steps in opt.steps:
            images, seconds = run(name, steps)
            adh = adherence(prompts, images)
            dist = np.abs(images.astype(float) - reference).mean()
            cells.append(f"{100 * adh:.1f}% / {dist:.1f} / {seconds:.3f}")
            if adh >= plms_adherence and (best is None or seconds < best[2]):
                best = (name, steps, seconds, adh)
        schedule = getattr(sampler, "default_scheduler", "ddim uniform")
        print(f"| {sampler.name} ({schedule}) | " + " | ".join(cells) + " |", flush=True)
    if best:
        name, steps, seconds, adh = best
        print(
            f"\nFastest to reach PLMS-50's adherence ({100 * plms_adherence:.1f}%): {name} at {steps} steps, "
            f"{100 * adh:.1f}%, {seconds:.3f} s/image (PLMS 50: {plms_seconds:.3f} s/image)"
        )


if __name__ == "__main__":
    main()

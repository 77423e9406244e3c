"""Text to image: `python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms`."""

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm, trange  # noqa: E402

from ldm.inference import (  # noqa: E402
    DEFAULT_CKPT,
    DEFAULT_CONFIG,
    SAMPLERS,
    UserError,
    check_checkpoint,
    check_image_size,
    initial_noise,
    load_config,
    load_model,
    make_sampler,
    precision_scope,
    resolve_precision,
    run_cli,
    select_device,
    size_multiple,
)
from ldm.outputs import NumberedFolder, Watermarker, make_image_grid, to_pil  # noqa: E402

LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--prompt",
        type=str,
        nargs="?",
        default="a painting of a virus monster playing guitar",
        help="the prompt to render",
    )
    parser.add_argument(
        "--negative-prompt",
        type=str,
        default="",
        help="what to steer away from (replaces the empty unconditional prompt)",
    )
    parser.add_argument(
        "--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to"
    )
    parser.add_argument(
        "--skip_grid", action="store_true", help="do not save a grid, only individual samples"
    )
    parser.add_argument(
        "--skip_save", action="store_true", help="do not save individual samples (for speed measurements)"
    )
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    parser.add_argument("--plms", action="store_true", help="use plms sampling")
    parser.add_argument("--dpm_solver", action="store_true", help="use dpm_solver sampling")
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="sampler (instead of --plms / --dpm_solver); default ddim",
    )
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.add_argument(
        "--fixed_code", action="store_true", help="use the same starting code for every iteration"
    )
    parser.add_argument(
        "--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 corresponds to deterministic sampling)"
    )
    parser.add_argument("--n_iter", type=int, default=2, help="sample this often")
    parser.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    parser.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    parser.add_argument(
        "--n_samples",
        type=int,
        default=3,
        help="how many samples to produce for each given prompt, i.e. the batch size",
    )
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument(
        "--scale",
        type=float,
        default=7.5,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))",
    )
    parser.add_argument(
        "--from-file", type=str, help="if specified, load prompts from this file, one per line"
    )
    parser.add_argument(
        "--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model"
    )
    parser.add_argument(
        "--ckpt", type=str, default=DEFAULT_CKPT, help="path to checkpoint of model (.ckpt or .safetensors)"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="the seed (for reproducible sampling); image k gets seed + k"
    )
    parser.add_argument(
        "--precision",
        type=str,
        choices=["full", "autocast"],
        default=None,
        help="evaluate at this precision (default: autocast on CUDA, i.e. fp16; full on CPU; autocast on CPU is bf16)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "mps", "cpu"],
        default="auto",
        help="where to run (auto: cuda, then mps, then cpu)",
    )
    parser.add_argument(
        "--safety-checker",
        type=str,
        default=None,
        help="path of a local CompVis/stable-diffusion-safety-checker (default: the HF cache)",
    )
    parser.add_argument("--no-safety-checker", action="store_true", help="do not run the safety checker")
    return parser.parse_args(argv)  # fmt: skip


def choose_sampler(opt: argparse.Namespace) -> str:
    flagged = [name for name, on in (("plms", opt.plms), ("dpm", opt.dpm_solver)) if on]
    if opt.sampler is not None:
        flagged.append(opt.sampler)
    if len(set(flagged)) > 1:
        raise UserError(
            f"conflicting sampler flags ({', '.join(sorted(set(flagged)))}): choose one with --sampler"
        )
    return flagged[0] if flagged else "ddim"


def read_prompts(opt: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts: n_samples copies of --prompt, or the file's lines in batches of n_samples
    (the last batch may be smaller)."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    path = Path(opt.from_file)
    if not path.is_file():
        raise UserError(
            f"prompt file {opt.from_file} not found: pass --from-file with a text file, one prompt per line"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {opt.from_file} has no prompts: write one prompt per line")
    return [prompts[i : i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]


def check_args(opt: argparse.Namespace) -> None:
    for flag, value in (
        ("--n_samples", opt.n_samples),
        ("--n_iter", opt.n_iter),
        ("--ddim_steps", opt.ddim_steps),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not opt.ddim_eta >= 0.0:
        raise UserError(f"--ddim_eta must be >= 0, got {opt.ddim_eta}")


def remake_command(opt: argparse.Namespace, prompt: str, seed: int, sampler: str) -> str:
    args = [
        "python scripts/txt2img.py", "--prompt", shlex.quote(prompt), "--seed", str(seed),
        "--n_samples 1 --n_iter 1", "--sampler", sampler, "--ddim_steps", str(opt.ddim_steps),
        "--scale", str(opt.scale), "--ddim_eta", str(opt.ddim_eta), "--H", str(opt.H), "--W", str(opt.W),
        "--config", shlex.quote(opt.config), "--ckpt", shlex.quote(opt.ckpt),
    ]  # fmt: skip
    if opt.negative_prompt:
        args += ["--negative-prompt", shlex.quote(opt.negative_prompt)]
    return " ".join(args)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        opt.config, opt.ckpt, opt.outdir = LAION_CONFIG, LAION_CKPT, "outputs/txt2img-samples-laion400m"
    check_args(opt)
    sampler_name = choose_sampler(opt)
    config = load_config(opt.config)
    check_image_size(opt.H, opt.W, size_multiple(config))
    batches = read_prompts(opt)
    ckpt = check_checkpoint(opt.ckpt)
    device = select_device(opt.device)
    precision = resolve_precision(opt.precision, device)

    from ldm.checkpoint import model_hash
    from ldm.safety import load_safety_checker

    model = load_model(config, ckpt, device)
    sampler = make_sampler(sampler_name, model)
    safety_checker = None if opt.no_safety_checker else load_safety_checker(opt.safety_checker, device)
    watermark = Watermarker()
    samples_folder = NumberedFolder(Path(opt.outdir) / "samples")
    grid_folder = NumberedFolder(Path(opt.outdir), prefix="grid-", digits=4)
    n_rows = opt.n_rows if opt.n_rows > 0 else opt.n_samples
    latent_shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    fixed_code = (
        initial_noise(range(opt.seed, opt.seed + opt.n_samples), latent_shape, device)
        if opt.fixed_code
        else None
    )
    shared = {
        "negative_prompt": opt.negative_prompt, "sampler": sampler_name, "steps": opt.ddim_steps,
        "scale": opt.scale, "eta": opt.ddim_eta, "width": opt.W, "height": opt.H, "precision": precision,
        "config": opt.config, "model": Path(opt.ckpt).name, "model_hash": model_hash(ckpt),
    }  # fmt: skip

    images, first_remake, image_index = [], None, 0
    start = time.perf_counter()
    with torch.no_grad(), precision_scope(precision, device), model.ema_scope():
        uc_cache = {}
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                n = len(prompts)
                if opt.fixed_code:
                    seeds, x_T = list(range(opt.seed, opt.seed + n)), fixed_code[:n]
                else:
                    seeds = list(range(opt.seed + image_index, opt.seed + image_index + n))
                    x_T = initial_noise(seeds, latent_shape, device)
                image_index += n
                uc = None
                if opt.scale != 1.0:
                    if n not in uc_cache:
                        uc_cache[n] = model.get_learned_conditioning(n * [opt.negative_prompt])
                    uc = uc_cache[n]
                c = model.get_learned_conditioning(prompts)
                samples, _ = sampler.sample(
                    S=opt.ddim_steps, conditioning=c, batch_size=n, shape=latent_shape, verbose=False,
                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc, eta=opt.ddim_eta,
                    x_T=x_T, generator=torch.Generator().manual_seed(seeds[0]),
                )  # fmt: skip
                batch_images = to_pil(model.decode_first_stage(samples))
                if safety_checker is not None:
                    batch_images = safety_checker(batch_images)
                for image, prompt, seed in zip(batch_images, prompts, seeds, strict=True):
                    image = watermark(image)
                    images.append(image)
                    if opt.skip_save:
                        continue
                    remake = remake_command(opt, prompt, seed, sampler_name)
                    first_remake = first_remake or remake
                    samples_folder.save(image, {**shared, "prompt": prompt, "seed": seed, "remake": remake})

    if not opt.skip_grid:
        grid = watermark(make_image_grid(images, n_rows))
        grid_folder.save(
            grid, {**shared, "prompts": sorted({p for batch in batches for p in batch}), "seed": opt.seed}
        )
    seconds = time.perf_counter() - start
    print(f"Your samples are ready and waiting for you here: {opt.outdir}")
    print(f"{len(images)} images in {seconds:.1f} s ({seconds / len(images):.2f} s per image)")
    if first_remake:
        print(f"To re-make one image alone, run the command in its PNG metadata, e.g.: {first_remake}")


if __name__ == "__main__":
    run_cli(main)

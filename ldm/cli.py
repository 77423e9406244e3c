"""What the generation scripts share: their common flags and checks, the session (model, sampler, safety
checker, watermark), and the loop that renders batches of prompts and writes numbered PNGs with metadata."""

import argparse
import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm, trange

from ldm.image_input import DEFAULT_MAX_PIXELS
from ldm.inference import (
    DEFAULT_CKPT,
    DEFAULT_CONFIG,
    SAMPLERS,
    UserError,
    autocast_dtype,
    check_checkpoint,
    load_model,
    make_sampler,
    precision_scope,
    resolve_precision,
    select_device,
)
from ldm.outputs import NumberedFolder, Watermarker, make_image_grid


def add_common_args(
    parser: argparse.ArgumentParser, outdir: str, n_iter: int, n_samples: int, scale: float
) -> None:
    """The flags every generation script takes, with the script's own defaults for the ones that differ."""
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
    parser.add_argument("--outdir", type=str, nargs="?", default=outdir, help="dir to write results to")
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
    parser.add_argument(
        "--fixed_code",
        action="store_true",
        help="use the same starting code (seeds) for every batch and iteration",
    )
    parser.add_argument(
        "--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 corresponds to deterministic sampling)"
    )
    parser.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    parser.add_argument(
        "--n_samples",
        type=int,
        default=n_samples,
        help="how many samples to produce for each given prompt, i.e. the batch size",
    )
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument(
        "--scale",
        type=float,
        default=scale,
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
    parser.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode (and encode) in overlapping 64x64-latent tiles, blended: large images in bounded memory",
    )
    parser.add_argument(
        "--attention-chunk",
        type=int,
        default=None,
        metavar="N",
        help="compute attention N queries at a time (same result, less memory for very large images)",
    )
    parser.add_argument(
        "--lowvram",
        action="store_true",
        help="keep only the module in use (text encoder, UNet, VAE) on the GPU (on the CPU this is always done for memory-mapped weights: only the module in use stays resident)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: one per core; use fewer when other processes keep cores busy, "
        "since oversubscribed threads run several times slower)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (the first step then includes compiling)",
    )


def add_max_pixels_arg(parser: argparse.ArgumentParser) -> None:
    """`--max-pixels` of the scripts that read an input image."""
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse input images with more pixels than this (default {DEFAULT_MAX_PIXELS}, i.e. 2048x2048)",
    )


def apply_bundled_model(opt: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`--ckpt NAME` of a model bundled with the project (e.g. `shapes`): its config and weights, and its image
    size and guidance scale wherever the user left the script's defaults."""
    from ldm.bundled import bundled_model, resolve_model

    model = None if Path(opt.ckpt).is_file() else bundled_model(opt.ckpt)
    if model is None:
        return opt
    config_given = opt.config != parser.get_default("config")
    try:
        opt.config, opt.ckpt = resolve_model(opt.ckpt, opt.config if config_given else None)
    except ValueError as error:
        raise UserError(str(error)) from None
    for flag, value in (("H", model.height), ("W", model.width), ("scale", model.scale)):
        if hasattr(opt, flag) and getattr(opt, flag) == parser.get_default(flag):
            setattr(opt, flag, value)
    return opt


def choose_sampler(opt: argparse.Namespace) -> str:
    """ "ddim", "plms" or "dpm" from --sampler / --plms / --dpm_solver; conflicting flags are an error."""
    flagged = [name for name, on in (("plms", opt.plms), ("dpm", opt.dpm_solver)) if on]
    if opt.sampler is not None:
        flagged.append(opt.sampler)
    if len(set(flagged)) > 1:
        raise UserError(
            f"conflicting sampler flags ({', '.join(sorted(set(flagged)))}): choose one with --sampler"
        )
    return flagged[0] if flagged else "ddim"


def check_args(opt: argparse.Namespace, sampler: str) -> None:
    for flag, value in (
        ("--n_samples", opt.n_samples),
        ("--n_iter", opt.n_iter),
        ("--ddim_steps", opt.ddim_steps),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not opt.ddim_eta >= 0.0:
        raise UserError(f"--ddim_eta must be >= 0, got {opt.ddim_eta}")
    if opt.ddim_eta != 0.0 and sampler != "ddim":
        raise UserError(
            f"--ddim_eta {opt.ddim_eta} needs the ddim sampler: {sampler} is deterministic (eta 0)"
        )


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


@dataclass
class Session:
    """A loaded model with everything a run around it needs."""

    opt: argparse.Namespace
    script: str  # "scripts/txt2img.py" etc., for the re-make commands
    sampler_name: str
    device: torch.device
    precision: str
    model: Any
    sampler: Any
    model_hash: str
    safety_checker: Callable[[list[Image.Image]], list[Image.Image]] | None
    watermark: Watermarker

    def scope(self) -> contextlib.ExitStack:
        """No gradients, the run's precision, and the EMA weights if the model has them."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(precision_scope(self.precision, self.device))
        stack.enter_context(self.model.ema_scope())
        return stack


def apply_memory_options(model, opt: argparse.Namespace, device: torch.device, precision: str) -> None:
    """The model-side effects of --precision autocast (fp16 weights on CUDA, bf16 on the CPU), --vae-tiling,
    --attention-chunk, --lowvram and --compile; on the CPU, malloc keeps freed activations for reuse and only
    the module in use stays resident (see ldm.memory)."""
    from ldm.memory import (
        enable_lowvram,
        keep_freed_memory,
        low_precision,
        release_idle_units,
        set_attention_chunk,
    )

    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        low_precision(model, dtype)
    if opt.vae_tiling:
        if not hasattr(model.first_stage_model, "enable_tiling"):
            raise UserError("--vae-tiling needs a KL autoencoder first stage (AutoencoderKL)")
        model.first_stage_model.enable_tiling()
    if opt.attention_chunk is not None:
        if opt.attention_chunk < 1:
            raise UserError(f"--attention-chunk must be at least 1, got {opt.attention_chunk}")
        set_attention_chunk(model, opt.attention_chunk)
    if device.type == "cpu":
        keep_freed_memory()
        release_idle_units(model)
        if opt.lowvram:
            print("--lowvram: on the CPU only the module in use stays resident anyway: nothing to offload")
    elif opt.lowvram:
        enable_lowvram(model, device)
    if opt.threads is not None:
        if opt.threads < 1:
            raise UserError(f"--threads must be at least 1, got {opt.threads}")
        torch.set_num_threads(opt.threads)
    if opt.compile:
        model.model.diffusion_model.compile()


def open_session(
    opt: argparse.Namespace, config, sampler_name: str, script: str, image_conditioning: bool = False
) -> Session:
    """Check the model kind, checkpoint and device, then load the model, sampler and safety checker.

    Models whose UNet also takes an image (conditioning_key concat or hybrid, e.g. inpainting models) need a
    script that gives it one: `image_conditioning` says this one does."""
    key = config.model.params.get("conditioning_key")
    if key in ("concat", "hybrid") and not image_conditioning:
        raise UserError(
            f"{opt.config} is a model conditioned on an image too (conditioning_key {key}, e.g. an inpainting "
            "model): use it with scripts/inpaint.py"
        )
    ckpt = check_checkpoint(opt.ckpt)
    device = select_device(opt.device)
    precision = resolve_precision(opt.precision, device)

    from ldm.checkpoint import model_hash_in_background
    from ldm.safety import load_safety_checker

    ckpt_hash = model_hash_in_background(ckpt)
    model = load_model(config, ckpt, torch.device("cpu") if opt.lowvram else device)
    apply_memory_options(model, opt, device, precision)
    return Session(
        opt=opt,
        script=script,
        sampler_name=sampler_name,
        device=device,
        precision=precision,
        model=model,
        sampler=make_sampler(sampler_name, model),
        safety_checker=None if opt.no_safety_checker else load_safety_checker(opt.safety_checker, device),
        watermark=Watermarker(),
        model_hash=ckpt_hash.result(),  # after everything else that loads
    )


@dataclass
class Batch:
    """One sampler call: its prompts, the images' seeds, and the conditionings c and uc (None without guidance)."""

    prompts: list[str]
    seeds: list[int]
    c: Any
    uc: Any
    generator: (
        torch.Generator
    )  # for draws that span the batch (eta > 0 noise, mask blending): seeded by seeds[0]
    callback: Callable[[int], None]  # the samplers' per-step callback: advances the steps progress bar


def report_step_times(batches: list[list[float]]) -> None:
    """Print the first sampler step's time (it includes torch.compile's compiling under --compile) and the
    median of the others; each batch's list holds its start time, then the time each step ended."""
    first = batches[0][1] - batches[0][0] if batches and len(batches[0]) > 1 else None
    rest = sorted(b - a for times in batches for a, b in zip(times[1:], times[2:], strict=False))
    if first is not None and rest:
        print(f"Sampler steps: first {first:.2f} s, then {rest[len(rest) // 2]:.2f} s per step (median)")


def remake_command(session: Session, prompt: str, seed: int, n_samples: int, extra: list[str]) -> str:
    opt = session.opt
    args = [
        "python", session.script, "--prompt", prompt, "--seed", str(seed), "--n_samples", str(n_samples),
        "--n_iter", "1", "--sampler", session.sampler_name, "--ddim_steps", str(opt.ddim_steps),
        "--scale", str(opt.scale), "--ddim_eta", str(opt.ddim_eta), "--precision", session.precision, *extra,
        "--config", opt.config, "--ckpt", opt.ckpt,
    ]  # fmt: skip
    if opt.negative_prompt:
        args += ["--negative-prompt", opt.negative_prompt]
    return shlex.join(args)


def generate(
    session: Session,
    batches: list[list[str]],
    render: Callable[[Batch], list[Image.Image]],
    steps: int,
    params: dict,
    remake_args: list[str],
    finish: Callable[[Image.Image], Image.Image] | None = None,
    batch_dependent: bool = False,
) -> None:
    """Run `render` on every batch of prompts --n_iter times and write the results; call it inside
    `session.scope()`.

    Image k of a run gets seed --seed + k (with --fixed_code, batch position k gets --seed + k every time).
    `render` returns a batch's images (before the safety checker and the watermark); `steps` is how many
    sampler steps it reports through its callback; `finish` runs on each watermarked image (inpainting pastes
    the kept pixels back there). `params` and `remake_args` are the script's own metadata and flags for the
    re-make command; `batch_dependent` says an image depends on its batch (noise drawn for the whole batch),
    so the command re-makes the batch.
    """
    opt, model = session.opt, session.model
    samples_folder = NumberedFolder(Path(opt.outdir) / "samples")
    grid_folder = NumberedFolder(Path(opt.outdir), prefix="grid-", digits=4)
    shared = {
        "negative_prompt": opt.negative_prompt, "sampler": session.sampler_name, "steps": opt.ddim_steps,
        "scale": opt.scale, "eta": opt.ddim_eta, "precision": session.precision, "config": opt.config,
        "model": Path(opt.ckpt).name, "model_hash": session.model_hash, **params,
    }  # fmt: skip
    images, written, first_remake, image_index, uc_cache = [], 0, None, 0, {}
    step_times = []
    start = time.perf_counter()
    for _ in trange(opt.n_iter, desc="Sampling"):
        for prompts in tqdm(batches, desc="data"):
            n = len(prompts)
            first_seed = opt.seed if opt.fixed_code else opt.seed + image_index
            seeds = list(range(first_seed, first_seed + n))
            image_index += n
            if opt.scale != 1.0 and n not in uc_cache:
                uc_cache[n] = model.get_learned_conditioning(n * [opt.negative_prompt])
            c = model.get_learned_conditioning(prompts)
            with tqdm(total=steps, desc=f"{session.sampler_name} steps", leave=False) as bar:
                batch = Batch(
                    prompts,
                    seeds,
                    c,
                    uc_cache.get(n),
                    torch.Generator().manual_seed(seeds[0]),
                    lambda _: (bar.update(), step_times[-1].append(time.perf_counter())),
                )
                step_times.append([time.perf_counter()])
                batch_images = render(batch)
            if session.safety_checker is not None:
                batch_images = session.safety_checker(batch_images)
            for k, (image, prompt, seed) in enumerate(zip(batch_images, prompts, seeds, strict=True)):
                image = session.watermark(image)
                if finish is not None:
                    image = finish(image)
                images.append(image)
                if opt.skip_save:
                    continue
                if batch_dependent:
                    remake = remake_command(session, prompt, seeds[0], n, remake_args)
                    extra = {"remake": remake, "remake_index": k}
                else:
                    remake = remake_command(session, prompt, seed, 1, remake_args)
                    extra = {"remake": remake}
                first_remake = first_remake or remake
                samples_folder.save(image, {**shared, "prompt": prompt, "seed": seed, **extra})
                written += 1

    if not opt.skip_grid:
        grid = session.watermark(make_image_grid(images, opt.n_rows if opt.n_rows > 0 else opt.n_samples))
        prompts = sorted({p for batch in batches for p in batch})
        grid_folder.save(grid, {**shared, "prompts": prompts, "seed": opt.seed})
        written += 1
    seconds = time.perf_counter() - start
    report_step_times(step_times)
    if first_remake:
        which = "its batch (image remake_index of it)" if batch_dependent else "one image alone"
        print(f"To re-make {which}, run the command in its PNG metadata, e.g.: {first_remake}")
    print(
        f"Your samples are ready and waiting for you here: {opt.outdir} "
        f"({written} file{'s' * (written != 1)} written, {len(images)} images, {seconds / len(images):.2f} s per image)"
    )

"""The generation scripts' command line: every flag declared once, in `FLAGS`, with its type, default, help,
check and whether it changes the image. argparse, the checks, the PNG metadata and the re-make command are
derived from that table. Importing this module does not import torch, so `--help` and refused flags answer at
once; the pipeline is imported only when there is work to do."""

import argparse
import gc
import math
import os
import random
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.files import check_output_folder
from ldm.heap import release_warm_heap, warm_heap
from ldm.hires import TILED_VAE_FROM, UPSCALERS, outpaint_flag, positive_strength
from ldm.loading import DEFAULT_CKPT, DEFAULT_CONFIG, resolve_path
from ldm.models.diffusion.registry import SAMPLERS, SCHEDULERS, canonical_scheduler, split_sampler_name

SCRIPTS = ("txt2img", "img2img", "inpaint")
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
WITH_IMAGE = ("img2img", "inpaint")
DEFAULT_MAX_PIXELS = 2048 * 2048  # input images larger than this are refused unless --max-pixels says more

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def finite(low: float | None = None, high: float | None = None) -> Check:
    """A finite number, within [low, high] where given."""

    def check(v: float) -> str | None:
        if not math.isfinite(v):
            return "must be a finite number"
        if low is not None and high is not None and not low <= v <= high:
            return f"must be between {low} and {high}"
        if low is not None and v < low:
            return f"must be >= {low:g}"
        return None

    return check


def scheduler_name(value: str) -> str:
    """argparse type of --scheduler: a SCHEDULERS name, an A1111 label or "automatic"."""
    if value.strip().lower() == "automatic":
        return "automatic"
    try:
        return canonical_scheduler(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass(frozen=True)
class Flag:
    """One command-line flag of the generation scripts."""

    name: str  # "--ddim_steps"
    help: str
    type: Callable[[str], Any] | None = str  # None: a switch
    default: Any = None  # one value, or {script: value}
    choices: Sequence[str] | None = None
    check: Check | None = None  # run after parsing, before anything loads
    image: bool = False  # changes the image: recorded in the PNG metadata and the re-make command
    key: str | None = None  # its metadata key (default: its dest)
    describe: Callable[[Any], Any] | None = None  # its value as recorded in the metadata
    scripts: tuple[str, ...] = SCRIPTS
    nargs: str | None = None
    metavar: str | None = None
    repeat: bool = False  # may be given several times: a list
    dest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dest", self.name.lstrip("-").replace("-", "_"))

    def default_for(self, script: str) -> Any:
        return self.default.get(script) if isinstance(self.default, dict) else self.default


FLAGS: tuple[Flag, ...] = (
    Flag("--prompt", "the prompt to render", nargs="?", default="a painting of a virus monster playing guitar"),
    Flag("--negative-prompt", "what to steer away from (replaces the empty unconditional prompt)", default="",
         image=True),
    Flag("--outdir", "dir to write results to", nargs="?",
         default={s: f"outputs/{s}-samples" for s in ("txt2img", "img2img")} | {"inpaint": "outputs/inpainting-samples"}),
    Flag("--skip_grid", "do not save a grid, only individual samples", type=None),
    Flag("--skip_save", "do not save individual samples (for speed measurements)", type=None),
    Flag("--ddim_steps", "number of sampling steps (1 to the model's 1000 timesteps)", type=int, default=50,
         check=between(1, 1000), image=True,
         key="steps"),
    Flag("--plms", "use plms sampling (same as --sampler plms)", type=None),
    Flag("--dpm_solver", "use dpm_solver sampling (same as --sampler dpm)", type=None),
    Flag("--sampler", f"sampler, by name or A1111 display name such as 'DPM++ 2M Karras' ({', '.join(SAMPLERS)}); "
         "default ddim", image=True, metavar="NAME"),
    Flag("--scheduler", f"noise schedule of the k-diffusion samplers ({', '.join(SCHEDULERS)}; A1111's labels too); "
         "automatic: the sampler's own", type=scheduler_name, default="automatic", image=True),
    Flag("--eta", "noise amount of the ancestral and SDE samplers (default 1.0; DDIM's is --ddim_eta)", type=float,
         check=finite(0.0), image=True, key="ancestral_eta"),
    Flag("--s_noise", "scale of the noise the ancestral and SDE samplers draw at each step", type=float,
         default=1.0, check=finite(0.0), image=True),
    Flag("--quantize-t", "feed the model the nearest integer timestep of each sigma (ComfyUI) instead of the "
         "interpolated one (k-diffusion, A1111)", type=None, image=True),
    Flag("--subseed", "variation seed: image k's noise is slerped towards that of subseed + k (A1111)", type=int,
         check=between(0, MAX_SEED), image=True),
    Flag("--subseed_strength", "how far towards the variation seed's noise (0: none, 1: all of it)", type=float,
         default=0.0, check=finite(0.0, 1.0), image=True),
    Flag("--laion400m", "uses the LAION400M model", type=None, scripts=("txt2img",)),
    Flag("--from-png", "re-make an image from the parameters in its PNG (this project's: the same pixels; an "
         "AUTOMATIC1111 one: its settings); flags given as well override them", scripts=("txt2img",),
         metavar="FILE"),
    Flag("--fixed_code", "use the same starting code (seeds) for every batch and iteration", type=None),
    Flag("--ddim_eta", "ddim eta (eta=0.0 corresponds to deterministic sampling)", type=float, default=0.0,
         check=finite(0.0), image=True, key="eta"),
    Flag("--n_iter", "sample this often", type=int, default={"txt2img": 2, "img2img": 1, "inpaint": 1},
         check=at_least(1)),
    Flag("--H", "image height, in pixel space", type=int, default=512, scripts=("txt2img",), image=True,
         key="height"),
    Flag("--W", "image width, in pixel space", type=int, default=512, scripts=("txt2img",), image=True,
         key="width"),
    Flag("--C", "latent channels", type=int, default=4),
    Flag("--f", "downsampling factor", type=int, default=8),
    Flag("--n_samples", "how many samples to produce for each given prompt, i.e. the batch size", type=int,
         default={"txt2img": 3, "img2img": 2, "inpaint": 2}, check=at_least(1)),
    Flag("--n_rows", "rows in the grid (0: n_samples)", type=int, default=0, check=at_least(0)),
    Flag("--scale", "unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))",
         type=float, default={"txt2img": 7.5, "img2img": 5.0, "inpaint": 7.5}, check=finite(), image=True),
    Flag("--from-file", "if specified, load prompts from this file, one per line"),
    Flag("--prompt-syntax", "a1111: AUTOMATIC1111's prompt language ((emphasis:1.2), [from:to:when], [a|b], BREAK, "
         "long prompts in 75-token chunks, <lora:name:weight>, embeddings); plain: the original's literal text, "
         "cut at 77 tokens", choices=("a1111", "plain"), default="a1111", image=True),
    Flag("--clip-skip", "1: the text encoder's last layer, as SD v1 was trained; 2: the penultimate (A1111's Clip "
         "skip)", type=int, default=1, check=between(1, 12), image=True),
    Flag("--embeddings-dir", "textual-inversion embeddings (.pt, .bin, .safetensors; the file name is the trigger "
         "word)", default="models/embeddings"),
    Flag("--lora", "PATH[:WEIGHT] or a name in --lora-dir: a LoRA merged into the weights (weight 1.0 by "
         "default); repeatable; prompts can also say <lora:name:weight>", repeat=True, image=True, key="loras",
         metavar="LORA"),
    Flag("--lora-dir", "folder of the LoRAs that <lora:name:weight> and --lora name", default="models/lora"),
    Flag("--vae", "an autoencoder file (or a name in --vae-dir) replacing the model's own", image=True,
         describe=lambda path: Path(path).name),
    Flag("--vae-dir", "folder of the VAEs --vae names", default="models/VAE"),
    Flag("--init-img", "path to the input image", scripts=WITH_IMAGE, image=True, key="init_img"),
    Flag("--mask", "path to the mask: white = repaint, black = keep", scripts=("inpaint",), image=True),
    Flag("--strength", "strength for noising/unnoising. 1.0 corresponds to full destruction of information in "
         "init image", type=float, default=0.75, check=finite(0.0, 1.0), scripts=("img2img",), image=True),
    Flag("--config", "path to config which constructs model", default=DEFAULT_CONFIG, image=True),
    Flag("--trust-config", "let the config's `target:` entries build anything, not only classes of ldm and "
         "torch (configs are code: only for configs you trust)", type=None),
    Flag("--ckpt", "path to checkpoint of model (.ckpt or .safetensors), or a bundled model's name (shapes)",
         default=DEFAULT_CKPT, image=True, key="model", describe=lambda path: Path(path).name),
    Flag("--seed", "the seed (for reproducible sampling); image k gets seed + k; -1 picks one at random",
         type=int, default=42, check=between(-1, MAX_SEED)),
    Flag("--precision", "evaluate at this precision: full (fp32), autocast (fp16 on GPUs, bf16 on the CPU) or "
         "auto: autocast on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX), else full; the metadata records "
         "what ran", choices=("auto", "full", "autocast"), default="auto", image=True),
    Flag("--device", "where to run (auto: cuda, then mps, then cpu)", choices=("auto", "cuda", "mps", "cpu"),
         default="auto"),
    Flag("--safety-checker", "path of a local CompVis/stable-diffusion-safety-checker (default: the HF cache)"),
    Flag("--no-safety-checker", "do not run the safety checker", type=None),
    Flag("--vae-tiling", "decode (and encode) block by block in windows, with the whole image's GroupNorm "
         "statistics: about half the memory at 1024 px, the same image up to float rounding", type=None,
         image=True),
    Flag("--attention-chunk", "compute attention N queries at a time (same result, less memory for very large "
         "images)", type=int, check=at_least(1), metavar="N"),
    Flag("--lowvram", "keep only the module in use (text encoder, UNet, VAE) on the GPU (on the CPU only the "
         "module in use stays resident anyway)", type=None),
    Flag("--threads", "CPU threads for torch (default: the CPUs this process may use; fewer when other "
         "processes keep cores busy, since oversubscribed threads run several times slower: a hint says when)",
         type=int, check=at_least(1)),
    Flag("--memory-limit", "memory (GiB) a run may use: sizes whose estimated peak clearly exceeds it are refused "
         "before the model loads (default: what the machine or GPU has free)", type=float, check=finite(0.0),
         metavar="GIB"),
    Flag("--compile", "torch.compile the UNet (the first step then includes compiling)", type=None),
    Flag("--backend", "torch: this project's own layers; openvino: the UNet and VAE decoder as OpenVINO models on "
         "the CPU (pip install .[openvino]; the first run converts them into ~/.cache/stable-diffusion/openvino, "
         "later runs load them from there)", choices=("torch", "openvino"), default="torch", image=True),
    Flag("--max-pixels", "refuse input images with more pixels than this (2048x2048 by default)", type=int,
         default=DEFAULT_MAX_PIXELS, check=at_least(1), scripts=WITH_IMAGE, image=True),
    Flag("--no-vae-tiling", f"never tile the VAE (by default it is tiled on the CPU from {TILED_VAE_FROM} px on a "
         "side when the untiled decode would not fit in memory)", type=None, image=True),
    Flag("--hr-scale", "hires fix: render at --W x --H, upscale by this factor and refine with an img2img pass "
         "(A1111's Hires upscale)", type=float, check=finite(1.0), scripts=("txt2img",), image=True),
    Flag("--hr-width", "hires fix: the final width (instead of --hr-scale; alone, the aspect ratio is kept)",
         type=int, check=at_least(8), scripts=("txt2img",), image=True),
    Flag("--hr-height", "hires fix: the final height (instead of --hr-scale; alone, the aspect ratio is kept)",
         type=int, check=at_least(8), scripts=("txt2img",), image=True),
    Flag("--hr-upscaler", "hires fix: latent* upscale the latents (latent: A1111's 'Latent', bilinear); lanczos "
         "and nearest decode, upscale the pixels and encode (default latent)", choices=tuple(UPSCALERS),
         scripts=("txt2img",), image=True),
    Flag("--hr-steps", "hires fix: sampler steps of the second pass (default: --ddim_steps)", type=int,
         check=between(1, 1000), scripts=("txt2img",), image=True),
    Flag("--hr-strength", "hires fix: denoising strength of the second pass (A1111's Denoising strength; "
         "default 0.7)", type=float, check=positive_strength, scripts=("txt2img",), image=True),
    Flag("--hr-sampler", "hires fix: the second pass's sampler (default: --sampler's)", scripts=("txt2img",),
         image=True, metavar="NAME"),
    Flag("--hr-prompt", "hires fix: the second pass's prompt (default: --prompt)", scripts=("txt2img",),
         image=True),
    Flag("--hr-negative-prompt", "hires fix: the second pass's negative prompt (default: --negative-prompt)",
         scripts=("txt2img",), image=True),
    Flag("--scale-by", "upscale the input by this factor, then refine it (the result's size)", type=float,
         check=finite(0.05), scripts=("img2img",), image=True),
    Flag("--W", "the result's width (default: the input's; alone, the aspect ratio is kept)", type=int,
         check=at_least(8), scripts=("img2img",), image=True, key="target_width"),
    Flag("--H", "the result's height (default: the input's; alone, the aspect ratio is kept)", type=int,
         check=at_least(8), scripts=("img2img",), image=True, key="target_height"),
    Flag("--outpaint", "extend the image: SIDE=PIXELS pairs, e.g. left=128,top=64 (multiples of 8); the new "
         "border is painted, the image's own pixels are kept exactly (--mask optional)", type=outpaint_flag,
         scripts=("inpaint",), image=True, metavar="SIDES"),
)  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`), exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default."""


def build_parser(script: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of `script` ("txt2img", "img2img" or "inpaint") from `FLAGS`."""
    parser = OneLineParser(description=description, formatter_class=HelpFormatter)
    for flag in FLAGS:
        if script not in flag.scripts:
            continue
        default = flag.default_for(script)
        if flag.type is None:
            parser.add_argument(flag.name, action="store_true", help=flag.help)
            continue
        kwargs = {"nargs": flag.nargs, "metavar": flag.metavar, "choices": flag.choices}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if flag.repeat:
            kwargs["action"] = "append"
        parser.add_argument(flag.name, type=flag.type, default=default, help=flag.help, **kwargs)
    return parser


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


def parse_args(script: str, description: str | None, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check `script`'s flags: every table check, the sampler choice; bundled model names resolved.
    With --from-png, the image's own flags come first and the ones given override them."""
    parser = build_parser(script, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = parser.parse_args(argv)
    if getattr(opt, "from_png", None):
        opt = parser.parse_args([*png_flags(opt.from_png, script), *argv])
    for flag in FLAGS:
        value = getattr(opt, flag.dest, None)
        problem = flag.check(value) if flag.check is not None and value is not None else None
        if problem:
            raise UserError(f"{flag.name} {problem}, got {value}")
    opt.sampler = choose_sampler(opt)
    check_backend(opt)
    if opt.seed == -1:
        opt.seed = random.randrange(2**32)
        print(f"seed -1: picked seed {opt.seed}")
    check_output_folder(opt.outdir)
    return apply_bundled_model(opt, parser)


# AUTOMATIC1111 infotext fields -> our flags (values as written); Size and the sampler name are handled apart
A1111_FLAGS = {"Steps": "--ddim_steps", "CFG scale": "--scale", "Seed": "--seed", "Clip skip": "--clip-skip",
               "Variation seed": "--subseed", "Variation seed strength": "--subseed_strength", "Eta": "--eta",
               "Eta DDIM": "--ddim_eta", "Schedule type": "--scheduler"}  # fmt: skip
A1111_HIRES_FLAGS = {"Hires upscale": "--hr-scale", "Hires steps": "--hr-steps", "Hires resize-1": "--hr-width",
                     "Hires resize-2": "--hr-height", "Hires sampler": "--hr-sampler", "Hires prompt": "--hr-prompt",
                     "Hires negative prompt": "--hr-negative-prompt"}  # fmt: skip
A1111_HONOURED = {
    *A1111_FLAGS,
    *A1111_HIRES_FLAGS,
    "Prompt",
    "Negative prompt",
    "Sampler",
    "Size",
    "Model hash",
    "Model",
    "Version",
}


def png_flags(path: str, script: str) -> list[str]:
    """The flags that re-make the image in PNG `path`: its re-make command's (this project's images), or those
    mapped from A1111's infotext (what cannot be honoured is named, not dropped silently)."""
    from ldm.infotext import read_png_parameters

    try:
        record = read_png_parameters(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--from-png {path}: not a readable PNG ({error})") from None
    if "remake" in record:
        words = shlex.split(record["remake"])
        if words[1] != f"scripts/{script}.py":
            raise UserError(f"--from-png {path} was made by {words[1]}: re-make it with that script")
        return words[2:]
    if "Prompt" not in record or "Steps" not in record:
        raise UserError(
            f"--from-png {path} holds no generation parameters (no infotext): pass a generated image"
        )
    flags = ["--prompt", record["Prompt"], "--negative-prompt", record.get("Negative prompt", "")]
    if "Sampler" in record:
        flags += ["--sampler", record["Sampler"]]
    if "Size" in record:
        width, _, height = record["Size"].partition("x")
        flags += ["--W", width, "--H", height]
    for key, flag in A1111_FLAGS.items():
        if key in record:
            flags += [flag, record[key]]
    honoured = set(A1111_HONOURED)
    if any(key in record for key in A1111_HIRES_FLAGS):  # a hires fix: the size above is its first pass
        from ldm.hires import UPSCALERS

        flags += [arg for key, flag in A1111_HIRES_FLAGS.items() if record.get(key, "0") != "0"
                  for arg in (flag, record[key])]  # fmt: skip
        if "Denoising strength" in record:
            flags += ["--hr-strength", record["Denoising strength"]]
            honoured.add("Denoising strength")
        upscaler = {a1111: ours for ours, (a1111, *_) in UPSCALERS.items()}.get(
            record.get("Hires upscaler", "")
        )
        if upscaler is not None:
            flags += ["--hr-upscaler", upscaler]
            honoured.add("Hires upscaler")
    ignored = [key for key in record if key not in honoured]
    if ignored:
        print(f"note: --from-png: {', '.join(ignored)} cannot be honoured here and are ignored")
    if "Model hash" in record:
        print(
            f"note: --from-png: the image was made with model hash {record['Model hash']}: pass that --ckpt"
        )
    return flags


def check_backend(opt: argparse.Namespace) -> None:
    """--backend openvino: OpenVINO installed, the CPU (what --device auto then picks), no torch-only flags."""
    if opt.backend != "openvino":
        return
    if opt.device not in ("auto", "cpu"):
        raise UserError(
            f"--backend openvino runs on the CPU: drop --device {opt.device} or use --backend torch"
        )
    for flag, given in (("--compile", opt.compile), ("--attention-chunk", opt.attention_chunk is not None)):
        if given:
            raise UserError(f"{flag} is for --backend torch (OpenVINO compiles its own models): drop {flag}")
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise UserError("--backend openvino needs OpenVINO: pip install .[openvino]") from None
    opt.device = "cpu"


def choose_sampler(opt: argparse.Namespace) -> str:
    """The registry name from --sampler / --plms / --dpm_solver (default ddim); conflicting flags are an error.
    A combined A1111 name ("DPM++ 2M Karras") also sets --scheduler when that was left automatic."""
    flagged = [name for name, on in (("plms", opt.plms), ("dpm", opt.dpm_solver)) if on]
    if opt.sampler is not None:
        try:
            name, scheduler = split_sampler_name(opt.sampler)
        except ValueError as error:
            raise UserError(f"--sampler: {error}") from None
        if scheduler is not None and opt.scheduler == "automatic":
            opt.scheduler = scheduler
        flagged.append(name)
    if len(set(flagged)) > 1:
        raise UserError(
            f"conflicting sampler flags ({', '.join(sorted(set(flagged)))}): choose one with --sampler"
        )
    return flagged[0] if flagged else "ddim"


def check_sampler_options(opt: argparse.Namespace) -> None:
    """What the chosen sampler can do (asks its capabilities, which imports it)."""
    from ldm.models.diffusion.registry import sampler_class

    sampler = sampler_class(opt.sampler)
    scheduled = sampler.default_scheduler is not None  # the k-diffusion family
    if opt.ddim_eta != 0.0 and (scheduled or not sampler.uses_eta):
        hint = "use --eta" if scheduled and sampler.uses_eta else f"{opt.sampler} is deterministic"
        raise UserError(f"--ddim_eta {opt.ddim_eta} needs a sampler that takes eta (ddim): {hint}")
    if not scheduled:
        for flag, value, unset in (
            ("--scheduler", opt.scheduler, "automatic"),
            ("--eta", opt.eta, None),
            ("--s_noise", opt.s_noise, 1.0),
            ("--quantize-t", opt.quantize_t, False),
        ):
            if value != unset:
                raise UserError(
                    f"{flag} is for the k-diffusion samplers (euler, dpmpp_2m, ...), not {opt.sampler}"
                )
        return
    if opt.eta is not None and not sampler.uses_eta:
        raise UserError(f"--eta {opt.eta} needs an ancestral or SDE sampler: {opt.sampler} is deterministic")
    if opt.scheduler == "automatic":
        opt.scheduler = sampler.default_scheduler  # recorded as run


def check_memory(opt: argparse.Namespace, height: int, width: int) -> None:
    """Refuse an image size whose estimated peak memory clearly exceeds what the device has (see
    ldm.runtime.budget), before the model loads."""
    from ldm.loading import resolve_path
    from ldm.runtime.budget import check_fits, file_bytes

    device = opt.device if opt.device != "auto" else _auto_device_type()
    check_fits(
        height, width, opt.n_samples, guided=opt.scale != 1.0, tiled=opt.vae_tiling,
        weights=file_bytes(resolve_path(opt.ckpt)), device_type=device, limit_gib=opt.memory_limit,
    )  # fmt: skip


def _auto_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_prompt_options(opt: argparse.Namespace, batches: list[list[str]]) -> None:
    """The prompt language's options and the files they name (LoRAs, VAE, embeddings), before loading."""
    from ldm.adapters.lora import find_lora, parse_lora_arg
    from ldm.adapters.vae import find_vae

    if opt.prompt_syntax == "plain" and opt.clip_skip != 1:
        raise UserError("--clip-skip needs --prompt-syntax a1111 (plain is the original text encoding)")
    if opt.embeddings_dir != "models/embeddings" and not Path(opt.embeddings_dir).is_dir():
        raise UserError(
            f"--embeddings-dir {opt.embeddings_dir} is not a folder: pass the folder of the embeddings"
        )
    for value in opt.lora or []:
        find_lora(parse_lora_arg(value)[0], opt.lora_dir)
    if opt.prompt_syntax == "a1111":
        from ldm.prompts import lora_tags

        for name, _ in lora_tags([p for batch in batches for p in batch]):
            find_lora(name, opt.lora_dir)
    if opt.vae is not None:
        find_vae(opt.vae, opt.vae_dir)


def read_prompts(opt: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts: n_samples copies of --prompt, or the file's lines in batches of n_samples
    (the last batch may be smaller)."""
    if not opt.from_file:
        batches = [opt.n_samples * [opt.prompt]]
    else:
        batches = _read_prompt_file(opt.from_file, opt.n_samples)
    images = opt.n_samples if opt.fixed_code else opt.n_iter * sum(len(batch) for batch in batches)
    if opt.seed + images - 1 > MAX_SEED:
        raise UserError(
            f"--seed {opt.seed}: the run's {images} images would need seeds up to {opt.seed + images - 1}, "
            f"past the largest seed {MAX_SEED}: pass a smaller --seed"
        )
    return batches


def _read_prompt_file(name: str, n_samples: int) -> list[list[str]]:
    """The file's non-empty lines (UTF-8, a byte-order mark dropped) in batches of n_samples."""
    path = Path(name)
    if not path.is_file():
        raise UserError(
            f"prompt file {name} not found: pass --from-file with a text file, one prompt per line"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"prompt file {name} is not UTF-8 text (byte {error.start}: {data[error.start : error.start + 1]!r}): "
            "save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {name} has no prompts: write one prompt per line")
    return [prompts[i : i + n_samples] for i in range(0, len(prompts), n_samples)]


def image_flags(script: str) -> list[Flag]:
    return [flag for flag in FLAGS if flag.image and script in flag.scripts]


def recorded_parameters(script: str, opt: argparse.Namespace) -> dict:
    """The metadata of the flags that change the image: {key: value} (None and unset switches left out)."""
    params = {}
    for flag in image_flags(script):
        value = getattr(opt, flag.dest, None)  # options built for another script may lack this one's flags
        if value is None:
            continue
        params[flag.key or flag.dest] = flag.describe(value) if flag.describe else value
    return params


def _flag_args(flag: Flag, value: Any) -> list[str]:
    """`value` of `flag` as command-line arguments (none for an unset switch, an empty text or list)."""
    if value is None or value is False or value == "":
        return []
    if value is True:
        return [flag.name]
    if isinstance(value, list):
        return [arg for item in value for arg in (flag.name, str(item))]
    return [flag.name, str(value)]


def remake_command(script: str, opt: argparse.Namespace, prompt: str, seed: int, n_samples: int) -> str:
    """The command that re-makes an image (or its batch) alone: the flags that change the image, as set."""
    args = ["python", f"scripts/{script}.py", "--prompt", prompt, "--seed", str(seed),
            "--n_samples", str(n_samples), "--n_iter", "1"]  # fmt: skip
    for flag in image_flags(script):
        args += _flag_args(flag, getattr(opt, flag.dest, None))
    return shlex.join(args)


# the fresh memory of the first UNet step on the CPU (its packed weights), per byte of the checkpoint: bf16 at 512²
# 0.55 (2.35 GB of a 4.27 GB fp32 checkpoint), 256² 0.44; an fp32 step takes 1.33, and finds this part warm
WARM_BYTES_PER_CHECKPOINT_BYTE = 0.55
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/kfd")  # CUDA's and ROCm's: --device auto would pick the GPU


def warm_heap_for(opt: argparse.Namespace) -> bool:
    """Start faulting in the heap of the first UNet step (`ldm.heap.warm_heap`) on the core the imports leave idle,
    for a CPU run (by --device, or auto without a GPU) of the torch backend with more than one CPU: about
    WARM_BYTES_PER_CHECKPOINT_BYTE of the checkpoint, at most a quarter of the free memory."""
    gpu = opt.device == "auto" and any(Path(name).exists() for name in GPU_DEVICE_FILES)
    if opt.device not in ("auto", "cpu") or gpu or getattr(opt, "backend", "torch") != "torch":
        return False
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        return False
    try:
        ckpt_bytes = resolve_path(opt.ckpt).stat().st_size
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return False
    return warm_heap(min(int(WARM_BYTES_PER_CHECKPOINT_BYTE * ckpt_bytes), free // 4))


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and its exit status.

    After a run, the garbage collector is frozen: the interpreter's collections at exit would otherwise traverse
    every object that torch, torchvision and transformers created (see BENCHMARKS.md); the OS frees the memory
    either way. A heap still being warmed (`warm_heap_for`) is freed."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    finally:
        release_warm_heap()  # a run refused before its first step (or run in-process) leaves no block behind
    gc.freeze()

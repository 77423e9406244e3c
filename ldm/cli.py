"""The generation scripts' command line: every flag declared once, in `FLAGS`, with its type, default, help,
check and whether it changes the image. argparse, the checks, the PNG metadata and the re-make command are
derived from that table. Importing this module does not import torch, so `--help` and refused flags answer at
once; the pipeline is imported only when there is work to do."""

import argparse
import gc
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.loading import DEFAULT_CKPT, DEFAULT_CONFIG
from ldm.models.diffusion.registry import SAMPLERS, canonical_name

SCRIPTS = ("txt2img", "img2img", "inpaint")
WITH_IMAGE = ("img2img", "inpaint")
DEFAULT_MAX_PIXELS = 2048 * 2048  # input images larger than this are refused unless --max-pixels says more

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


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


def sampler_name(value: str) -> str:
    """argparse type of --sampler: a registry name or alias, normalized to the registry name."""
    try:
        return canonical_name(value)
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
    Flag("--ddim_steps", "number of sampling steps", type=int, default=50, check=at_least(1), image=True,
         key="steps"),
    Flag("--plms", "use plms sampling (same as --sampler plms)", type=None),
    Flag("--dpm_solver", "use dpm_solver sampling (same as --sampler dpm)", type=None),
    Flag("--sampler", f"sampler, by name or A1111 display name ({', '.join(SAMPLERS)}); default ddim",
         type=sampler_name, image=True, metavar="NAME"),
    Flag("--laion400m", "uses the LAION400M model", type=None, scripts=("txt2img",)),
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
    Flag("--init-img", "path to the input image", scripts=WITH_IMAGE, image=True, key="init_img"),
    Flag("--mask", "path to the mask: white = repaint, black = keep", scripts=("inpaint",), image=True),
    Flag("--strength", "strength for noising/unnoising. 1.0 corresponds to full destruction of information in "
         "init image", type=float, default=0.75, check=finite(0.0, 1.0), scripts=("img2img",), image=True),
    Flag("--config", "path to config which constructs model", default=DEFAULT_CONFIG, image=True),
    Flag("--ckpt", "path to checkpoint of model (.ckpt or .safetensors), or a bundled model's name (shapes)",
         default=DEFAULT_CKPT, image=True, key="model", describe=lambda path: Path(path).name),
    Flag("--seed", "the seed (for reproducible sampling); image k gets seed + k", type=int, default=42),
    Flag("--precision", "evaluate at this precision: full (fp32), autocast (fp16 on GPUs, bf16 on the CPU) or "
         "auto: autocast on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX), else full; the metadata records "
         "what ran", choices=("auto", "full", "autocast"), default="auto", image=True),
    Flag("--device", "where to run (auto: cuda, then mps, then cpu)", choices=("auto", "cuda", "mps", "cpu"),
         default="auto"),
    Flag("--safety-checker", "path of a local CompVis/stable-diffusion-safety-checker (default: the HF cache)"),
    Flag("--no-safety-checker", "do not run the safety checker", type=None),
    Flag("--vae-tiling", "decode (and encode) in overlapping 64x64-latent tiles, blended: large images in "
         "bounded memory (changes pixels when the latent is larger than one tile)", type=None, image=True),
    Flag("--attention-chunk", "compute attention N queries at a time (same result, less memory for very large "
         "images)", type=int, check=at_least(1), metavar="N"),
    Flag("--lowvram", "keep only the module in use (text encoder, UNet, VAE) on the GPU (on the CPU only the "
         "module in use stays resident anyway)", type=None),
    Flag("--threads", "CPU threads for torch (default: the CPUs this process may use; fewer when other "
         "processes keep cores busy, since oversubscribed threads run several times slower: a hint says when)",
         type=int, check=at_least(1)),
    Flag("--compile", "torch.compile the UNet (the first step then includes compiling)", type=None),
    Flag("--max-pixels", "refuse input images with more pixels than this (2048x2048 by default)", type=int,
         default=DEFAULT_MAX_PIXELS, check=at_least(1), scripts=WITH_IMAGE, image=True),
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
    """Parse and check `script`'s flags: every table check, the sampler choice; bundled model names resolved."""
    parser = build_parser(script, description)
    opt = parser.parse_args(argv)
    for flag in FLAGS:
        value = getattr(opt, flag.dest, None)
        problem = flag.check(value) if flag.check is not None and value is not None else None
        if problem:
            raise UserError(f"{flag.name} {problem}, got {value}")
    opt.sampler = choose_sampler(opt)
    return apply_bundled_model(opt, parser)


def choose_sampler(opt: argparse.Namespace) -> str:
    """The registry name from --sampler / --plms / --dpm_solver (default ddim); conflicting flags are an error."""
    flagged = [name for name, on in (("plms", opt.plms), ("dpm", opt.dpm_solver)) if on]
    if opt.sampler is not None:
        flagged.append(opt.sampler)
    if len(set(flagged)) > 1:
        raise UserError(
            f"conflicting sampler flags ({', '.join(sorted(set(flagged)))}): choose one with --sampler"
        )
    return flagged[0] if flagged else "ddim"


def check_sampler_options(opt: argparse.Namespace) -> None:
    """What the chosen sampler can do (asks its capabilities, which imports it)."""
    from ldm.models.diffusion.registry import sampler_class

    sampler = sampler_class(opt.sampler)
    if opt.ddim_eta != 0.0 and not sampler.uses_eta:
        raise UserError(
            f"--ddim_eta {opt.ddim_eta} needs a sampler that takes eta (ddim): {opt.sampler} is deterministic"
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


def image_flags(script: str) -> list[Flag]:
    return [flag for flag in FLAGS if flag.image and script in flag.scripts]


def recorded_parameters(script: str, opt: argparse.Namespace) -> dict:
    """The metadata of the flags that change the image: {key: value} (None and unset switches left out)."""
    params = {}
    for flag in image_flags(script):
        value = getattr(opt, flag.dest)
        if value is None:
            continue
        params[flag.key or flag.dest] = flag.describe(value) if flag.describe else value
    return params


def remake_command(script: str, opt: argparse.Namespace, prompt: str, seed: int, n_samples: int) -> str:
    """The command that re-makes an image (or its batch) alone: the flags that change the image, as set."""
    args = ["python", f"scripts/{script}.py", "--prompt", prompt, "--seed", str(seed),
            "--n_samples", str(n_samples), "--n_iter", "1"]  # fmt: skip
    for flag in image_flags(script):
        value = getattr(opt, flag.dest)
        if value is None or value is False or value == "":
            continue
        args += [flag.name] if value is True else [flag.name, str(value)]
    return shlex.join(args)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and its exit status.

    After a run, the garbage collector is frozen: the interpreter's collections at exit would otherwise traverse
    every object that torch, torchvision and transformers created (see BENCHMARKS.md); the OS frees the memory
    either way."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    gc.freeze()

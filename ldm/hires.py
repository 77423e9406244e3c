"""Bigger pictures, the options side: A1111's hires fix (txt2img at the model's size, upscaled, refined by an
img2img pass), img2img upscaling, outpainting borders and when the VAE runs tiled. Nothing here imports torch:
the scripts check these options before anything loads."""

import argparse
from dataclasses import dataclass, replace
from typing import Any

from ldm.errors import UserError

# --hr-upscaler -> (A1111's name, torch interpolate mode or None for a pixel upscaler, antialias)
UPSCALERS: dict[str, tuple[str, str | None, bool]] = {
    "latent": ("Latent", "bilinear", False),
    "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": ("Latent (nearest)", "nearest", False),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False),
    "lanczos": ("Lanczos", None, False),
    "nearest": ("Nearest", None, False),
}
# on the CPU the VAE may run tiled from this many pixels on a side (`decide_vae_tiling`)
TILED_VAE_FROM = 1024
SIDES = ("left", "right", "top", "bottom")
SECOND_PASS_FLAGS = (
    "hr_upscaler",
    "hr_steps",
    "hr_strength",
    "hr_sampler",
    "hr_prompt",
    "hr_negative_prompt",
)


@dataclass(frozen=True)
class Hires:
    """The second pass of a hires fix: the final size, how to upscale, and its img2img settings."""

    width: int
    height: int
    upscaler: str  # an UPSCALERS key
    steps: int  # sampler steps the second pass runs
    strength: float  # A1111's denoising strength in (0, 1]
    sampler: str | None  # None: the first pass's
    prompt: str | None  # None: the first pass's
    negative_prompt: str | None  # None: the first pass's
    scheduler: str | None = None  # the second pass's k-diffusion schedule (see resolve_hires_sampler)

    @property
    def schedule_steps(self) -> int:
        """The length of the schedule whose last `steps` steps the second pass runs: A1111's fixed-steps rule
        (setup_img2img_steps with steps given), int(steps / min(strength, 0.999))."""
        return max(self.steps, int(self.steps / min(self.strength, 0.999)))


def hires_options(opt: argparse.Namespace, multiple: int) -> Hires | None:
    """The hires fix asked for by --hr-scale or --hr-width/--hr-height (None without them), checked: the final
    size a multiple of `multiple` and larger than --W x --H."""
    sized = opt.hr_width is not None or opt.hr_height is not None
    if opt.hr_scale is None and not sized:
        for flag in SECOND_PASS_FLAGS:
            if getattr(opt, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} is for the hires fix: add --hr-scale 2")
        return None
    if opt.hr_scale is not None and sized:
        raise UserError("--hr-scale and --hr-width/--hr-height both set the hires size: pass one of them")
    if sized:  # a missing side keeps the aspect ratio, as A1111's hr_resize_x/y
        width = opt.hr_width or round(opt.hr_height * opt.W / opt.H / multiple) * multiple
        height = opt.hr_height or round(opt.hr_width * opt.H / opt.W / multiple) * multiple
    else:
        width, height = round(opt.W * opt.hr_scale), round(opt.H * opt.hr_scale)
    if width % multiple or height % multiple:
        raise UserError(
            f"the hires size {width}x{height} is not a multiple of {multiple}: pick a scale or "
            f"--hr-width/--hr-height that give multiples of {multiple}"
        )
    if width < opt.W or height < opt.H:
        raise UserError(f"the hires size {width}x{height} is smaller than --W/--H {opt.W}x{opt.H}: scale up")
    return Hires(
        width, height, opt.hr_upscaler or "latent", opt.hr_steps or opt.ddim_steps,
        0.7 if opt.hr_strength is None else opt.hr_strength, opt.hr_sampler, opt.hr_prompt, opt.hr_negative_prompt,
    )  # fmt: skip


def resolve_hires_sampler(hires: Hires, opt: argparse.Namespace) -> Hires:
    """`hires` with --hr-sampler as a registry name (an A1111 name such as 'DPM++ 2M Karras' also sets its
    schedule) and the second pass's schedule: --scheduler when the first pass has one, else the sampler's own.
    Call after ldm.cli.check_sampler_options."""
    from ldm.models.diffusion.registry import sampler_class, split_sampler_name

    name, scheduler = opt.sampler, None
    if hires.sampler is not None:
        try:
            name, scheduler = split_sampler_name(hires.sampler)
        except ValueError as error:
            raise UserError(f"--hr-sampler: {error}") from None
    default = sampler_class(name).default_scheduler
    if default is None:  # the DDIM family: no schedule
        return replace(hires, sampler=name if hires.sampler else None, scheduler=None)
    if scheduler is None:
        scheduler = opt.scheduler if opt.scheduler != "automatic" else default
    return replace(hires, sampler=name if hires.sampler else None, scheduler=scheduler)


def positive_strength(value: float) -> str | None:
    """--hr-strength's check: a denoising strength in (0, 1]."""
    return None if 0.0 < value <= 1.0 else "must be in (0, 1] (0 would skip the second pass)"


def hires_record(hires: Hires) -> dict:
    """The metadata of the second pass as run (defaults filled in; the first pass's is the run's own)."""
    record = {"hr_width": hires.width, "hr_height": hires.height, "hr_upscaler": hires.upscaler,
              "hr_steps": hires.steps, "hr_strength": hires.strength, "hr_sampler": hires.sampler,
              "hr_prompt": hires.prompt, "hr_negative_prompt": hires.negative_prompt}  # fmt: skip
    return {key: value for key, value in record.items() if value is not None}


def scaled_size(opt: argparse.Namespace, width: int, height: int, multiple: int) -> tuple[int, int] | None:
    """img2img's result size from --scale-by or --W/--H (a missing side keeps the input's aspect ratio), a
    multiple of `multiple`; None when neither is given."""
    if opt.scale_by is not None and (opt.W or opt.H):
        raise UserError("--scale-by and --W/--H both set the result's size: pass one of them")
    if opt.scale_by is not None:
        target = (width * opt.scale_by, height * opt.scale_by)
    elif opt.W or opt.H:
        target = (opt.W or opt.H * width / height, opt.H or opt.W * height / width)
    else:
        return None
    return tuple(max(multiple, round(side / multiple) * multiple) for side in target)


def parse_outpaint(value: str) -> dict[str, int]:
    """argparse type of --outpaint: "left=128,right=0,top=64,bottom=0" (sides left out are 0) -> {side: px},
    each a multiple of 8."""
    border = dict.fromkeys(SIDES, 0)
    for item in value.split(","):
        side, _, pixels = item.strip().partition("=")
        if side not in border or not pixels.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"{value!r}: write SIDE=PIXELS pairs separated by commas, sides {', '.join(SIDES)}"
            )
        border[side] = int(pixels)
    bad = [side for side, pixels in border.items() if pixels % 8]
    if bad:
        raise argparse.ArgumentTypeError(f"{value!r}: {', '.join(bad)} must be multiples of 8")
    if not any(border.values()):
        raise argparse.ArgumentTypeError(f"{value!r}: give at least one side more than 0 pixels")
    return border


def outpaint_flag(value: str) -> str:
    """argparse type of --outpaint: the value checked and written out in full ("left=128,right=0,top=0,...")."""
    border = parse_outpaint(value)
    return ",".join(f"{side}={border[side]}" for side in SIDES)


def decide_vae_tiling(opt: Any, height: int, width: int) -> None:
    """Set `opt.vae_tiling` for a run whose largest image is height x width: on when asked; otherwise on the
    CPU from TILED_VAE_FROM pixels on a side when the untiled decode of the batch would not fit in the memory
    there is (`untiled_decode_fits`: tiling costs 2-3x the decode time), unless --no-vae-tiling."""
    if opt.vae_tiling and opt.no_vae_tiling:
        raise UserError("--vae-tiling and --no-vae-tiling contradict each other: pass one")
    if opt.vae_tiling or opt.no_vae_tiling or max(height, width) < TILED_VAE_FROM:
        return
    import torch

    from ldm.loading import resolve_path
    from ldm.runtime.budget import file_bytes, untiled_decode_fits

    on_cpu = opt.device == "cpu" or (
        opt.device == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if not on_cpu:
        return
    weights = file_bytes(resolve_path(opt.ckpt))
    if untiled_decode_fits(height * width, opt.n_samples, weights, opt.memory_limit):
        return
    opt.vae_tiling = True
    print(
        f"{width}x{height} x {opt.n_samples} on the CPU: the VAE runs tiled, its untiled decode would not fit in "
        "the memory there is (--no-vae-tiling: untiled anyway)"
    )

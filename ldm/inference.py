"""What every generation script needs: device and precision, model loading, samplers, seeded noise, and the
latent-space steps of img2img and inpainting."""

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.bf16 import Bf16ProductsInFp32, cpu_has_fast_bf16
from ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
INPAINTING_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"
SAMPLERS = ("ddim", "plms", "dpm")


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and its exit status.

    After a run, the garbage collector is frozen: the interpreter's collections at exit would otherwise traverse
    every object that torch, torchvision and transformers created, ~2 s of wall time after the last image is
    written (see BENCHMARKS.md); the OS frees the memory either way."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    gc.freeze()


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        raise UserError(f"--device {name} is not available on this machine: use --device auto or cpu")
    return torch.device(name)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """Default precision: autocast (fp16) on CUDA, full (fp32) elsewhere."""
    if precision is not None:
        return precision
    return "autocast" if device.type == "cuda" else "full"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision on a device: fp16 on GPUs, bf16 on the CPU, None for full."""
    if precision == "full":
        return None
    return torch.bfloat16 if device.type == "cpu" else torch.float16


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast at the precision's dtype; on a CPU without bf16 units the bf16 products run in fp32
    (`ldm.bf16`), 100-400x faster than torch's fallback kernels there."""
    dtype = autocast_dtype(precision, device)
    with contextlib.ExitStack() as scope:
        if dtype is not None:
            scope.enter_context(torch.autocast(device.type, dtype=dtype))
        if dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            scope.enter_context(Bf16ProductsInFp32())
        yield


def resolve_path(path: str) -> Path:
    """A path as given if it exists, else relative to the project root (so scripts run from anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return ROOT / candidate


def load_config(path: str):
    config_path = resolve_path(path)
    if not config_path.is_file():
        raise UserError(f"config file {path} not found: pass --config with the path of a model's YAML config")
    return OmegaConf.load(config_path)


def check_checkpoint(ckpt: str) -> Path:
    """The checkpoint's path, or a UserError that says where to get and put the SD v1 weights."""
    path = resolve_path(ckpt)
    if path.is_file():
        return path
    if Path(ckpt) == Path(DEFAULT_CKPT):
        raise UserError(
            f"no checkpoint at {DEFAULT_CKPT}: download sd-v1-4.ckpt (huggingface.co/CompVis/"
            "stable-diffusion-v-1-4-original, after accepting its license) and save it there, pass --ckpt PATH, "
            "or try the small model that ships with the project: --ckpt shapes"
        )
    raise UserError(f"checkpoint {ckpt} not found: pass --ckpt with the path of a .ckpt or .safetensors file")


def size_multiple(config) -> int:
    """Image sides must be multiples of this: the autoencoder's factor times the UNet's downsampling."""
    params = config.model.params
    first_stage = params.first_stage_config.get("params", {})
    ch_mult = first_stage.get("ddconfig", {}).get("ch_mult", [1])
    unet_mult = params.unet_config.params.get("channel_mult", [1])
    return 2 ** (len(ch_mult) - 1) * 2 ** (len(unet_mult) - 1)


def check_image_size(height: int, width: int, multiple: int) -> None:
    for flag, side in (("--H", height), ("--W", width)):
        if side <= 0 or side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise UserError(
                f"{flag} {side} is not a multiple of {multiple}, which this model needs: "
                f"use {lower} or {lower + multiple}"
            )


def load_model(config, ckpt: Path, device: torch.device):
    """The LatentDiffusion model of `config` with the weights of `ckpt`, in eval mode on `device`."""
    from ldm.checkpoint import CheckpointError, load_model_from_config

    try:
        return load_model_from_config(config, str(ckpt), device=device)
    except CheckpointError as error:
        message = str(error)
        if message.startswith("model.diffusion_model.input_blocks.0.0.weight") and ", 9, " in message:
            message += f": this is an inpainting checkpoint, pass --config {INPAINTING_CONFIG}"
        raise UserError(message) from None


def make_sampler(name: str, model):
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler

        return PLMSSampler(model)
    if name == "dpm":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler

        return DPMSolverSampler(model)
    from ldm.models.diffusion.ddim import DDIMSampler

    return DDIMSampler(model)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the image's own seed: a seed gives the same draws on every
    device and whatever else is in the batch."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def draw_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Standard normal noise [len(generators), *shape], entry i drawn from generators[i]."""
    noise = [torch.randn(tuple(shape), generator=generator) for generator in generators]
    return torch.stack(noise).to(device)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """x_T [len(seeds), *shape]: image i's noise is the first draw of its own seed's generator."""
    return draw_noise(seed_generators(seeds), shape, device)


def check_latent_flags(channels: int, factor: int, config) -> None:
    """--C and --f must be the model's latent channels and the autoencoder's downsampling factor."""
    params = config.model.params
    model_channels = params.get("channels", channels)
    ch_mult = params.first_stage_config.get("params", {}).get("ddconfig", {}).get("ch_mult", [1])
    model_factor = 2 ** (len(ch_mult) - 1)
    if channels != model_channels:
        raise UserError(
            f"--C {channels} does not match the model's {model_channels} latent channels: use --C {model_channels}"
        )
    if factor != model_factor:
        raise UserError(
            f"--f {factor} does not match the autoencoder's downsampling factor: use --f {model_factor}"
        )


def encode_image(model, posterior, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Scaled latents [len(generators), C, h, w] (fp32) of one image: entry i is a draw from the first stage's
    `posterior` (of a [1, 3, H, W] image) made with generators[i]."""
    return torch.cat([model.get_first_stage_encoding(posterior, generator=g).float() for g in generators])


def strength_steps(strength: float, steps: int) -> int:
    """t_enc, the number of the schedule's last steps that img2img runs: int(strength * steps), as the original."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(strength * steps)


def noised_latents(sampler, z0: torch.Tensor, noise: torch.Tensor, t_enc: int) -> torch.Tensor:
    """Where `sampler.decode(x, c, t_enc)` starts img2img: z0 [B, C, h, w] noised with `noise` to schedule step
    t_enc (`sampler.stochastic_encode`, as the original); z0 itself for t_enc = 0, and the pure noise for
    t_enc = all steps, so strength 1 is txt2img from the same noise. Call `sampler.make_schedule` first."""
    if t_enc == 0:
        return z0
    if t_enc == sampler.num_steps:
        return noise
    t = torch.full((z0.shape[0],), t_enc, dtype=torch.long, device=z0.device)
    return sampler.stochastic_encode(z0, t, noise=noise)


def is_inpainting_model(model) -> bool:
    """Whether the UNet takes the inpainting inputs [z, mask, masked-image latent] (hybrid conditioning,
    2C + 1 input channels, as the SD inpainting checkpoints); False for an ordinary C-channel model."""
    unet = model.model.diffusion_model
    if model.model.conditioning_key == "hybrid" and unet.in_channels == 2 * model.channels + 1:
        return True
    if unet.in_channels == model.channels:
        return False
    raise UserError(
        f"this model's UNet takes {unet.in_channels} input channels with conditioning '{model.model.conditioning_key}': "
        f"inpainting needs an ordinary model ({model.channels} channels) or an SD inpainting model (hybrid, "
        f"{2 * model.channels + 1} channels)"
    )


def latent_keep_mask(repaint: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """The samplers' `mask` [1, 1, h, w] (1 = keep x0) from the pixel mask `repaint` [1, 1, H, W] (1 = repaint):
    a latent cell is repainted when any of its pixels is."""
    return 1.0 - F.adaptive_max_pool2d(repaint, tuple(latent_size))


def masked_image(image: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """What the inpainting UNet sees of the image: image [1, 3, H, W] in [-1, 1] with the repaint region
    (repaint [1, 1, H, W] >= 0.5) set to 0, as the SD inpainting models were trained."""
    return image * (repaint < 0.5)


def inpainting_concat(
    model, masked_posterior, repaint: torch.Tensor, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """The inpainting UNet's extra input `c_concat` [len(generators), 1 + C, h, w]: the repaint mask
    [1, 1, H, W] on the latent grid (nearest, as in training) and the masked image's latent, drawn from its
    first-stage posterior `masked_posterior` with each generator."""
    masked_latent = encode_image(model, masked_posterior, generators)
    mask = F.interpolate(repaint, size=masked_latent.shape[-2:]).expand(len(generators), -1, -1, -1)
    return torch.cat([mask.to(masked_latent.dtype), masked_latent], dim=1)

"""What every generation script needs: device and precision, model loading, samplers, seeded noise."""

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
SAMPLERS = ("ddim", "plms", "dpm")


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status `exit_code`, no traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and its exit status."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


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


def precision_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
            "stable-diffusion-v-1-4-original, after accepting its license) and save it there, or pass --ckpt PATH"
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

    print(f"Loading model from {ckpt}")
    try:
        return load_model_from_config(config, str(ckpt), device=device)
    except CheckpointError as error:
        raise UserError(str(error)) from None


def make_sampler(name: str, model):
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler

        return PLMSSampler(model)
    if name == "dpm":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler

        return DPMSolverSampler(model)
    from ldm.models.diffusion.ddim import DDIMSampler

    return DDIMSampler(model)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """x_T [len(seeds), *shape]: image i's noise comes from its own seed alone, drawn on the CPU so that a
    seed gives the same start on every device."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(noise).to(device)

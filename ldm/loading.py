"""Finding and loading a model for generation: default paths, config and checkpoint checks, the size rules a
config implies, and loading with the model kind recognised from the config and the checkpoint's shapes.

Everything but `load_model` works without torch, so the scripts check their flags before importing it."""

from pathlib import Path
from typing import Any

from ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
INPAINTING_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"
UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # [model_channels, in_channels, 3, 3]


def resolve_path(path: str) -> Path:
    """A path as given if it exists, else relative to the project root (so scripts run from anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return ROOT / candidate


def load_config(path: str) -> Any:
    """The OmegaConf config at `path` (resolved as `resolve_path`)."""
    from omegaconf import OmegaConf

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


def size_multiple(config: Any) -> int:
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


def check_latent_flags(channels: int, factor: int, config: Any) -> None:
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


def takes_image_conditioning(config: Any) -> bool:
    """Whether the config's UNet also takes an image (conditioning_key concat or hybrid, e.g. inpainting)."""
    return config.model.params.get("conditioning_key") in ("concat", "hybrid")


def check_model_kind(config: Any, config_path: str, image_conditioning: bool) -> None:
    """A model conditioned on an image too needs a script that gives it one (`image_conditioning`)."""
    if takes_image_conditioning(config) and not image_conditioning:
        key = config.model.params.get("conditioning_key")
        raise UserError(
            f"{config_path} is a model conditioned on an image too (conditioning_key {key}, e.g. an inpainting "
            "model): use it with scripts/inpaint.py"
        )


def _unet_input_shape(ckpt: Path) -> tuple[int, ...] | None:
    """The shape of the checkpoint's UNet input convolution weight, read without loading the weights."""
    if ckpt.suffix == ".safetensors":
        import safetensors

        from ldm.checkpoint import CheckpointError

        try:
            with safetensors.safe_open(ckpt, framework="pt") as f:
                names = set(f.keys())
                return tuple(f.get_slice(UNET_INPUT_KEY).get_shape()) if UNET_INPUT_KEY in names else None
        except safetensors.SafetensorError as error:
            raise CheckpointError(f"{ckpt} is not a readable .safetensors file ({error})") from None
    from ldm.checkpoint import read_state_dict

    weight = read_state_dict(ckpt)[0].get(UNET_INPUT_KEY)  # memory-mapped: no copy of the weights
    return None if weight is None else tuple(weight.shape)


def _check_unet_input(config: Any, ckpt: Path) -> None:
    """The checkpoint's UNet must take as many input channels as the config's: an inpainting checkpoint (9) with
    an ordinary config (4) gets the config to use."""
    shape = _unet_input_shape(ckpt)
    unet = config.model.params.get("unet_config", {}).get("params", {})
    if shape is None or len(shape) != 4 or "in_channels" not in unet or shape[1] == unet.in_channels:
        return
    if shape[1] == 2 * config.model.params.get("channels", 4) + 1:
        raise UserError(
            f"this is an inpainting checkpoint (UNet input {shape[1]} channels, the config's "
            f"{unet.in_channels}): pass --config {INPAINTING_CONFIG}"
        )
    raise UserError(
        f"the checkpoint's UNet takes {shape[1]} input channels, the config's {unet.in_channels}: "
        "pass the --config this checkpoint was made with"
    )


def load_model(config: Any, ckpt: Path, device: Any) -> Any:
    """The LatentDiffusion model of `config` with the weights of `ckpt`, in eval mode on `device`."""
    from ldm.checkpoint import CheckpointError, load_model_from_config

    try:
        _check_unet_input(config, ckpt)
        return load_model_from_config(config, str(ckpt), device=device)
    except CheckpointError as error:
        raise UserError(str(error)) from None

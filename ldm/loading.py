"""Finding and loading a model for generation: default paths, config and checkpoint checks, the size rules a
config implies, and loading with the model kind recognised from the config and the checkpoint's shapes.

Everything but `load_model` works without torch, so the scripts check their flags before importing it."""

from pathlib import Path
from typing import Any

from ldm.errors import ConfigError, UserError

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


SAFE_TARGETS = ("ldm.", "torch.")  # what a generation config may build without --trust-config


def is_diffusers_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...)."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def hashed_file(ckpt: Path) -> Path:
    """The file whose hash names the model: the checkpoint, or a diffusers folder's UNet weights."""
    if not ckpt.is_dir():
        return ckpt
    unet = ckpt / "unet"
    return next(
        (p for p in sorted(unet.glob("diffusion_pytorch_model*")) if p.is_file()), ckpt / "model_index.json"
    )


def load_config(path: str, trust: bool = False, ckpt: str | None = None) -> Any:
    """The model config at `path` (resolved as `resolve_path`): valid YAML with a `model: target:` section, and
    (unless `trust`) every `target:` a class of this project or torch (configs are code). For a diffusers
    folder `ckpt` with the default config, the config its own JSON files describe."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    if ckpt is not None and path == DEFAULT_CONFIG and is_diffusers_folder(resolve_path(ckpt)):
        from ldm.adapters.diffusers_layout import config_from_diffusers

        return config_from_diffusers(resolve_path(ckpt))

    config_path = resolve_path(path)
    if not config_path.is_file():
        raise UserError(f"config file {path} not found: pass --config with the path of a model's YAML config")
    try:
        config = OmegaConf.load(config_path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(
            f"config file {path} is not valid YAML ({reason}): fix it or pass another --config"
        ) from None
    if not hasattr(config, "get") or "model" not in config or "target" not in config.model:
        raise ConfigError(f"config file {path} has no model: target: section: pass a model config")
    if not trust:
        _check_target_names(config.model, f"{path}: model")
    return config


def _check_target_names(config: Any, where: str) -> None:
    """Every `target:` in the tree names a class under `SAFE_TARGETS` (a string check: nothing is imported)."""
    from omegaconf import DictConfig, ListConfig

    items = (
        enumerate(config)
        if isinstance(config, ListConfig)
        else config.items()
        if isinstance(config, DictConfig)
        else ()
    )
    if (
        isinstance(config, DictConfig)
        and "target" in config
        and not str(config.target).startswith(SAFE_TARGETS)
    ):
        raise ConfigError(
            f"{where}: target '{config.target}' is outside {', '.join(SAFE_TARGETS)}: configs are code; if you "
            "trust this config, pass --trust-config"
        )
    for key, value in items:
        _check_target_names(value, f"{where}.{key}")


def check_config(config: Any, path: str) -> None:
    """Before anything is built: every `target:` of the model config imports and takes its `params`."""
    from ldm.util import check_targets

    check_targets(config.model, f"{path}: model")


def check_checkpoint(ckpt: str) -> Path:
    """The checkpoint's path, or a UserError that says where to get and put the SD v1 weights."""
    path = resolve_path(ckpt)
    if path.is_file() or is_diffusers_folder(path):
        return path
    if Path(ckpt) == Path(DEFAULT_CKPT):
        raise UserError(
            f"no checkpoint at {DEFAULT_CKPT}: download sd-v1-4.ckpt (huggingface.co/CompVis/"
            "stable-diffusion-v-1-4-original, after accepting its license) and save it there, pass --ckpt PATH, "
            "or try the small model that ships with the project: --ckpt shapes"
        )
    raise UserError(
        f"checkpoint {ckpt} not found: pass --ckpt with the path of a .ckpt or .safetensors file or of a "
        "diffusers folder"
    )


def _select(config: Any, key: str, default: Any) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(config, key, default=default)
    return default if value is None else value


def autoencoder_factor(config: Any) -> int:
    """The first stage's downsampling factor: 2 ** (levels - 1)."""
    return 2 ** (len(_select(config, "model.params.first_stage_config.params.ddconfig.ch_mult", [1])) - 1)


def size_multiple(config: Any) -> int:
    """Image sides must be multiples of this: the autoencoder's factor times the UNet's downsampling."""
    unet_mult = _select(config, "model.params.unet_config.params.channel_mult", [1])
    return autoencoder_factor(config) * 2 ** (len(unet_mult) - 1)


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
    model_channels = _select(config, "model.params.channels", channels)
    model_factor = autoencoder_factor(config)
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
    return _select(config, "model.params.conditioning_key", None) in ("concat", "hybrid")


def check_model_kind(config: Any, config_path: str, image_conditioning: bool) -> None:
    """A model conditioned on an image too needs a script that gives it one (`image_conditioning`)."""
    if takes_image_conditioning(config) and not image_conditioning:
        key = _select(config, "model.params.conditioning_key", None)
        raise UserError(
            f"{config_path} is a model conditioned on an image too (conditioning_key {key}, e.g. an inpainting "
            "model): use it with scripts/inpaint.py"
        )


def _unet_input_shape(ckpt: Path) -> tuple[int, ...] | None:
    """The shape of the checkpoint's UNet input convolution weight, read without loading the weights."""
    if ckpt.suffix == ".safetensors":
        import safetensors

        try:
            with safetensors.safe_open(ckpt, framework="pt") as f:
                names = set(f.keys())
                return tuple(f.get_slice(UNET_INPUT_KEY).get_shape()) if UNET_INPUT_KEY in names else None
        except (safetensors.SafetensorError, OSError):
            return None  # unreadable: reading the weights says why
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
        if is_diffusers_folder(ckpt):
            from ldm.adapters.diffusers_layout import read_diffusers_folder

            return load_model_from_config(config, read_diffusers_folder(ckpt)[0], device=device)
        _check_unet_input(config, ckpt)
        return load_model_from_config(config, str(ckpt), device=device)
    except CheckpointError as error:
        raise UserError(str(error)) from None

"""Small helpers shared by the whole package: config instantiation and a few conveniences."""

import importlib
import inspect
from collections.abc import Sequence
from inspect import isfunction
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.errors import ConfigError


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Any) -> Any:
    """Build `config.target(**config.params)`; the two special strings mean "no model"."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def check_targets(config: Any, where: str) -> None:
    """Check every `target:` in a config tree before anything is built: it must import and its `params` must
    fit its signature. Raises ConfigError."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(config, ListConfig):
        for i, item in enumerate(config):
            check_targets(item, f"{where}[{i}]")
        return
    if not isinstance(config, DictConfig):
        return
    if "target" in config:
        target = str(config["target"])
        try:
            cls = get_obj_from_str(target)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"{where}: unknown target '{target}' ({error})") from None
        params = config.get("params") or {}
        try:
            inspect.signature(cls).bind(**params)
        except TypeError as error:
            raise ConfigError(f"{where}: the params of {target} don't fit: {error}") from None
        except ValueError:
            pass  # a builtin without an introspectable signature: the call itself checks
        accepted = _accepted_params(cls) if inspect.isclass(cls) else None
        unknown = sorted(set(params) - accepted) if accepted is not None else []
        if unknown:
            raise ConfigError(f"{where}: {target} takes no parameter {', '.join(map(repr, unknown))}")
    for key, value in config.items():
        check_targets(value, f"{where}.{key}")


def _accepted_params(cls: type) -> set[str] | None:
    """The keyword parameters a class's constructor accepts, following `**kwargs` up the base classes'
    `__init__`s (LatentDiffusion(**kwargs) -> DDPM(...)); None when the chain accepts anything."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except ValueError:
            return None
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names |= {p.name for p in parameters if p.kind in keyword}
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return None


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` if it is not None, else `d` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total_params = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total_params * 1.0e-6:.2f} M params.")
    return total_params


def ismap(x: Any) -> bool:
    """A batch of feature maps with more than 3 channels: [B, C>3, H, W]."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """A batch of RGB or grayscale images: [B, 1|3, H, W]."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def log_txt_as_img(wh: tuple[int, int], xc: Sequence[str], size: int = 10) -> torch.Tensor:
    """Render each caption in `xc` onto a white `wh` image; returns [B, 3, H, W] in [-1, 1]."""
    width, height = wh
    font = _caption_font(size)
    chars_per_line = max(1, int(40 * (width / 256)))
    images = []
    for caption in xc:
        canvas = Image.new("RGB", wh, color="white")
        lines = "\n".join(
            caption[start : start + chars_per_line] for start in range(0, len(caption), chars_per_line)
        )
        ImageDraw.Draw(canvas).text((0, 0), lines, fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)


def _caption_font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "data/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size=size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)

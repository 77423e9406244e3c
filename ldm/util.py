"""Small helpers shared by the whole package: config instantiation and a few conveniences."""

import importlib
from collections.abc import Sequence
from inspect import isfunction
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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

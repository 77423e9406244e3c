"""Reading image folders and files as uint8 tensor batches, the input of every metric here."""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """The images under `folder` (recursively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: pass a folder of reference images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centered square of `image`, resized to size x size (bicubic)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def load_images(paths: Sequence[str | Path], size: int | None = None) -> torch.Tensor:
    """RGB images -> uint8 [B, 3, H, W]: all of one size, or each center-cropped to a square of `size`."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            arrays.append(np.asarray(center_square(image, size) if size else image))
    if len({a.shape for a in arrays}) > 1:
        raise UserError(
            f"images of different sizes among {paths[0]} ...: pass --reference_size to crop and resize them"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def batches(paths: Sequence[str | Path], batch_size: int, size: int | None = None) -> Iterator[torch.Tensor]:
    """load_images over `paths`, `batch_size` at a time."""
    for start in range(0, len(paths), batch_size):
        yield load_images(paths[start : start + batch_size], size)

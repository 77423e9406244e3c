"""User images and masks: read any common format as 8-bit RGB (or a binary mask), fit them to the sizes the
model can take, and bring results back to the user's size.

Conversions: EXIF orientation is applied; 16-bit and float images are scaled to 8 bits; palette, grayscale
and CMYK images become RGB. Transparent pixels of an image are composited on white (what viewers show); a
mask's transparent pixels count as black (keep), so white strokes on a transparent layer work as a mask.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import UserError

DEFAULT_MAX_PIXELS = 2048 * 2048


def open_image(path: str, flag: str, max_pixels: int) -> Image.Image:
    """The decoded image at `path` (named by the command-line `flag` in errors), upright per its EXIF."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file: pass the path of a PNG, JPEG or WebP image")
    try:
        image = Image.open(file)
        if image.width * image.height > max_pixels:
            raise UserError(
                f"{flag} {path} is {image.width}x{image.height} = {image.width * image.height} pixels, more than "
                f"--max-pixels {max_pixels}: downscale it, or pass --max-pixels {image.width * image.height} "
                "if you have the memory"
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise UserError(
            f"{flag} {path} is too large for Pillow to open safely ({error}): downscale it"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(
            f"{flag} {path} is not a readable image ({error}): pass a PNG, JPEG or WebP file"
        ) from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ("I;16*", "I") and float ("F", values in [0, 1]) single-channel images -> "L"."""
    if image.mode.startswith("I;16") or image.mode == "I":
        scale = 255.0 / 65535.0
    elif image.mode == "F":
        scale = 255.0
    else:
        return image
    values = np.asarray(image, dtype=np.float64) * scale
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An RGB image: any transparency composited over `background`."""
    image = _to_8bit(image)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, background)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")


def rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB, transparency composited on white (what `load_image` returns)."""
    return _flatten(image, background=(255, 255, 255))


def binary_mask(mask: Image.Image) -> Image.Image:
    """A decoded mask as a binary "L" image: 255 (repaint) where its gray level is >= 128, transparent = keep."""
    return _flatten(mask, background=(0, 0, 0)).convert("L").point(lambda v: 255 if v >= 128 else 0)


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, flag: str = "--init-img") -> Image.Image:
    """The image at `path` as 8-bit RGB, transparency composited on white."""
    return rgb_image(open_image(path, flag, max_pixels))


def load_mask(
    path: str, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, flag: str = "--mask"
) -> Image.Image:
    """The mask at `path` as a binary "L" image (255 = repaint where its gray level is >= 128, 0 = keep).

    It must be `size` (width, height), the size of the image it masks."""
    mask = binary_mask(open_image(path, flag, max_pixels))
    if mask.size != size:
        raise UserError(
            f"{flag} {path} is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}: "
            "make the mask the same size as the image"
        )
    return mask


def fit_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) rounded to the nearest multiples of `multiple` (at least one multiple each)."""
    return tuple(max(multiple, (side + multiple // 2) // multiple * multiple) for side in (width, height))


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` (Lanczos); unchanged when it already has that size."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A binary mask resized to `size`, marking every pixel that a repaint pixel touches (so the repainted
    area covers at least the mask)."""
    if mask.size == size:
        return mask
    return mask.resize(size, Image.Resampling.BOX).point(lambda v: 255 if v > 0 else 0)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> [1, 3, H, W] float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32))
    return (pixels / 127.5 - 1.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """A binary "L" mask -> [1, 1, H, W] float32, 1 = repaint."""
    return torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0)[None, None]

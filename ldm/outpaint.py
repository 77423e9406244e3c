"""Outpainting: extend an image past its borders. The image is placed on a larger canvas whose new border starts
from a plausible fill (each border pixel takes the color of the nearest edge pixel, blurred, plus seeded noise:
A1111's "outpainting mk2" idea, simplified), so that the autoencoder sees a continuation rather than a hard
edge; the border is then repainted by inpainting with a soft mask that also lets the sampler blend a few pixels
into the image, whose own pixels are pasted back exactly at the end."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

FEATHER = 16  # pixels of the image next to a new border that the sampler may blend (pasted back afterwards)
FILL_NOISE = 24.0  # standard deviation (8-bit levels) of the noise on the border fill


def outpaint_canvas(
    image: Image.Image, mask: Image.Image, border: dict[str, int], seed: int
) -> tuple[Image.Image, Image.Image, torch.Tensor]:
    """(canvas, repaint mask, keep) for extending RGB `image` by `border` ({"left": px, "right", "top",
    "bottom"}): the canvas with the image at (left, top) and the border filled; the binary "L" repaint mask
    (255 on the border and where `mask`, the image's own mask, is 255); keep [1, 1, H, W] in [0, 1], the soft
    mask of what stays: 0 on the repainted pixels, rising from 1/FEATHER at a new border to 1 FEATHER pixels
    inside the image."""
    left, right, top, bottom = (border[side] for side in ("left", "right", "top", "bottom"))
    pixels = np.asarray(image, dtype=np.uint8)
    padding = ((top, bottom), (left, right), (0, 0))
    edges = Image.fromarray(np.pad(pixels, padding, mode="edge"))
    radius = max(left, right, top, bottom) / 4
    blurred = np.asarray(edges.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, FILL_NOISE, blurred.shape)
    fill = np.clip(np.round(blurred + noise), 0, 255).astype(np.uint8)
    fill[top : top + image.height, left : left + image.width] = pixels
    canvas = Image.fromarray(fill)

    inside = np.pad(np.ones((image.height, image.width), dtype=bool), padding[:2])
    repaint = ~inside
    repaint[inside] = np.asarray(mask, dtype=np.uint8).reshape(-1) >= 128
    keep = _distance_inside(image.size, border) / FEATHER
    keep = np.clip(np.pad(keep, padding[:2]), 0.0, 1.0) * ~repaint
    repaint_mask = Image.fromarray(repaint.astype(np.uint8) * 255)
    return canvas, repaint_mask, torch.from_numpy(keep.astype(np.float32))[None, None]


def _distance_inside(size: tuple[int, int], border: dict[str, int]) -> np.ndarray:
    """[H, W] for an image of `size` (width, height): each pixel's distance (1 at the edge pixels) to the nearest
    side that gets a new border; inf when no side does."""
    width, height = size
    columns, rows = np.arange(1, width + 1, dtype=np.float32), np.arange(1, height + 1, dtype=np.float32)
    distance = np.full((height, width), np.inf, dtype=np.float32)
    for side, along in (("left", columns), ("right", columns[::-1]), ("top", rows), ("bottom", rows[::-1])):
        if border[side]:
            line = along[None, :] if side in ("left", "right") else along[:, None]
            distance = np.minimum(distance, line)
    return distance


def latent_soft_keep(keep: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The samplers' soft `mask` [1, 1, h, w] (1 = keep x0) from the pixel keep mask [1, 1, H, W]: each latent
    cell the mean of the pixels it covers."""
    return F.interpolate(keep, size=latent_size, mode="area")

"""Synthetic captioned "shapes" images, generated on the fly (no files): one filled circle, square or
triangle on a plain background, captioned "a {color} {shape} on a {background} background".

Each image is a pure function of (index, seed), so a dataset of any size is reproducible everywhere.
At resolution 64 the shape's bounding square has a side uniform in [24, 44] px and lies at least 2 px
inside the image; sizes and margins scale with the resolution. Edges are anti-aliased by 4x4 supersampling.
"""

import numpy as np
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SIZE_RANGE = (24.0, 44.0)  # side of the shape's bounding square, in pixels at resolution 64
MARGIN = 2.0  # least distance from the bounding square to the image border, pixels at resolution 64
SUPERSAMPLE = 4


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def sample_attributes(index: int, seed: int = 0, resolution: int = 64) -> dict:
    """The random draws of image `index`: shape, color, background names, and the bounding square's
    side `size` and top-left corner (`x`, `y`) in pixels (floats)."""
    rng = np.random.default_rng([seed, index])
    scale = resolution / 64
    size = rng.uniform(*SIZE_RANGE) * scale
    margin = MARGIN * scale
    x, y = rng.uniform(margin, resolution - margin - size, size=2)
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "size": float(size),
        "x": float(x),
        "y": float(y),
    }


def coverage(shape: str, size: float, x: float, y: float, resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, [resolution, resolution] float32 in [0, 1].

    The shape fills the square [x, x + size] x [y, y + size] (pixel units, y down): a disk of diameter
    `size`, the square itself, or an upright equilateral triangle of base `size` (apex up) centred in it.
    """
    n = resolution * SUPERSAMPLE
    # Sub-pixel sample centres, in pixel units.
    t = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    u, v = t[None, :] - x, t[:, None] - y  # position inside the bounding square
    if shape == "circle":
        r = size / 2
        inside = (u - r) ** 2 + (v - r) ** 2 <= r * r
    elif shape == "square":
        inside = (u >= 0) & (u <= size) & (v >= 0) & (v <= size)
    elif shape == "triangle":
        height = size * np.sqrt(3) / 2
        top = (size - height) / 2
        depth = v - top  # distance below the apex
        inside = (depth >= 0) & (depth <= height) & (np.abs(u - size / 2) <= depth / np.sqrt(3))
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    inside = inside.astype(np.float32)
    return inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def render(
    shape: str, color: str, background: str, size: float, x: float, y: float, resolution: int = 64
) -> np.ndarray:
    """The image as uint8 [resolution, resolution, 3]."""
    alpha = coverage(shape, size, x, y, resolution)[..., None]
    fg = np.array(COLORS[color], dtype=np.float32)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def make_example(index: int, seed: int = 0, resolution: int = 64) -> tuple[np.ndarray, str]:
    """(uint8 image [resolution, resolution, 3], caption) of example `index`."""
    a = sample_attributes(index, seed, resolution)
    image = render(a["shape"], a["color"], a["background"], a["size"], a["x"], a["y"], resolution)
    return image, caption(a["color"], a["shape"], a["background"])


class ShapesDataset(Dataset):
    """`size` examples {"jpg": float32 [resolution, resolution, 3] in [-1, 1], "txt": caption}."""

    def __init__(self, size: int = 10000, seed: int = 0, resolution: int = 64):
        self.size = size
        self.seed = seed
        self.resolution = resolution

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        image, text = make_example(index, self.seed, self.resolution)
        return {"jpg": image.astype(np.float32) / 127.5 - 1.0, "txt": text}

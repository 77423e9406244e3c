"""Read the attributes of a "shapes" image back by plain image analysis, to check what a model draws.

Background: the background color nearest to the median border pixel. Foreground coverage: each pixel's
distance from the background relative to the foreground's. Color: the palette color nearest to the median
of the clearly-foreground pixels. Shape: how much of its bounding box the foreground fills (square ~1.0,
circle ~pi/4, triangle ~0.5) and whether its rows widen downwards (triangle).
"""

import re

import numpy as np

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES

_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [np.linalg.norm(rgb - np.array(palette[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(dists))]


def analyze_shape_image(img: np.ndarray) -> dict:
    """Attributes of a uint8 [H, W, 3] image: {"background", "color", "shape"} (names from ldm.data.shapes);
    "color" and "shape" are None when no foreground is found."""
    pixels = img.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)

    dist = np.linalg.norm(pixels - bg, axis=-1)
    strong = dist > 100.0  # every palette color is at least 160 away from either background
    if not strong.any():
        return {"background": background, "color": None, "shape": None}
    fg = np.median(pixels[strong], axis=0)
    color = _nearest(fg, COLORS)

    alpha = np.clip(dist / max(float(np.linalg.norm(fg - bg)), 1.0), 0.0, 1.0)  # per-pixel coverage
    mask = alpha > 0.5
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = alpha[top : bottom + 1, left : right + 1]
    fill = box.sum() / box.size
    widths = box.sum(axis=1)  # covered width of each row, top to bottom
    quarter = max(len(widths) // 4, 1)
    widens_down = widths[-quarter:].mean() > 1.5 * widths[:quarter].mean()
    if fill > 0.9:
        shape = "square"
    elif widens_down or fill < 0.64:
        shape = "triangle"
    else:
        shape = "circle"
    return {"background": background, "color": color, "shape": shape}


def caption_attributes(caption: str) -> dict:
    """{"color", "shape", "background"} of a caption "a {color} {shape} on a {background} background"."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in BACKGROUNDS:
        raise ValueError(f"Not a shapes caption: {caption!r}")
    return {"color": match[1], "shape": match[2], "background": match[3]}

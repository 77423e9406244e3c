"""Tiled evaluation of a translation-equivariant map (the VAE encoder and decoder): large images in the memory
of one tile, the overlaps blended linearly."""

from collections.abc import Callable

import torch


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: stride tile - overlap, the last tile flush with the far edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return [*starts, size - tile]


def _ramp(length: int, blend: int, lead: bool, trail: bool) -> torch.Tensor:
    """Blend weights [length] of one tile along one side: rising over the first `blend` entries when the tile
    has a neighbour before it, falling over the last `blend` when it has one after it, else 1."""
    w = torch.ones(length)
    edge = (torch.arange(blend) + 0.5) / blend
    if lead:
        w[:blend] = edge
    if trail:
        w[length - blend :] = torch.minimum(w[length - blend :], edge.flip(0))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int
) -> torch.Tensor:
    """fn(x) computed on overlapping tile x tile windows of x [B, C, H, W] and blended linearly across the
    overlaps, for a translation-equivariant `fn` that scales the spatial size by a fixed factor
    (8 for the SD VAE decoder, 1/8 for its encoder). Peak memory is that of one tile.

    Convolutions see the same context as untiled only `overlap / 2` pixels in from a tile's edge, and the
    VAE's GroupNorm and mid-block attention see one tile instead of the whole image, so the result differs
    slightly from fn(x); the linear blending hides the tile borders."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    rows, cols = _starts(height, tile, overlap), _starts(width, tile, overlap)
    out = weight = None
    for top in rows:
        for left in cols:
            y = fn(x[..., top : top + tile, left : left + tile])
            if out is None:
                scale = y.shape[-1] / min(tile, width)
                out = y.new_zeros(*y.shape[:-2], round(height * scale), round(width * scale))
                weight = y.new_zeros(round(height * scale), round(width * scale))
            h, w = y.shape[-2:]
            blend = max(1, round(overlap * scale))
            wy = _ramp(h, min(blend, h), top > 0, top + tile < height)
            wx = _ramp(w, min(blend, w), left > 0, left + tile < width)
            mask = (wy[:, None] * wx[None, :]).to(y)
            t, l = round(top * scale), round(left * scale)
            out[..., t : t + h, l : l + w] += y * mask
            weight[t : t + h, l : l + w] += mask
    return out / weight

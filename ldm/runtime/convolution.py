"""3x3 convolutions as matrix products, the math of the CPU fast paths' `MatmulConv2d` and `WinogradConv2d`
(`ldm.runtime.fast_paths` decides which layers take them on which CPU, and runs the products):

- `pixel_neighbourhoods`: every pixel's 3x3 neighbourhood side by side along the channels (im2col), so that a
  convolution is one product with its kernels' taps.
- Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): the
  tiles F(2x2, 3x3) and F(4x4, 3x3), the kernels' and the inputs' transforms, and the convolution over the
  products a caller supplies (`winograd_conv3x3`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x [B, C, H, W] is laid out channels_last (and so not also contiguous NCHW, as a 1x1 map is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def pixel_neighbourhoods(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The zero-padded 3x3 neighbourhood of every `stride`-th pixel: x [B, C, H, W] -> [B, H', W', 9 * C]
    (H' = ceil(H / stride)), the 9 maps shifted by (row, column) in -1..1 side by side along the channels
    (row-major), one copy (channels_last in, the cheapest)."""
    _, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [B, H + 2, W + 2, C]
    taps = [padded[:, i : i + h : stride, j : j + w : stride] for i in range(3) for j in range(3)]
    return torch.cat(taps, dim=-1)


@dataclass(frozen=True, eq=False)
class WinogradTiles:
    """Winograd's F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): the
    m x m output tile of an n x n input tile d (n = m + 2) under a 3x3 kernel g is A^T [(G g G^T) * (B^T d B)] A,
    n^2 products where a direct convolution makes 9 m^2. Column 1 of A^T is all ones (the point 1), so every
    output of a tile sums transformed position (1, 1) once: the bias is added there (`bias_position`)."""

    bt: torch.Tensor  # B^T [n, n]
    g: torch.Tensor  # G [n, 3], in the dtype the kernels are transformed in
    at: torch.Tensor  # A^T [m, n]

    @property
    def m(self) -> int:
        return self.at.shape[0]

    @property
    def n(self) -> int:
        return self.at.shape[1]

    @property
    def bias_position(self) -> int:
        return self.n + 1


# F(2x2, 3x3), points 0, 1, -1 and infinity: 16 products for 4 outputs (2.25x fewer); its entries are exact in fp32
F2X2 = WinogradTiles(
    bt=torch.tensor([[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    g=torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
    at=torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]]),
)
# F(4x4, 3x3), points 0, 1, -1, 2, -1/2 and infinity: 36 products for 16 outputs (4x fewer). These points (rather
# than the usual 0, +-1, +-2) keep its fp32 error within 1.2-1.8x that of a direct convolution against fp64
# (Barabasz et al., "Error Analysis and Improving the Accuracy of Winograd Convolution", 2020; 3-6x with +-2).
# B^T is scaled to integers, G carries the inverse scales in fp64: the kernels are transformed once, in fp64.
F4X4 = WinogradTiles(
    bt=torch.tensor(
        [
            [2.0, 3, -4, -3, 2, 0],
            [0, 2, 5, 1, -2, 0],
            [0, 2, 1, -5, 2, 0],
            [0, -1, -2, 1, 2, 0],
            [0, -2, 1, 2, -1, 0],
            [0, 2, 3, -4, -3, 2],
        ]
    ),
    g=torch.tensor(
        [
            [1 / 2, 0, 0],
            [1 / 6, 1 / 6, 1 / 6],
            [1 / 6, -1 / 6, 1 / 6],
            [1 / 30, 1 / 15, 2 / 15],
            [16 / 15, -8 / 15, 4 / 15],
            [0, 0, 1 / 2],
        ],
        dtype=torch.float64,
    ),
    at=torch.tensor(
        [[1.0, 1, 1, 1, 1, 0], [0, 1, -1, 2, -1 / 2, 0], [0, 1, 1, 4, 1 / 4, 0], [0, 1, -1, 8, -1 / 8, 1]]
    ),
)


WINOGRAD_CHUNK_KERNELS = 2**16  # kernels transformed at a time (`winograd_weights`): 4 MiB of fp32 results


def winograd_weights(
    weight: torch.Tensor, dtype: torch.dtype = torch.float32, tiles: WinogradTiles = F2X2
) -> torch.Tensor:
    """Kernels [C_out, C_in, 3, 3] -> G g G^T at each of the n^2 positions (n * row + column): [n^2, C_out, C_in]
    in `dtype`, computed in G's dtype as products of kron(G, G) [n^2, 9] with the kernels' 9 taps (4.5x faster
    than an einsum), WINOGRAD_CHUNK_KERNELS kernels at a time, each chunk rounded to `dtype` while it is in cache."""
    o, c = weight.shape[:2]
    kron = torch.kron(tiles.g, tiles.g).to(weight.device)
    out = weight.new_empty(tiles.n**2, o, c, dtype=dtype)
    rows = max(1, WINOGRAD_CHUNK_KERNELS // c)  # output channels per chunk

    for start in range(0, o, rows):
        taps = weight[start : start + rows].reshape(-1, 9).to(kron.dtype).t()  # [9, rows * C_in]
        out[:, start : start + rows] = (kron @ taps).view(tiles.n**2, -1, c)
    return out


def _winograd_input_rows(d: list[torch.Tensor], out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """F2X2's B^T applied along one axis: the 4 rows of an input tile, d[0..3], -> d0 - d2, d1 + d2, d2 - d1,
    d1 - d3 (into out[0..3] when given; as strided slices, 2-3x faster than a product with kron(B^T, B^T))."""
    out = [None] * 4 if out is None else list(out)
    return [
        torch.sub(d[0], d[2], out=out[0]),
        torch.add(d[1], d[2], out=out[1]),
        torch.sub(d[2], d[1], out=out[2]),
        torch.sub(d[1], d[3], out=out[3]),
    ]


def _winograd_inputs(
    padded: torch.Tensor, tiles: WinogradTiles, th: int, tw: int, dtype: torch.dtype
) -> torch.Tensor:
    """The transformed input tiles B^T d B of padded [B, m * th + 2, m * tw + 2, C] (fp32), rounded to `dtype`
    once: [n^2, B * th * tw, C], position n * row + column. F2X2 as adds of strided slices; others gather the
    overlapping tiles in one copy and apply B^T along each axis as a product."""
    b, _, _, c = padded.shape
    m, n = tiles.m, tiles.n
    if tiles is F2X2:
        transformed = padded.new_empty(16, b, th, tw, c, dtype=dtype)
        # B^T d along the rows of the tiles (4 x [B, th, W+2, C]), then (B^T d) B into position 4 * row + column
        rows = _winograd_input_rows([padded[:, j : j + 2 * th : 2] for j in range(4)])
        for i, row in enumerate(rows):
            _winograd_input_rows(
                [row[:, :, j : j + 2 * tw : 2] for j in range(4)], out=transformed[4 * i : 4 * i + 4]
            )
        return transformed.view(16, b * th * tw, c)
    tiles_d = padded.unfold(1, n, m).unfold(2, n, m)  # [B, th, tw, C, row, column] (views)
    d = tiles_d.permute(4, 5, 0, 1, 2, 3).reshape(n, -1)  # [row, column * B * th * tw * C]
    bt = tiles.bt.to(padded)
    return torch.matmul(bt, (bt @ d).view(n, n, -1)).view(n * n, b * th * tw, c).to(dtype)


def winograd_conv3x3(
    x: torch.Tensor, products: Callable[[torch.Tensor], torch.Tensor], tiles: WinogradTiles = F2X2
) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1) of x [B, C_in, H, W] as Winograd's F(m x m, 3x3) (`tiles`),
    where `products` maps the transformed input tiles [n^2, tiles, C_in] to [n^2, tiles, C_out] (each position's
    tiles times its transformed kernel, the bias added at `tiles.bias_position`). Returns [B, C_out, H, W],
    contiguous in x's memory format (NCHW or channels_last)."""
    b, c, h, w = x.shape
    m = tiles.m
    th, tw = -(-h // m), -(-w // m)  # m x m tiles down and across (sides not a multiple of m get zero rows)
    # [B, m th + 2, m tw + 2, C_in] in fp32, so that the transformed tiles round once, in the end (as a product would)
    padded = F.pad(x, (1, 1 + m * tw - w, 1, 1 + m * th - h)).permute(0, 2, 3, 1)
    padded = padded.to(torch.float32, memory_format=torch.contiguous_format)
    y = products(_winograd_inputs(padded, tiles, th, tw, x.dtype))  # [n^2, tiles, C_out]
    y = (torch.kron(tiles.at, tiles.at).to(x) @ y.view(tiles.n**2, -1)).view(m, m, b, th, tw, -1)
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    if layout == torch.channels_last:  # [B, m th, m tw, C_out] seen as [B, C_out, m th, m tw]
        out = y.permute(2, 3, 0, 4, 1, 5).reshape(b, m * th, m * tw, -1).permute(0, 3, 1, 2)
    else:
        out = y.permute(2, 5, 3, 0, 4, 1).reshape(b, -1, m * th, m * tw)  # [B, C_out, m th, m tw]
    return out if (h, w) == out.shape[-2:] else out[..., :h, :w].contiguous(memory_format=layout)

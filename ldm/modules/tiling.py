"""Exact tiled evaluation of the VAE encoder and decoder: large images with a fraction of the memory, the same
numbers as untiled up to float summation order.

Two things make a VAE non-local: GroupNorm (statistics over the whole map) and the mid-block attention (every
position attends to every other). `tiled_blocks` leaves the attention whole (it runs at the latent resolution,
h x w, where maps are small) and runs each ResnetBlock, Upsample and Downsample in windows of its input map,
each window extended by a `HALO` of neighbouring pixels that covers the block's receptive field and cropped back
to its core. The block's GroupNorms see the whole map's statistics (`WholeImageNorms`): a block with n norms is
run over its windows n + 1 times, each pass stopping at the first norm whose statistics are not known yet after
adding the window core's sums to them; the last pass normalizes every norm with whole-map statistics and writes
the output. Only the maps between blocks are held whole; a block's temporaries (norm, SiLU, convolution and
upsampling outputs) exist for one window at a time.
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Downsample, ResnetBlock, Upsample

HALO = 2  # pixels of the block's input around a window: ResnetBlock has two 3x3 convs; resampling needs <= 2


def windows(size: int, core: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(core_start, core_end, window_start, window_end) along one side of `size` pixels: cores of `core`
    pixels tiling the side, each window its core extended by `halo` on both sides inside the map."""
    return [
        (start, min(start + core, size), max(0, start - halo), min(size, start + core + halo))
        for start in range(0, size, core)
    ]


class _StatisticsPending(Exception):
    """A window's pass stops at the first GroupNorm whose whole-map statistics are still being summed."""


class WholeImageNorms:
    """While active, the GroupNorms of `module` normalize with the statistics of the whole map instead of the
    window they are given. `core` (rows, cols: slices of the window) names the window's own pixels; a norm
    whose statistics are not known adds the core's per-group sums to them and raises `_StatisticsPending`;
    `finish_pass` turns the sums into means and inverse standard deviations."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.known: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}  # scale, shift [B, C]
        self.sums: dict[nn.GroupNorm, list] = {}  # [sum, sum of squares ([B, G] float64), count]
        self.core: tuple[slice, slice] = (slice(None), slice(None))

    def __enter__(self) -> "WholeImageNorms":
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self._normalize(norm, x)
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            del norm.forward

    def _normalize(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> GroupNorm(x) with whole-map statistics, computed in fp32 (as GroupNorm32)."""
        if norm not in self.known:
            self._add(norm, x[..., self.core[0], self.core[1]])
            raise _StatisticsPending
        scale, shift = self.known[norm]
        return torch.addcmul(shift[..., None, None], x.float(), scale[..., None, None]).to(x.dtype)

    def _add(self, norm: nn.GroupNorm, core: torch.Tensor) -> None:
        b, c = core.shape[:2]
        values = core.double()
        per_channel = values.sum(dim=(2, 3)), values.square().sum(dim=(2, 3))  # [B, C] each
        sums = [s.view(b, norm.num_groups, -1).sum(-1) for s in per_channel]
        total = self.sums.setdefault(norm, [0.0, 0.0, 0])
        total[0], total[1] = total[0] + sums[0], total[1] + sums[1]
        total[2] += core[0, 0].numel() * c // norm.num_groups

    def finish_pass(self) -> None:
        """Whole-map mean and variance of the norm summed in this pass -> its per-channel scale and shift."""
        (norm, (total, total_sq, count)), *others = self.sums.items()
        assert not others, "every window stops at the same norm"
        mean = total / count
        inv_std = (total_sq / count - mean.square()).clamp(min=0).add(norm.eps).rsqrt()
        per_group = norm.num_channels // norm.num_groups
        mean, inv_std = (t.repeat_interleave(per_group, dim=1).float() for t in (mean, inv_std))
        weight = norm.weight.float() if norm.weight is not None else torch.ones_like(mean[0])
        bias = norm.bias.float() if norm.bias is not None else torch.zeros_like(mean[0])
        scale = inv_std * weight
        self.known[norm] = (scale, bias - mean * scale)
        self.sums.clear()


def tiled_block(
    block: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, core: int, scale: float
) -> torch.Tensor:
    """block(x) for a block whose output pixel depends on input pixels at most `HALO` away, computed in windows
    of `core` x `core` input pixels (+ halo) with the whole map's GroupNorm statistics (`WholeImageNorms` on
    `module`). x [B, C, H, W] -> [B, C', H * scale, W * scale]. `core` and `HALO` are even, so that stride-2
    windows start on the input grid of the whole map."""
    height, width = x.shape[-2:]
    rows, cols = windows(height, core, HALO), windows(width, core, HALO)
    with WholeImageNorms(module) as norms:
        while True:
            out, pending = None, False
            for top, bottom, w_top, w_bottom in rows:
                for left, right, w_left, w_right in cols:
                    norms.core = slice(top - w_top, bottom - w_top), slice(left - w_left, right - w_left)
                    try:
                        y = block(x[..., w_top:w_bottom, w_left:w_right])
                    except _StatisticsPending:
                        pending = True
                        continue
                    if out is None:
                        size = round(height * scale), round(width * scale)
                        channels_last = y.is_contiguous(memory_format=torch.channels_last) and y.shape[1] > 1
                        layout = torch.channels_last if channels_last else torch.contiguous_format
                        out = y.new_empty(*y.shape[:2], *size).contiguous(memory_format=layout)
                    r = [round(v * scale) for v in (top, bottom, top - w_top, bottom - w_top)]
                    c = [round(v * scale) for v in (left, right, left - w_left, right - w_left)]
                    out[..., r[0] : r[1], c[0] : c[1]] = y[..., r[2] : r[3], c[2] : c[3]]
            if not pending:
                return out
            norms.finish_pass()


@contextlib.contextmanager
def tiled_blocks(model: nn.Module, elements: int) -> Iterator[None]:
    """While active, the ResnetBlocks, Upsamples and Downsamples of `model` (a VAE Encoder or Decoder) run in
    exact windows (`tiled_block`) sized so that a window holds at most `elements` values per map (channels x
    pixels of the block's widest map); a map that fits in one window runs plainly. Everything else (conv_in,
    attention, norm_out, conv_out) runs on the whole map."""

    def tiled(block: nn.Module) -> Callable:
        plain = block.forward
        scale = 2.0 if isinstance(block, Upsample) else 0.5 if isinstance(block, Downsample) else 1.0

        def forward(x: torch.Tensor, *args) -> torch.Tensor:
            channels = max(x.shape[1], getattr(block, "out_channels", 0))
            side = math.sqrt(elements / channels) / max(scale, 1.0)
            core = max(2 * HALO, int(side) // 2 * 2)
            if max(x.shape[-2:]) <= core:
                return plain(x, *args)
            return tiled_block(lambda t: plain(t, *args), block, x, core, scale)

        return forward

    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock | Upsample | Downsample)]
    for block in blocks:
        block.forward = tiled(block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward

"""CPU fast paths, applied to a built model by the runtime (the model itself uses plain layers).

- `MatmulConv2d`: wide 3x3 convolutions on small feature maps (the SD UNet's 1280-channel 8x8 and 4x4 levels)
  as one matrix product over im2col columns, where oneDNN's direct convolution is slow on such narrow maps.
- The VAE decoder's large levels in channels_last, where oneDNN's convolutions are faster on few-channel,
  large maps.
Both give the plain layers' numbers up to float summation order; BENCHMARKS.md has their measured gains.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that on the CPU runs 3x3 convolutions with at least
    `MATMUL_MIN_CHANNELS` input channels on maps of at most `MATMUL_MAX_PIXELS` pixels as one matrix product for
    the whole batch (its pixels side by side); other inputs take nn.Conv2d's path. The output is contiguous NCHW."""

    MATMUL_MAX_PIXELS = 64
    MATMUL_MIN_CHANNELS = 1024

    def _as_matmul(self, x: torch.Tensor) -> bool:
        if self.in_channels < self.MATMUL_MIN_CHANNELS or x.shape[-2] * x.shape[-1] > self.MATMUL_MAX_PIXELS:
            return False
        plain = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        shape = self.kernel_size == (3, 3) and self.padding == (1, 1) and self.padding_mode == "zeros"
        return plain and shape and x.ndim == 4 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H, W]."""
        if not self._as_matmul(x):
            return super().forward(x)
        b, _, h, w = x.shape
        columns = F.unfold(x, 3, padding=1)  # [B, C_in * 9, H * W]
        columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)  # [C_in * 9, B * H * W]: one product
        weight = self.weight.reshape(self.out_channels, -1)
        out = weight @ columns if self.bias is None else torch.addmm(self.bias[:, None], weight, columns)
        return out.view(self.out_channels, b, h, w).transpose(0, 1).contiguous()


def use_matmul_convolutions(module: nn.Module) -> int:
    """Make every 3x3 nn.Conv2d of `module` wide enough for the matmul path a `MatmulConv2d` (in place: the
    same parameters). Returns how many were switched."""
    switched = 0
    for conv in module.modules():
        if type(conv) is nn.Conv2d and conv.in_channels >= MatmulConv2d.MATMUL_MIN_CHANNELS:
            conv.__class__ = MatmulConv2d
            switched += 1
    return switched


CHANNELS_LAST_PIXELS = 256 * 256  # decoder maps of at least this many pixels run channels_last


def _channels_last_from_here(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a decoder upsampling: its input in channels_last when the map it makes is large."""
    (h,) = args
    if h.device.type == "cpu" and 4 * h.shape[-2] * h.shape[-1] >= CHANNELS_LAST_PIXELS:
        return (h.contiguous(memory_format=torch.channels_last),)
    return None


def _contiguous_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def use_channels_last_decoder(decoder: Decoder) -> None:
    """From the upsampling that makes maps of at least `CHANNELS_LAST_PIXELS` pixels on, run the decoder's layers
    in channels_last (on the CPU); its output stays contiguous NCHW."""
    for level in decoder.up:
        if hasattr(level, "upsample"):
            level.upsample.register_forward_pre_hook(_channels_last_from_here)
    decoder.register_forward_hook(_contiguous_output)


def apply_cpu_fast_paths(model: nn.Module) -> None:
    """The CPU fast paths on a LatentDiffusion: matmul convolutions in the UNet, channels_last in the VAE
    decoder's large levels."""
    use_matmul_convolutions(model.model.diffusion_model)
    decoder = getattr(model.first_stage_model, "decoder", None)
    if isinstance(decoder, Decoder):
        use_channels_last_decoder(decoder)

"""CPU fast paths, applied to a built model by the runtime (the model itself uses plain layers).

- `MatmulConv2d`: wide 3x3 convolutions on small feature maps (the SD UNet's 1280-channel 8x8 and 4x4 levels,
  and its downsampling into them, stride 2) as one matrix product over im2col columns, where oneDNN's direct
  convolution is slow on such narrow maps.
- The VAE decoder's large levels in channels_last, where oneDNN's convolutions are faster on few-channel,
  large maps; in bf16 the whole decoder and the UNet, where torch would reorder NCHW maps for oneDNN's bf16
  convolutions at every layer (`use_channels_last_in_bf16`).
- `PackedLinear`: linear layers (and those matmul convolutions) with their weight handed to oneDNN once in its
  blocked layout, in the dtypes `packed_dtypes` names for this CPU: bf16 where it has bf16 units (otherwise
  oneDNN reorders the whole weight at every call, which costs more than the product itself when few tokens pass
  through the UNet's low levels), and fp32 on x86 CPUs with AVX2 or AVX512, where oneDNN's fp32 products beat
  MKL's (on AMD, MKL runs its AVX2 code) and Winograd's products need them. In a bf16 run they keep their fp32
  weights and pack them in bf16 (`fp32_sources_kept`); the plain weights' checkpoint pages go back to the OS once
  packed (`release_packed_sources`).
- `WinogradConv2d`: wide 3x3 convolutions as Winograd's F(2x2, 3x3) over packed products, 2.25x fewer
  multiplications, where it pays (`winograd_tiles`): in fp32 nearly all the UNet's maps and the VAE decoder's,
  as F(4x4, 3x3) (4x fewer) on maps of 16x16 and more into up to 640 channels; in bf16 the UNet's 8x8 to
  64x64 maps of 640 channels and more where a layer has the work for it (not with AMX, where the next one is
  faster). The convolutions' math (im2col, Winograd's transforms) is `ldm.runtime.convolution`'s.
- `PackedConv2d`: the UNet's other convolutions in bf16 through oneDNN with prepacked kernels.
- `ContextLinear`: the cross-attention's key and value projections of the text context, which is the same at
  every sampling step, computed once while it stays the same.
- `PackedGEGLU`: the transformer's gated GELU as two packed products with GELU and the gating product fused.
- `BlockedAttention`: self-attention as oneDNN products over blocks of queries, one head at a time, instead of
  torch's flash kernel: in bf16 on CPUs with AVX512-BF16 but no AMX (with AMX, the flash kernel is faster), in
  fp32 on AMD CPUs with full-width AVX512 (Zen 5), where torch's fp32 products are MKL's AVX2 code at half speed.
Every product runs over all the intra-op threads (`ldm.runtime.threads` says why not in parts). All give the
plain layers' numbers up to float summation order; BENCHMARKS.md has their measured gains.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ldm.modules.attention import GEGLU, BasicTransformerBlock, CrossAttention
from ldm.modules.diffusionmodules.model import Decoder
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.runtime.bf16 import cpu_has_amx, cpu_has_full_width_avx512_on_amd, cpu_has_native_bf16
from ldm.runtime.budget import available_bytes
from ldm.runtime.convolution import (
    F2X2,
    F4X4,
    WinogradTiles,
    is_channels_last,
    pixel_neighbourhoods,
    winograd_conv3x3,
    winograd_weights,
)
from ldm.runtime.memory import low_precision, release_tensor_pages
from ldm.runtime.threads import intra_op_threads


def packed_dtypes() -> frozenset[torch.dtype]:
    """The weight dtypes whose linear layers run prepacked through oneDNN on this CPU (see the module docstring;
    BENCHMARKS.md has the measurements): bf16 with bf16 units, fp32 on x86 CPUs with AVX2 or AVX512."""
    dtypes = set()
    if cpu_has_native_bf16():
        dtypes.add(torch.bfloat16)
    if torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        dtypes.add(torch.float32)
    return frozenset(dtypes)


# plain weights packed since the last release that trigger the next one: each release reads /proc/self/smaps,
# ~70 ms with a full-size model mapped (12 of them were 0.8 s of the first 512² step at 256 MiB)
RELEASE_EVERY_BYTES = 2**30
_packed_sources: list[torch.Tensor] = []  # plain weights packed whose pages are not handed back yet


def _source_key(weight: torch.Tensor, dtype: torch.dtype) -> tuple:
    """What a packed copy of `weight` in `dtype` was made from: its address and version (inference tensors have
    none). A weak reference to its storage goes with the copy (`_made_once`): while that storage lives no other
    weight can sit at its address, so a LoRA set merged into new tensors where the previous set's were just freed
    does not pass for them."""
    version = 0 if weight.is_inference() else weight._version
    return weight.data_ptr(), version, dtype


def _note_packed_source(weight: torch.Tensor) -> None:
    """`weight` now has a packed copy: its pages go back to the OS with the next release, which comes every
    RELEASE_EVERY_BYTES packed and after the forward (`release_packed_sources`)."""
    _packed_sources.append(weight)
    if sum(t.numel() * t.element_size() for t in _packed_sources) >= RELEASE_EVERY_BYTES:
        release_packed_sources()


def _made_once(module: nn.Module, slot: str, weight: torch.Tensor, dtype: torch.dtype, make: Callable) -> Any:
    """`make()`, a packed form of `weight` in `dtype`, made once per weight and dtype (`_source_key`, its storage
    still alive) and kept on `module` under `slot` (not in its state_dict); the plain weight's pages go back to
    the OS afterwards (`_note_packed_source`)."""
    key = _source_key(weight, dtype)
    cached = getattr(module, slot, None)
    if cached is None or cached[0] != key or cached[1].expired():
        cached = (key, StorageWeakRef(weight.untyped_storage()), make())
        setattr(module, slot, cached)
        _note_packed_source(weight)
    return cached[2]


def _packed(
    module: nn.Module, weight: torch.Tensor, dtype: torch.dtype, slot: str = "_packed_weight"
) -> torch.Tensor:
    """`weight` [out, in] in `dtype` in oneDNN's blocked layout, made once (`_made_once`) under `slot`."""
    return _made_once(
        module,
        slot,
        weight,
        dtype,
        lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype)),
    )


@torch.compiler.disable  # plain Python around the (possibly compiled) module
def release_packed_sources(*hook_args: object) -> None:
    """Hand the pages of the plain weights packed so far back to the OS where they are views of the
    memory-mapped checkpoint (`release_tensor_pages`), so the packed copies add no resident memory; the plain
    weights map back in if anything reads them. Also a forward hook of modules with packed layers."""
    release_tensor_pages(_packed_sources)
    _packed_sources.clear()


def _product_dtype(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.dtype | None:
    """The dtype `module`'s product runs in packed, or None for the plain path. Packed products are for inference
    on the CPU (no autograd through them) in `module.packed_dtypes`: the weight's dtype, or autocast's for an
    fp32 weight under CPU autocast (the product autocast would make, from a weight packed in that dtype)."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    dtype = weight.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in module.packed_dtypes else None


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [M, K]^T (+ bias [M]) -> [..., M] as oneDNN's product in x's dtype, `weight` plain or
    packed for oneDNN (`_packed`); not MKL's, which torch picks for fp32 and which runs its AVX2 code on AMD CPUs
    (0.43x oneDNN's speed on Zen 5, BENCHMARKS.md)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """F.linear(x, weight, bias) in `dtype`, the weight given `packed` for oneDNN in `dtype` (see `_packed`).
    x [..., in] -> [..., out]."""
    return onednn_product(x.to(dtype), packed, None if bias is None else bias.to(dtype))


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose weight is prepacked for oneDNN (`packed_linear`) in
    inference on the CPU when its dtype is in `packed_dtypes`; other dtypes, devices and autograd take
    nn.Linear's path."""

    packed_dtypes: frozenset[torch.dtype] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _product_dtype(self, self.weight, x)
        if dtype is None:
            return super().forward(x)
        return packed_linear(x, _packed(self, self.weight, dtype), self.bias, dtype)


class ContextLinear(PackedLinear):
    """PackedLinear fed the text context (the cross-attention's keys and values, `use_context_cache`), which is the
    same at every sampling step: where it packs, it returns its previous output while the input equals the
    previous one (`torch.equal`) and the weight is the one that made it (`_source_key`), the same product
    skipped. x [B, M, in] -> [B, M, out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _product_dtype(self, self.weight, x)
        if dtype is None:
            return super().forward(x)
        key = _source_key(self.weight, dtype)
        cached = getattr(self, "_context_output", None)
        if cached is not None and cached[0] == key and not cached[1].expired():
            previous_input, output = cached[2:]
            if previous_input.dtype == x.dtype and previous_input.equal(x):  # the same shape and values
                return output
        output = super().forward(x)
        self._context_output = (key, StorageWeakRef(self.weight.untyped_storage()), x.clone(), output)
        return output


class PackedGEGLU(GEGLU):
    """GEGLU (same parameters and state_dict) whose projection, where it packs (a `PackedLinear` in inference on
    the CPU), runs as two prepacked products: the gate's with GELU applied and the value's multiplied by that, both
    as oneDNN post-ops on the products' fp32 sums. No [..., 2 * dim_out] intermediate; 1.5x (bf16) and 1.4x
    (fp32) faster at the UNet's 4096-token level, where one 2560-wide product is slow (BENCHMARKS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim_in] -> [..., dim_out]."""
        proj = self.proj
        dtype = _product_dtype(proj, proj.weight, x) if isinstance(proj, PackedLinear) else None
        if dtype is None or proj.bias is None:
            return super().forward(x)
        value_weight, gate_weight = proj.weight.chunk(2)
        value_bias, gate_bias = proj.bias.to(dtype).chunk(2)
        x = x.to(dtype)
        gate = torch.ops.mkldnn._linear_pointwise(
            x, _packed(self, gate_weight, dtype, "_packed_gate"), gate_bias, "gelu", [], "none"
        )
        value = _packed(self, value_weight, dtype, "_packed_value")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, value, value_bias, "mul")


def is_plain_3x3(conv: nn.Conv2d, strides: tuple[int, ...] = (1,)) -> bool:
    """A 3x3 convolution with zero padding 1 and the same stride along both axes, one of `strides`: what the
    matmul path (`MatmulConv2d.MATMUL_STRIDES`) and Winograd's (stride 1) compute."""
    square_stride = conv.stride[0] == conv.stride[1] and conv.stride[0] in strides
    plain = square_stride and conv.dilation == (1, 1) and conv.groups == 1
    return plain and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.padding_mode == "zeros"


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that on the CPU convolves channels_last maps in bf16 (weights
    packed in bf16, `packed_dtypes`) through oneDNN with its kernels prepacked once in oneDNN's blocked layout
    (`_made_once`), instead of reordered at every call: 0.54-0.98x the time of torch's bf16 convolution on the
    UNet's shapes with AMX, with the same numbers (BENCHMARKS.md). Other inputs (fp32, where prepacking measured
    slower on large maps, and NCHW maps) take nn.Conv2d's path. The output is channels_last."""

    # weights prepacked for oneDNN (`use_packed_convolutions`, `use_packed_linears`)
    packed_dtypes: frozenset[torch.dtype] = frozenset()

    def _packed_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """bf16 when this call runs packed (`_product_dtype`) on a channels_last CPU map, else None."""
        plain_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if x.ndim != 4 or not plain_padding or not x.is_contiguous(memory_format=torch.channels_last):
            return None
        dtype = _product_dtype(self, self.weight, x)
        return dtype if dtype == torch.bfloat16 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H', W']."""
        dtype = self._packed_dtype(x)
        if dtype is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), self._packed_kernels(dtype, x.shape), bias, *geometry, "none", [], ""
        )

    def _packed_kernels(self, dtype: torch.dtype, input_size: torch.Size) -> torch.Tensor:
        """The kernels in `dtype` in oneDNN's blocked convolution layout, made once (`_made_once`; the layout
        oneDNN picks for the first input's size serves every size, measured)."""

        def make() -> torch.Tensor:
            return torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach().to(dtype).contiguous(),
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(input_size),
            )

        return _made_once(self, "_packed_conv", self.weight, dtype, make)


class MatmulConv2d(PackedConv2d):
    """nn.Conv2d (same parameters and state_dict) that on the CPU runs 3x3 convolutions (stride 1 or 2, zero
    padding 1) with at least `MATMUL_MIN_CHANNELS` input channels into maps of at most `MATMUL_MAX_PIXELS`
    pixels as one matrix product for the whole batch (its pixels side by side); other inputs take
    PackedConv2d's path. The output is contiguous in the input's memory format (NCHW, or channels_last where the
    packed product runs)."""

    MATMUL_MAX_PIXELS = 64
    MATMUL_MIN_CHANNELS = 1024
    MATMUL_STRIDES = (1, 2)  # 2: the UNet's `Downsample`

    def _as_matmul(self, x: torch.Tensor) -> bool:
        h, w = self._output_size(x)
        if self.in_channels < self.MATMUL_MIN_CHANNELS or h * w > self.MATMUL_MAX_PIXELS:
            return False
        return self._plain_3x3(x, self.MATMUL_STRIDES)

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(H', W') of a 3x3 convolution with zero padding 1 of x [B, C, H, W] at this stride."""
        return (x.shape[-2] - 1) // self.stride[0] + 1, (x.shape[-1] - 1) // self.stride[1] + 1

    def _plain_3x3(self, x: torch.Tensor, strides: tuple[int, ...] = (1,)) -> bool:
        """A 3x3 convolution with a stride of `strides` and zero padding 1 (`is_plain_3x3`) of a CPU batch of
        maps."""
        return is_plain_3x3(self, strides) and x.ndim == 4 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H', W'] (H' = H, or ceil(H / 2) with stride 2)."""
        if not self._as_matmul(x):
            return super().forward(x)
        dtype = _product_dtype(self, self.weight, x)
        if dtype is not None:
            rows = pixel_neighbourhoods(x.to(dtype), self.stride[0])  # [B, H', W', 9 * C_in]
            b, h, w, _ = rows.shape
            out = packed_linear(rows.view(b * h * w, -1), self._packed_taps(dtype), self.bias, dtype)
            out = out.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
            return out if is_channels_last(x) else out.contiguous()
        columns = F.unfold(x, 3, padding=1, stride=self.stride)  # [B, C_in * 9, H' * W']
        b, (h, w) = x.shape[0], self._output_size(x)
        columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)  # [C_in * 9, B * H' * W']
        weight = self.weight.reshape(self.out_channels, -1)
        out = weight @ columns if self.bias is None else torch.addmm(self.bias[:, None], weight, columns)
        return out.view(self.out_channels, b, h, w).transpose(0, 1).contiguous()

    def _packed_taps(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernels as [C_out, 9 * C_in] rows in `pixel_neighbourhoods`' order, in `dtype`, packed for oneDNN,
        made once (`_made_once`). Rounded to `dtype` before they are reordered: torch's fp32 -> bf16 copy into the
        tap order took 4x the time of a plain conversion and a bf16 reorder (24 against 6 ms at 1280 channels)."""

        def make() -> torch.Tensor:
            taps = self.weight.detach().to(dtype).permute(0, 2, 3, 1).reshape(self.out_channels, -1)
            return torch.ops.mkldnn._reorder_linear_weight(taps)

        return _made_once(self, "_packed_weight", self.weight, dtype, make)


WINOGRAD_MIN_CHANNELS = 256  # the fewest input channels any CPU takes Winograd's convolution for
# bf16: the least pixels x C_in x C_out a layer takes Winograd's F2X2 from (Zen 4, batch 2: 1.05-1.4x oneDNN's
# prepacked convolution or the matmul path below, 0.67-1.02x from 2^28.2 on)
WINOGRAD_BF16_MIN_WORK = 2**28
WINOGRAD_4X4_MAX_OUT_CHANNELS = 640  # F4X4's kernels are 4x a layer's weights: not the 1280-channel levels'


def winograd_tiles(
    dtype: torch.dtype, in_channels: int, out_channels: int, pixels: int
) -> WinogradTiles | None:
    """The Winograd tiles that beat the other paths in `dtype` from `in_channels` to `out_channels` on maps of
    `pixels` on this CPU, or None (BENCHMARKS.md has the measurements). From WINOGRAD_MIN_CHANNELS only; F4X4 on
    maps of 16x16 and more into up to WINOGRAD_4X4_MAX_OUT_CHANNELS:
    - with AVX2 only, on maps of up to 128x128, the matmul path's included: fewer multiplications pay for the
      transforms' memory traffic on such slow fp32 units (Zen 1: F4X4 0.37-0.60x the time of oneDNN's
      convolution, 0.63-0.94x F2X2's; F2X2 elsewhere 0.47-0.86x oneDNN's, 0.6-0.9x the matmul path's);
    - fp32 with AVX512: F4X4 on maps of up to 64x64 (Zen 4: 0.46-0.91x oneDNN's convolution, 0.76-0.87x
      F2X2's), F2X2 from 640 channels on maps of 8x8 to 32x32 (0.37-0.76x oneDNN's convolution or the matmul
      path's); 4x4 maps (1.3x) and 128x128 ones (0.8-1.4x) keep the other paths;
    - bf16 with AVX512: F2X2 from 640 channels on maps of 8x8 to 64x64 where the layer has
      WINOGRAD_BF16_MIN_WORK (Zen 4: 0.67-1.02x the time of oneDNN's prepacked bf16 convolution, the 512² step
      0.98x with the 64x64 maps; below it, 640 channels on 16x16 maps and every 8x8 map among them, 1.05-1.4x
      that or the matmul path's); F4X4's tiles, rounded to bf16, make 10x the error; none with AMX,
      where oneDNN's prepacked bf16 convolution (`PackedConv2d`) takes 0.27-0.77x Winograd's time."""
    if in_channels < WINOGRAD_MIN_CHANNELS:
        return None
    four = out_channels <= WINOGRAD_4X4_MAX_OUT_CHANNELS and pixels >= 16 * 16
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return None if pixels > 128 * 128 else F4X4 if four else F2X2
    if dtype == torch.float32 and four and pixels <= 64 * 64:
        return F4X4
    if dtype == torch.float32:
        return F2X2 if in_channels >= 640 and 8 * 8 <= pixels <= 32 * 32 else None
    if cpu_has_amx() or pixels * in_channels * out_channels < WINOGRAD_BF16_MIN_WORK:
        return None
    return F2X2 if in_channels >= 640 and 8 * 8 <= pixels <= 64 * 64 else None


class WinogradConv2d(MatmulConv2d):
    """MatmulConv2d (same parameters and state_dict) that runs 3x3 convolutions as Winograd's F(2x2, 3x3) or
    F(4x4, 3x3) (`winograd_conv3x3`) where it pays on this CPU (`winograd_tiles`): n^2 packed products over
    m x m output tiles in place of 9 taps a pixel, 2.25x or 4x fewer multiplications, for inference on the CPU
    in `packed_dtypes`. Other inputs take MatmulConv2d's path.
    BENCHMARKS.md has the gains and errors."""

    def _winograd_tiles(self, x: torch.Tensor, dtype: torch.dtype) -> WinogradTiles | None:
        """The tiles the product of x [B, C_in, H, W] in `dtype` runs in as Winograd's, or None."""
        if not self._plain_3x3(x):
            return None
        return winograd_tiles(dtype, self.in_channels, self.out_channels, x.shape[-2] * x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H, W]."""
        dtype = _product_dtype(self, self.weight, x)
        tiles = None if dtype is None else self._winograd_tiles(x, dtype)
        if tiles is None:
            return super().forward(x)
        kernels = self._winograd_kernels(dtype, tiles)
        bias = None if self.bias is None else self.bias.to(dtype)

        def products(transformed: torch.Tensor) -> torch.Tensor:
            out = transformed.new_empty(len(kernels), transformed.shape[1], self.out_channels)

            for k, kernel in enumerate(kernels):
                out[k] = onednn_product(transformed[k], kernel, bias if k == tiles.bias_position else None)
            return out

        return winograd_conv3x3(x.to(dtype), products, tiles)

    def _winograd_kernels(self, dtype: torch.dtype, tiles: WinogradTiles) -> list[torch.Tensor]:
        """The n^2 transformed kernels [C_out, C_in] in `dtype`, packed for oneDNN, made once (`_made_once`)."""

        def make() -> list[torch.Tensor]:
            transformed = winograd_weights(self.weight.detach(), dtype, tiles)
            return [torch.ops.mkldnn._reorder_linear_weight(kernel) for kernel in transformed]

        return _made_once(self, f"_winograd{tiles.m}_packed", self.weight, dtype, make)


def use_matmul_convolutions(module: nn.Module) -> int:
    """Make every plain 3x3 nn.Conv2d (`is_plain_3x3` at `MatmulConv2d.MATMUL_STRIDES`) of `module` wide enough
    for the matmul path a `MatmulConv2d` (in place: the same parameters). Returns how many were switched."""
    switched = 0
    for conv in module.modules():
        wide = getattr(conv, "in_channels", 0) >= MatmulConv2d.MATMUL_MIN_CHANNELS
        if type(conv) is nn.Conv2d and wide and is_plain_3x3(conv, MatmulConv2d.MATMUL_STRIDES):
            conv.__class__ = MatmulConv2d
            switched += 1
    return switched


def use_packed_convolutions(module: nn.Module, dtypes: frozenset[torch.dtype] | None = None) -> int:
    """Make every other nn.Conv2d of `module` a `PackedConv2d` (in place: the same parameters) that packs weights
    of `dtypes` (default: `packed_dtypes()`; it runs packed in bf16 only). Returns how many were switched."""
    dtypes = packed_dtypes() if dtypes is None else frozenset(dtypes)
    convs = [conv for conv in module.modules() if type(conv) is nn.Conv2d]
    for conv in convs:
        conv.__class__ = PackedConv2d
        conv.packed_dtypes = dtypes
    return len(convs)


def _winograd_candidates(module: nn.Module) -> list[nn.Conv2d]:
    """The plain 3x3 nn.Conv2d and MatmulConv2d layers (`is_plain_3x3`) of `module` wide enough for Winograd."""
    return [
        conv
        for conv in module.modules()
        if type(conv) in (nn.Conv2d, MatmulConv2d)
        and conv.in_channels >= WINOGRAD_MIN_CHANNELS
        and is_plain_3x3(conv)
    ]


def winograd_fits(module: nn.Module) -> bool:
    """Whether this machine has room for the transformed kernels of `module`'s Winograd layers: 16/9 of their
    weights, 36/9 where F4X4 may run (4.3 GB in fp32 for the SD UNet, 1.8 GB in bf16; the plain
    weights' pages go back to the OS when memory-mapped). At least twice their fp32 size must be free
    (MemAvailable), or the free memory unknown."""
    free = available_bytes("cpu")
    kernels = 0
    for conv in _winograd_candidates(module):  # F4X4 takes a 16x16 map wherever it runs at all
        largest = winograd_tiles(torch.float32, conv.in_channels, conv.out_channels, 16 * 16) or F2X2
        kernels += conv.weight.numel() * largest.n**2 // 9 * 4
    return free is None or free >= 2 * kernels


def use_winograd_convolutions(module: nn.Module, dtypes: frozenset[torch.dtype] | None = None) -> int:
    """Make every plain 3x3 nn.Conv2d or MatmulConv2d of `module` wide enough for the Winograd path a
    `WinogradConv2d` (in place: the same parameters) that packs weights of `dtypes` (default: `packed_dtypes()`),
    and hand the plain weights' pages back after each forward (`release_packed_sources`). Returns how many were
    switched."""
    dtypes = packed_dtypes() if dtypes is None else frozenset(dtypes)
    candidates = _winograd_candidates(module)
    for conv in candidates:
        conv.__class__ = WinogradConv2d
        conv.packed_dtypes = dtypes
    _release_after_forward(module)
    return len(candidates)


CHANNELS_LAST_PIXELS = 256 * 256  # decoder maps of at least this many pixels run channels_last


def _channels_last_from_here(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a decoder upsampling: its input in channels_last when the map it makes is large."""
    (h,) = args
    if h.device.type == "cpu" and 4 * h.shape[-2] * h.shape[-1] >= CHANNELS_LAST_PIXELS:
        return (h.contiguous(memory_format=torch.channels_last),)
    return None


def _runs_in_bf16(module: nn.Module) -> bool:
    """Whether `module`'s convolutions run in bf16: under CPU autocast to bf16, or with a bf16 first one."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return True
    conv = next((layer for layer in module.modules() if isinstance(layer, nn.Conv2d)), None)
    return conv is not None and conv.weight.dtype == torch.bfloat16


def _channels_last_in_bf16(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a CPU batch of maps (the first argument) in channels_last when `module` runs in bf16.
    torch hands oneDNN's bf16 convolutions channels_last maps, reordering NCHW ones at every convolution."""
    if not args or args[0].ndim != 4 or args[0].device.type != "cpu" or not _runs_in_bf16(module):
        return None
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _contiguous_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


ONE_THREAD_NORM_PIXELS = 1024  # from this map size on, torch's channels_last GroupNorm sums groups by thread


class OneThreadGroupNorm(GroupNorm32):
    """GroupNorm32 (same parameters and state_dict) that normalizes channels_last maps of at least
    ONE_THREAD_NORM_PIXELS pixels on one thread. From that size torch's channels_last kernel sums each group in
    per-thread parts, so an image would depend on the thread count (`--threads`) and on its batch; on one thread
    the sums run in one order. It takes 1.5x a two-thread call (an NCHW round trip: 4x). The model's calls run on
    one thread at a time (the server's model worker), so the thread count is the caller's again afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        if not is_channels_last(x) or x.shape[-2] * x.shape[-1] < ONE_THREAD_NORM_PIXELS:
            return super().forward(x)
        with intra_op_threads(1):
            return super().forward(x)


def use_one_thread_norms(module: nn.Module) -> int:
    """Make every GroupNorm32 of `module` a `OneThreadGroupNorm` (in place). Returns how many were switched."""
    norms = [layer for layer in module.modules() if type(layer) is GroupNorm32]
    for norm in norms:
        norm.__class__ = OneThreadGroupNorm
    return len(norms)


def use_channels_last_in_bf16(module: nn.Module) -> None:
    """Run `module` (a UNet or decoder) in channels_last on the CPU when it runs in bf16 (`_runs_in_bf16`): on an
    AMX Xeon its bf16 step at 512² takes 0.84x the time, the bf16 VAE decode 0.66x (BENCHMARKS.md); fp32 is
    unchanged. Its output stays contiguous NCHW, and its images do not depend on the thread count
    (`OneThreadGroupNorm`)."""
    module.register_forward_pre_hook(_channels_last_in_bf16)
    module.register_forward_hook(_contiguous_output)
    use_one_thread_norms(module)


def use_channels_last_decoder(decoder: Decoder) -> None:
    """Run the decoder's layers in channels_last on the CPU: all of them in bf16 (`use_channels_last_in_bf16`), in
    fp32 from the upsampling that makes maps of at least `CHANNELS_LAST_PIXELS` pixels on. Its output stays
    contiguous NCHW."""
    for level in decoder.up:
        if hasattr(level, "upsample"):
            level.upsample.register_forward_pre_hook(_channels_last_from_here)
    use_channels_last_in_bf16(decoder)


def use_packed_linears(module: nn.Module, dtypes: frozenset[torch.dtype] | None = None) -> int:
    """Make every nn.Linear of `module` a `PackedLinear`, every GEGLU a `PackedGEGLU`, and let its
    `PackedConv2d`s (and so matmul and Winograd ones) prepack too (in place: the same parameters), for weights of
    `dtypes` (default: `packed_dtypes()`). Returns how many layers were switched (GEGLUs not counted: their
    projections are)."""
    dtypes = packed_dtypes() if dtypes is None else frozenset(dtypes)
    switched = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
        if type(layer) is GEGLU:
            layer.__class__ = PackedGEGLU
        if isinstance(layer, (PackedLinear, PackedConv2d)):
            layer.packed_dtypes = dtypes
            switched += 1
    _release_after_forward(module)
    return switched


def use_context_cache(module: nn.Module) -> int:
    """Make the key and value projections of every cross-attention to the text context in `module` (a
    BasicTransformerBlock's `attn2`) that pack (`PackedLinear`) a `ContextLinear`. Returns how many were switched."""
    projections = [
        linear
        for block in module.modules()
        if isinstance(block, BasicTransformerBlock)
        for linear in (block.attn2.to_k, block.attn2.to_v)
        if type(linear) is PackedLinear
    ]
    for linear in projections:
        linear.__class__ = ContextLinear
    return len(projections)


def _release_after_forward(module: nn.Module) -> None:
    """`release_packed_sources` as a forward hook of `module`, once."""
    if not any(hook is release_packed_sources for hook in module._forward_hooks.values()):
        module.register_forward_hook(release_packed_sources)


BLOCK_QUERIES = 512
# the fewest keys attention runs blocked over; shorter sequences (the cross-attention's 77 tokens) keep the flash
# kernel: in bf16 (Zen 4) it took 0.53-0.75x the blocked time over 256-768 keys, 0.96-1.12x over 1024
BLOCKED_MIN_KEYS = {torch.bfloat16: 1024, torch.float32: 256}
VALUE_WIDTH_MULTIPLE = 16  # blocked attention's values (and their sum column) are padded to this many columns
# a head whose scores all lie within ±EXP_SCORE_LIMIT takes exp(scores) without subtracting each row's maximum:
# exp stays within bf16's and fp32's normal range (1e-28..1e28), and sums of up to 1e10 keys within fp32's
EXP_SCORE_LIMIT = 64.0


def _exp_without_maximum(q: torch.Tensor, keys: torch.Tensor) -> list[bool]:
    """Per head of q [BH, N, d] and keys [BH, M, d] scaled for base-2 scores (`blocked_attention` in bf16),
    whether bf16 attention may take exp2 of its scores as they are: every |q_i . k_j| <= |q_i| |k_j|
    (Cauchy-Schwarz) is below EXP_SCORE_LIMIT in natural units. torch's bf16 exp takes 0.6x the time of its
    softmax, which is 40-50% of a 4096-token blocked attention."""
    if q.dtype != torch.bfloat16:  # torch's fp32 exp is slower than the one inside its fp32 softmax
        return [False] * q.shape[0]
    norms = [torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32).amax(dim=-1) for t in (q, keys)]
    return (norms[0] * norms[1] < EXP_SCORE_LIMIT * math.log2(math.e)).tolist()


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v, q [B, H, N, d] over k, v [B, H, M, d] -> [B, H, N, d], as oneDNN products
    (`onednn_product`) one head and BLOCK_QUERIES queries at a time (each block's scores stay in cache), in q's
    dtype. Faster than torch's flash kernel in bf16 on CPUs with bf16 units but no AMX (the kernel widens its
    products to fp32 there) and in fp32 on AVX512 CPUs (its products are MKL's).

    The values carry a column of ones, so the product with the attention weights also gives each row's sum, and
    the weights need not be normalized: in fp32 they are the softmax; in bf16 the keys carry log2(e), so that
    the weights are exp2 of the scores (torch's bf16 exp2 takes 0.84-0.89x the time of its exp), less each row's
    maximum unless the scores are bounded (`_exp_without_maximum`: exp alone is 0.82-0.89x the time of a
    softmax). The values are padded with zeros to a multiple of VALUE_WIDTH_MULTIPLE wide: oneDNN takes 1.8x
    longer for the product with the SD's 40-wide values than with 48-wide ones (BENCHMARKS.md)."""
    b, h, n, d = q.shape
    q = q.reshape(b * h, n, d)
    base2 = q.dtype == torch.bfloat16
    keys = k.reshape(b * h, -1, d) * (scale * math.log2(math.e) if base2 else scale)  # [BH, M, d]
    width = (d // VALUE_WIDTH_MULTIPLE + 1) * VALUE_WIDTH_MULTIPLE  # d values, their sum column, zeros
    values = F.pad(v.reshape(b * h, -1, d), (0, width - d)).transpose(1, 2).contiguous()  # [BH, width, M]
    values[:, d] = 1
    out = q.new_empty(b * h, n, width)
    exp_only = _exp_without_maximum(q, keys)

    for head in range(b * h):
        for start in range(0, n, BLOCK_QUERIES):
            rows = slice(start, start + BLOCK_QUERIES)
            scores = onednn_product(q[head, rows], keys[head])  # [block, M]
            if not base2:
                weights = torch.softmax(scores, dim=-1)
            elif exp_only[head]:
                weights = scores.exp2_()
            else:
                weights = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp2_()
            out[head, rows] = onednn_product(weights, values[head])
    return (out[..., :d] / out[..., d : d + 1]).view(b, h, n, d)


class BlockedAttention(CrossAttention):
    """CrossAttention (same parameters and state_dict) whose unmasked attention over at least BLOCKED_MIN_KEYS
    keys (of its dtype) on the CPU runs as `blocked_attention` in `blocked_dtypes`; anything else as CrossAttention
    does."""

    blocked_dtypes: frozenset[torch.dtype] = frozenset()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        blocked = (
            q.dtype in self.blocked_dtypes
            and q.device.type == "cpu"
            and k.shape[-2] >= BLOCKED_MIN_KEYS[q.dtype]
        )
        if not blocked or mask is not None or self.chunk is not None:
            return super().attend(q, k, v, mask)
        return blocked_attention(q, k, v, self.scale)


def blocked_attention_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose self-attention runs blocked (`blocked_attention`) on this CPU: bf16 with bf16 units but
    no AMX, where torch's flash kernel was faster in bf16, and fp32 where oneDNN's products outrun the flash
    kernel's (MKL's) by about 2x (`cpu_has_full_width_avx512_on_amd`, Zen 5: 0.68-0.83x its time). Elsewhere the
    fp32 flash kernel was faster (Zen 4: blocked 1.25-2x its time; AVX2 only: 1.03-1.06x; BENCHMARKS.md)."""
    if cpu_has_amx():
        return frozenset()
    if not cpu_has_full_width_avx512_on_amd():
        return packed_dtypes() - {torch.float32}
    return packed_dtypes()


def use_blocked_attention(module: nn.Module, dtypes: frozenset[torch.dtype] | None = None) -> int:
    """Make every CrossAttention of `module` a `BlockedAttention` (in place) for `dtypes` (default:
    `blocked_attention_dtypes()`). Returns how many were switched."""
    dtypes = blocked_attention_dtypes() if dtypes is None else frozenset(dtypes)
    switched = 0
    for layer in module.modules():
        if type(layer) is CrossAttention:
            layer.__class__ = BlockedAttention
            layer.blocked_dtypes = dtypes
            switched += 1
    return switched


@contextmanager
def fp32_sources_kept(module: nn.Module) -> Iterator[None]:
    """Around a conversion of `module` to bf16 (`low_precision`): its `PackedLinear`s and `PackedConv2d`s (and so
    matmul and Winograd ones) that pack in bf16 keep their fp32 weight and bias, from which they pack under
    autocast (`_product_dtype`): the same bf16 products (Winograd's kernels transformed from the fp32 weights),
    without a bf16 copy beside the packed one, and memory-mapped fp32 weights go back to the OS once packed.
    (Their plain path, a convolution's on NCHW maps, runs under autocast as well.) During the conversion they hold
    empty placeholders, so that it does not copy what is put back (1.2 s of a full-size UNet's preparation)."""
    kept = [
        (layer, layer.weight.data, None if layer.bias is None else layer.bias.data)
        for layer in module.modules()
        if isinstance(layer, PackedLinear | PackedConv2d)
        and torch.bfloat16 in layer.packed_dtypes
        and layer.weight.dtype == torch.float32
    ]
    for layer, weight, bias in kept:
        layer.weight.data = weight.new_empty(0)
        if bias is not None:
            layer.bias.data = bias.new_empty(0)
    try:
        yield
    finally:
        for layer, weight, bias in kept:
            layer.weight.data = weight
            if bias is not None:
                layer.bias.data = bias


def low_precision_with_fast_paths(model: nn.Module, dtype: torch.dtype) -> None:
    """`low_precision` for a LatentDiffusion with the CPU fast paths: the packed layers keep their fp32 sources
    (`fp32_sources_kept`), and the other convolutions of the UNet and the decoder hold their bf16 weights
    channels_last, as their bf16 inputs come (`use_channels_last_in_bf16`; torch would reorder an NCHW weight at
    every call)."""
    with fp32_sources_kept(model.model.diffusion_model):
        low_precision(model, dtype)
    parts = [model.model.diffusion_model, getattr(model.first_stage_model, "decoder", None)]
    for conv in (layer for part in parts if part is not None for layer in part.modules()):
        if isinstance(conv, nn.Conv2d) and conv.weight.dtype == torch.bfloat16:
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)


def apply_cpu_fast_paths(model: nn.Module, unet: bool = True) -> None:
    """The CPU fast paths on a LatentDiffusion: with `unet`, matmul, (memory permitting, `winograd_fits`)
    Winograd and packed convolutions in the UNet, prepacked weights there in the dtypes `packed_dtypes` names
    (the text context's keys and values made once, `use_context_cache`), blocked attention where it pays
    (`blocked_attention_dtypes`), channels_last in bf16 (a UNet that torch.compile will compile gets none:
    inductor makes its own kernels, and cannot lower the packed products); channels_last
    in the VAE decoder, in its large levels in fp32 and throughout in bf16, with packed bf16 convolutions and
    (memory permitting) Winograd's where it pays."""
    if unet:
        use_matmul_convolutions(model.model.diffusion_model)
        if winograd_fits(model.model.diffusion_model):
            use_winograd_convolutions(model.model.diffusion_model)
        if packed_dtypes():
            use_packed_convolutions(model.model.diffusion_model)
            use_packed_linears(model.model.diffusion_model)
            use_context_cache(model.model.diffusion_model)
        if blocked_attention_dtypes():
            use_blocked_attention(model.model.diffusion_model)
        use_channels_last_in_bf16(model.model.diffusion_model)
    decoder = getattr(model.first_stage_model, "decoder", None)
    if isinstance(decoder, Decoder):
        use_channels_last_decoder(decoder)
        if winograd_fits(decoder):
            use_winograd_convolutions(decoder)
        use_packed_convolutions(decoder)

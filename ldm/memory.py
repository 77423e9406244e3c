"""Memory and precision options for inference: tiled VAE decode/encode, chunked attention, keeping only the
module in use on the accelerator (lowvram) or resident in RAM (memory-mapped weights on the CPU), and
low-precision weights (fp16 on CUDA, bf16 on the CPU)."""

import bisect
import ctypes
import mmap
import sys
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn


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


def set_attention_chunk(model: nn.Module, chunk: int | None) -> None:
    """Compute every attention of `model` (UNet cross-attention, VAE mid-block attention) `chunk` queries at a
    time, so the attention matrix never holds more than chunk x keys entries; None computes it whole.
    The result is the same: each query attends independently."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be a positive number of queries, got {chunk}")
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock

    for module in model.modules():
        if isinstance(module, CrossAttention | AttnBlock):
            module.chunk = chunk


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None, **kwargs
) -> torch.Tensor:
    """scaled_dot_product_attention of q [..., N, d] over k, v [..., M, d], `chunk` queries at a time."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if chunk is None or q.shape[-2] <= chunk:
        return sdpa(q, k, v, **kwargs)
    return torch.cat([sdpa(part, k, v, **kwargs) for part in q.split(chunk, dim=-2)], dim=-2)


def lowvram_units(model: nn.Module) -> list[nn.Module]:
    """The large parts of a LatentDiffusion that are used one at a time: text encoder, UNet, VAE encoder,
    VAE decoder."""
    first_stage = model.first_stage_model
    units = [model.cond_stage_model, model.model.diffusion_model]
    units += [getattr(first_stage, name) for name in ("encoder", "decoder") if hasattr(first_stage, name)]
    return [unit for unit in units if isinstance(unit, nn.Module)]


def _move_except(module: nn.Module, device: torch.device, units: list[nn.Module]) -> None:
    """Move everything of `module` to `device` except the `units` (and what they hold)."""
    for child in module.children():
        if any(child is unit for unit in units):
            continue
        if any(m is unit for m in child.modules() for unit in units):
            _move_except(child, device, units)
        else:
            child.to(device)
    for name, param in module._parameters.items():
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)


def enable_lowvram(model: nn.Module, device: torch.device | str, offload: torch.device | str = "cpu") -> None:
    """Run `model` (a LatentDiffusion, anywhere) on `device` keeping only the unit in use (see `lowvram_units`)
    there and the others on `offload`: a unit moves in when its forward starts, and the rest move out. Small
    layers and buffers live on `device`. On a CPU-only run `device` and `offload` are the same: nothing moves."""
    units = lowvram_units(model)
    _move_except(model, torch.device(device), units)

    def bring_in(unit: nn.Module, args) -> None:
        for other in units:
            if other is not unit:
                other.to(offload)
        unit.to(device)

    for unit in units:
        unit.to(offload)
        unit.register_forward_pre_hook(bring_in)


_MADV_DONTNEED = 4
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def _libc_function(name: str) -> Callable | None:
    """The C library's function `name` on Linux (glibc's mallopt, malloc_trim, madvise); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), name, None)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of returning them to the OS (Linux/glibc;
    elsewhere a no-op returning False).

    glibc serves every block over 32 MB with its own mmap and unmaps it when freed, so each large activation
    (a 512² UNet step has many of 40-80 MB) is page-faulted in afresh at every step: about 0.6 M page faults
    per step, 15% of its time on 2 cores (BENCHMARKS.md). With this, they come from the heap, which keeps
    what is freed; peak RSS grows by the heap's spare room (~80 MB at 512²)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _clean_file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) addresses of this process's file-backed mappings holding no privately modified
    (anonymous) page: their pages can be dropped and read back from the file unchanged."""
    spans, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            # a mapping's header: range perms offset dev inode [path]; then "Key: value" lines
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                current = (start, end) if fields[4] != "0" else None
            elif fields[0] == "Anonymous:" and current is not None:
                if fields[1] == "0":
                    spans.append(current)
                current = None
    return sorted(spans)


def release_pages(*modules: nn.Module) -> int:
    """Give the OS back this process's resident pages of the modules' CPU tensors that are views of a
    memory-mapped checkpoint (Linux; elsewhere a no-op). The pages stay in the OS page cache and are mapped
    again on the tensors' next use; tensors in ordinary memory are left alone. Returns the bytes released."""
    madvise = _libc_function("madvise")
    tensors = [
        t
        for module in modules
        for t in chain(module.parameters(), module.buffers())
        if t.device.type == "cpu" and t.numel()
    ]
    if madvise is None or not tensors:
        return 0
    mappings = _clean_file_mappings()
    starts = [start for start, _ in mappings]
    page = mmap.PAGESIZE
    ranges = []
    for t in tensors:
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        i = bisect.bisect_right(starts, begin) - 1
        if i < 0 or end > mappings[i][1]:
            continue
        ranges.append(
            (max(begin // page * page, mappings[i][0]), min(-(-end // page) * page, mappings[i][1]))
        )
    merged: list[list[int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for begin, end in merged:
        if madvise(begin, end - begin, _MADV_DONTNEED) == 0:
            released += end - begin
    return released


def trim_heap() -> bool:
    """Return the heap's free memory to the OS (glibc's malloc_trim; elsewhere a no-op returning False)."""
    malloc_trim = _libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def release_idle_units(model: nn.Module) -> None:
    """On the CPU, keep only the unit in use (see `lowvram_units`) resident: when a unit starts after another
    one ran, the other units' memory-mapped pages are released (`release_pages`) and so is the heap memory the
    last one's activations left free (`trim_heap`). The same numbers, less RSS: at most one of text encoder,
    UNet and VAE halves is mapped at a time."""
    units = lowvram_units(model)
    active: list[nn.Module | None] = [None]

    @torch.compiler.disable  # plain Python around the (possibly compiled) UNet
    def switch_to(unit: nn.Module, args) -> None:
        if active[0] is not unit:
            release_pages(*(other for other in units if other is not unit))
            trim_heap()
            active[0] = unit

    for unit in units:
        unit.register_forward_pre_hook(switch_to)


def low_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold the UNet torso and the VAE decoder in `dtype` (fp16 on CUDA, bf16 on the CPU); the UNet's
    timestep embedding and output layer, its GroupNorms (computed in fp32 anyway), the VAE encoder and
    the text encoder stay fp32 (they run once per image or are precision-sensitive)."""
    unet = model.model.diffusion_model
    unet.convert_to_dtype(dtype)
    decoder = getattr(model.first_stage_model, "decoder", None)
    if decoder is not None:
        decoder.to(dtype)
        for module in decoder.modules():
            if isinstance(module, nn.GroupNorm):
                module.float()


def half_precision(model: nn.Module) -> None:
    """fp16 weights for a CUDA run (see `low_precision`)."""
    low_precision(model, torch.float16)

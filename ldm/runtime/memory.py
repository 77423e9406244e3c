"""Memory mechanisms the runtime applies to a built model: chunked attention, keeping only the module in use on
the accelerator (lowvram) or resident in RAM (memory-mapped weights on the CPU), malloc tuning, and
low-precision weights (fp16 on CUDA, bf16 on the CPU)."""

import bisect
import ctypes
import mmap
from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn

from ldm.heap import libc_function, trim_heap
from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.openaimodel import QKVAttention, QKVAttentionLegacy


def set_attention_chunk(model: nn.Module, chunk: int | None) -> None:
    """Compute every attention of `model` (UNet cross- and self-attention, VAE mid-block attention) `chunk`
    queries at a time, so the attention matrix never holds more than chunk x keys entries; None computes it whole.
    The result is the same: each query attends independently."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be a positive number of queries, got {chunk}")
    for module in model.modules():
        if isinstance(module, CrossAttention | AttnBlock | QKVAttention | QKVAttentionLegacy):
            module.chunk = chunk


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
    return release_tensor_pages(chain.from_iterable(chain(m.parameters(), m.buffers()) for m in modules))


def release_tensor_pages(tensors: Iterable[torch.Tensor]) -> int:
    """`release_pages` for the tensors themselves. Returns the bytes released."""
    madvise = libc_function("madvise")
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
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

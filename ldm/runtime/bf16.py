"""bf16 matrix products on CPUs without bf16 units, and what the CPU has (`cpu_has_*`, `cpu_identity`).

torch runs CPU bf16 matrix products and convolutions through oneDNN where the processor has bf16 instructions
(AVX512-BF16, AMX) or AVX512 to emulate them. On an AVX2-only processor it falls back to plain loops, orders of
magnitude slower than fp32 (BENCHMARKS.md), which made `--precision autocast` there unusable.
`Bf16ProductsInFp32` computes those products in fp32 from the bf16 operands and rounds the result to bf16: bf16
products with fp32 accumulation, which is what bf16 units compute, at fp32 speed. Everything else (elementwise
ops, norms, softmax outside attention) runs in bf16 as before."""

import platform
import re
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

aten = torch.ops.aten

# The ops through which a bf16 model's products reach the kernels: the composite ones (linear, matmul, conv2d,
# einsum, scaled_dot_product_attention) as they arrive under inference_mode, and what they decompose into
# when autograd is on.
PRODUCTS = frozenset(
    {
        aten.linear.default,
        aten.matmul.default,
        aten.einsum.default,
        aten.conv2d.default,
        aten.scaled_dot_product_attention.default,
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.convolution.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products on this CPU (AVX512-BF16, AMX, or AVX512 emulation; on Arm, its
    bf16 extensions). Builds without oneDNN have only torch's own loops: False."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units that oneDNN uses: x86 AVX512-BF16 or AMX. There bf16 products
    run about twice as fast as fp32 (BENCHMARKS.md); plain AVX512 only emulates them (`cpu_has_fast_bf16` is True
    there too), at about fp32 speed, and Arm is not measured yet: both keep fp32 by default."""
    return cpu_has_fast_bf16() and (_cpu_reports("_is_avx512_bf16_supported") or cpu_has_amx())


def cpu_has_amx() -> bool:
    """Whether oneDNN runs bf16 products on this CPU's AMX tiles (Sapphire Rapids and later Xeons), where torch's
    own bf16 attention kernel beats the blocked one of the fast paths (BENCHMARKS.md)."""
    return cpu_has_fast_bf16() and _cpu_reports("_is_amx_tile_supported")


def cpu_has_full_width_avx512_on_amd() -> bool:
    """Whether this is an AMD CPU that runs AVX512 at full width (Zen 5 and later: family 26 on): there oneDNN's
    AVX512 fp32 products take about half the time of MKL's, which runs its AVX2 code on AMD CPUs. Zen 4 splits
    AVX512 instructions in two 256-bit halves, so MKL keeps up with oneDNN there, and on Intel's CPUs MKL runs
    AVX512 itself (BENCHMARKS.md). False where /proc/cpuinfo does not say."""
    fields = _cpuinfo_fields("vendor_id", "cpu family") or {}
    family = fields.get("cpu family", "")
    full_width = fields.get("vendor_id") == "AuthenticAMD" and family.isdigit() and int(family) >= 26
    return full_width and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _cpu_reports(check: str) -> bool:
    """torch.cpu's `check` (e.g. "_is_amx_tile_supported"); False where this torch has no such check."""
    return getattr(torch.cpu, check, lambda: False)()


def _is_bf16(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


class Bf16ProductsInFp32(TorchDispatchMode):
    """While active, matrix products, convolutions and attention with bf16 operands run in fp32 and return
    bf16 (attention's fp32 log-sum-exp, where it returns one, stays fp32 as with the bf16 kernel).

    The operands are widened into one reused fp32 buffer: widening into fresh memory would page-fault it in at
    every product."""

    def __init__(self) -> None:
        super().__init__()
        self._scratch = torch.empty(0)

    def _widened(self, leaves: list) -> list:
        sizes = [leaf.numel() if _is_bf16(leaf) else 0 for leaf in leaves]
        if sum(sizes) > self._scratch.numel():
            self._scratch = torch.empty(sum(sizes))
        widened, offset = [], 0
        for leaf, size in zip(leaves, sizes, strict=True):
            if size:
                leaf = self._scratch[offset : offset + size].view(leaf.shape).copy_(leaf)
                offset += size
            widened.append(leaf)
        return widened

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if not any(_is_bf16(leaf) for leaf in leaves):
            return func(*args, **kwargs)
        args, kwargs = tree_unflatten(self._widened(leaves), spec)
        out = func(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].bfloat16(), *out[1:])
        return out.bfloat16()


def cpu_identity() -> tuple[str, str, frozenset[str]]:
    """The CPU's name, model number and flags as Linux's /proc/cpuinfo gives them (for benchmarks and pinned
    references); elsewhere the platform's processor string, "?" and no flags."""
    fields = _cpuinfo_fields("model name", "model", "flags")
    if fields is None:
        return platform.processor() or "unknown CPU", "?", frozenset()
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    return name, fields.get("model", "?"), frozenset(fields.get("flags", "").split())


def _cpuinfo_fields(*names: str) -> dict[str, str] | None:
    """The value of each field in `names` that Linux's /proc/cpuinfo gives (its last processor's), or None without
    that file."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pattern = rf"^({'|'.join(re.escape(name) for name in names)})\s*:\s*(.*)$"
    return dict(re.findall(pattern, info, re.MULTILINE))

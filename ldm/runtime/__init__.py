"""Runtime policy, in one place: which device, which precision, and what is applied to a built model before it
generates (low-precision weights, tiled VAE, chunked attention, memory residency, threads, torch.compile, the
CPU fast paths). The model classes know nothing of this; the mechanisms live beside this file
(`memory`, `fast_paths`, `bf16`)."""

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import UserError
from ldm.heap import keep_freed_memory, release_warm_heap
from ldm.runtime.bf16 import Bf16ProductsInFp32, cpu_has_fast_bf16, cpu_has_native_bf16
from ldm.runtime.fast_paths import apply_cpu_fast_paths, low_precision_with_fast_paths
from ldm.runtime.memory import (
    enable_lowvram,
    low_precision,
    release_idle_units,
    set_attention_chunk,
)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model (none of these changes the image, except `vae_tiling` at large sizes)."""

    vae_tiling: bool = False  # VAE in overlapping 64x64-latent tiles
    attention_chunk: int | None = None  # queries per attention call
    lowvram: bool = False  # only the module in use on the GPU
    threads: int | None = None  # torch CPU threads (None: default_threads())
    compile: bool = False  # torch.compile the UNet
    backend: str = "torch"  # openvino: the UNet and VAE decoder through OpenVINO (ldm.runtime.openvino)


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        raise UserError(f"--device {name} is not available on this machine: use --device auto or cpu")
    return torch.device(name)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision a run uses: `full` and `autocast` as asked; `auto` (or None) picks autocast on CUDA (fp16),
    autocast on a CPU with native bf16 units (`cpu_has_native_bf16`: bf16), full elsewhere, and prints the
    choice."""
    if precision not in (None, "auto"):
        return precision
    if device.type == "cuda":
        chosen, why = "autocast", "fp16 on CUDA"
    elif device.type == "cpu" and cpu_has_native_bf16():
        chosen, why = "autocast", "bf16: this CPU has bf16 units (AVX512-BF16 or AMX)"
    elif device.type == "cpu":
        chosen, why = "full", "fp32: this CPU has no bf16 units"
    else:
        chosen, why = "full", f"fp32 on {device.type}"
    print(f"precision: {chosen} ({why}; --precision full or autocast to choose)")
    return chosen


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision on a device: fp16 on GPUs, bf16 on the CPU, None for full."""
    if precision == "full":
        return None
    return torch.bfloat16 if device.type == "cpu" else torch.float16


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast at the precision's dtype; on a CPU without bf16 units the bf16 products run in fp32
    (`ldm.runtime.bf16`), where torch's fallback kernels are far slower."""
    dtype = autocast_dtype(precision, device)
    with contextlib.ExitStack() as scope:
        if dtype is not None:
            scope.enter_context(torch.autocast(device.type, dtype=dtype))
        if dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            scope.enter_context(Bf16ProductsInFp32())
        yield


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the number of CPUs this process may run on (its affinity mask;
    os.cpu_count() where there is none)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores_hint(threads: int) -> str | None:
    """A one-line hint when the 1-minute load average says other processes keep the cores busy, so that
    `threads` threads would wait for each other (on a busy 2-core machine 1 thread ran 8x faster than 2);
    None when enough cores are free or the load is unknown."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    free = max(1, math.floor(cpus - load + 0.5))
    if free >= threads:
        return None
    return (
        f"the CPUs are busy (load average {load:.1f} on {cpus} cores): --threads {free} may run several times "
        f"faster than {threads}"
    )


def load_device(device: torch.device, options: RuntimeOptions) -> torch.device:
    """Where to load the weights: the CPU under --lowvram (modules move in when used), else `device`."""
    return torch.device("cpu") if options.lowvram else device


def prepare(
    model: nn.Module,
    device: torch.device,
    precision: str,
    options: RuntimeOptions,
    weights: Callable[[str], dict] | None = None,
) -> None:
    """Apply the runtime to a loaded LatentDiffusion on `device`: low-precision weights for autocast (fp16 on
    CUDA, bf16 on the CPU), tiling, attention chunks, threads (`default_threads` on the CPU unless given, with
    a hint when the cores are busy), compile; on the CPU the fast paths, malloc keeping
    freed activations for reuse, and only the module in use resident; elsewhere --lowvram offloading. A heap
    warmed ahead (`ldm.heap.warm_heap`) goes to the UNet's first step, or back to malloc now without fast paths.
    The openvino backend (CPU only) replaces low precision and the fast paths, both for the modules it runs;
    `weights` says what their weights are (see ldm.runtime.openvino.use_openvino)."""
    openvino = options.backend == "openvino"
    if openvino and (device.type != "cpu" or options.compile or options.attention_chunk is not None):
        raise UserError("--backend openvino runs on the CPU, without --compile or --attention-chunk")
    dtype = autocast_dtype(precision, device)
    fast_paths = device.type == "cpu" and not openvino
    if fast_paths:
        apply_cpu_fast_paths(model, unet=not options.compile)  # (it changes only the UNet and the decoder)
    if dtype is not None and not openvino:
        (low_precision_with_fast_paths if fast_paths else low_precision)(model, dtype)
    if options.vae_tiling:
        if not hasattr(model.first_stage_model, "enable_tiling"):
            raise UserError("--vae-tiling needs a KL autoencoder first stage (AutoencoderKL)")
        model.first_stage_model.enable_tiling()
    if options.attention_chunk is not None:
        set_attention_chunk(model, options.attention_chunk)
    if openvino:
        from ldm.runtime.openvino import use_openvino

        use_openvino(model, precision, weights, decoder=not options.vae_tiling)  # tiled VAE: torch's
    if device.type == "cpu":
        keep_freed_memory()
        release_idle_units(model)
        if options.lowvram:
            print("--lowvram: on the CPU only the module in use stays resident anyway: nothing to offload")
    elif options.lowvram:
        enable_lowvram(model, device)
    if fast_paths and not options.compile:  # the UNet's first step packs into the warmed heap, after its trim
        model.model.diffusion_model.register_forward_pre_hook(release_warm_heap)
    else:
        release_warm_heap()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    elif device.type == "cpu":
        torch.set_num_threads(default_threads())
        hint = busy_cores_hint(torch.get_num_threads())
        if hint:
            print(hint)
    if options.compile:
        model.model.diffusion_model.compile()

"""Will a generation fit in memory? A coarse, deliberately low estimate of a run's peak memory from the image
size, batch and options, checked before the model loads, so `--W 100000` is refused at once instead of
swapping for hours. Only clear misses are refused; `--memory-limit` overrides the machine's figure."""

import os
from dataclasses import dataclass

GIB = 2**30
# Activation bytes, measured order of magnitude for the SD v1 networks in fp32 (lower bounds on purpose):
UNET_BYTES_PER_LATENT_PIXEL = 25_000  # per batch entry (guidance doubles the batch), flash attention
VAE_BYTES_PER_PIXEL = 2_000  # decoder/encoder per image pixel, untiled
VAE_TILED_FRACTION = 0.5  # --vae-tiling keeps the maps between blocks whole: about half the untiled peak
DECODE_BYTES_PER_PIXEL = 3_400  # what an untiled fp32 decode adds, measured at 1024² (BENCHMARKS.md)


@dataclass(frozen=True)
class Estimate:
    weights: int
    unet: int
    vae: int

    @property
    def total(self) -> int:
        return self.weights + max(self.unet, self.vae)


def estimate(height: int, width: int, batch: int, guided: bool, tiled: bool, weights: int) -> Estimate:
    """Peak bytes of generating `batch` images of height x width (factor-8 latents)."""
    latent_pixels = (height // 8) * (width // 8)
    pixels = height * width
    unet = UNET_BYTES_PER_LATENT_PIXEL * latent_pixels * batch * (2 if guided else 1)
    vae = int(VAE_BYTES_PER_PIXEL * pixels * batch * (VAE_TILED_FRACTION if tiled else 1.0))
    return Estimate(weights, unet, vae)


def available_bytes(device_type: str) -> int | None:
    """Memory free for a run: the GPU's free memory on CUDA, MemAvailable on Linux; None when unknown."""
    if device_type == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_limit(device_type: str, limit_gib: float | None = None) -> int | None:
    """Bytes a run may use: `limit_gib` when given (--memory-limit), else what the device has free."""
    return int(limit_gib * GIB) if limit_gib is not None else available_bytes(device_type)


def untiled_decode_fits(pixels: int, batch: int, weights: int, limit_gib: float | None = None) -> bool:
    """Whether decoding `batch` images of `pixels` pixels untiled on the CPU fits beside the weights in the
    machine's free memory (or `limit_gib`), by the measured figure rather than the low estimate; True when
    the free memory is unknown."""
    limit = memory_limit("cpu", limit_gib)
    return limit is None or weights + DECODE_BYTES_PER_PIXEL * pixels * batch <= limit


def size(nbytes: float) -> str:
    """A byte count for a message: '3.2 GiB', or '212 MiB' under 1 GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.0f} MiB"


def check_fits(
    height: int,
    width: int,
    batch: int,
    guided: bool,
    tiled: bool,
    weights: int,
    device_type: str,
    limit_gib: float | None = None,
) -> None:
    """Raise UserError when the run's estimated peak clearly exceeds the memory there is (or `limit_gib`),
    naming the option that would make it fit."""
    from ldm.errors import UserError

    limit = memory_limit(device_type, limit_gib)
    if limit is None:
        return
    need = estimate(height, width, batch, guided, tiled, weights)
    if need.total <= limit:
        return
    where = "GPU" if device_type == "cuda" else "machine"
    have = (
        f"--memory-limit {limit_gib:g} GiB"
        if limit_gib is not None
        else f"{size(limit)} free on this {where}"
    )
    advice = "a smaller size or --n_samples"
    if not tiled and need.vae > need.unet:
        with_tiling = estimate(height, width, batch, guided, True, weights)
        if with_tiling.total <= limit:
            advice = f"--vae-tiling (about {size(with_tiling.total)})"
    raise UserError(
        f"{width}x{height} x {batch} needs about {size(need.total)} at least, more than the {have}: "
        f"use {advice}, or pass --memory-limit GIB to try anyway"
    )


def file_bytes(path: str | os.PathLike) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0

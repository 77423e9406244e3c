"""What the CPU convolution paths of `ldm.runtime.fast_paths` gain over torch's own (oneDNN) convolution: the
matrix product of `MatmulConv2d` (wide layers on <= 64-pixel maps) and Winograd's F(2x2, 3x3) or F(4x4, 3x3) of
`WinogradConv2d` (the tiles `winograd_tiles` picks on this CPU), for the SD v1 UNet's convolution shapes and two of
the VAE decoder's in fp32 and bf16 (errors against fp64), then the whole UNet step with each path switched off and
with F(2x2, 3x3) in place of F(4x4, 3x3).

    python benchmarks/bench_conv.py [--workdir /tmp/sdbench] [--reps 3] [--threads N]

The paths run where `packed_dtypes()` packs (AVX2 or AVX512 for fp32, bf16 units for bf16); elsewhere a row
says so. The
UNet step uses the random-weights checkpoint that bench_vs_diffusers.py saves, prepared as the scripts prepare it
(bf16: fp32 sources kept, autocast); timings interleave the variants.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_diffusers import PROMPT, alternate, load_ours, machine, prepare  # noqa: E402

from ldm.runtime import precision_scope  # noqa: E402
from ldm.runtime.convolution import F2X2, WinogradTiles  # noqa: E402
from ldm.runtime.fast_paths import (  # noqa: E402
    MatmulConv2d,
    WinogradConv2d,
    low_precision_with_fast_paths,
    packed_dtypes,
)

# (input channels, output channels, map side) of the UNet's 3x3 convolutions: 4x4 (matrix products, Winograd's
# F(2x2) with AVX2 only), 8x8 (F(2x2); matrix products with AMX in bf16), 16x16 and 32x32 (Winograd; F(4x4) into
# up to 640 channels in fp32), 64x64 (F(4x4) in fp32); then the VAE decoder's 512-channel 64x64 and 128x128 levels
# (F(4x4) in fp32, at 128x128 with AVX2 only)
SHAPES = [
    (1280, 1280, 4), (2560, 1280, 8), (1280, 1280, 8), (640, 640, 16), (1920, 640, 16), (1280, 1280, 16),
    (2560, 1280, 16), (320, 320, 32), (640, 640, 32), (1920, 640, 32), (1280, 1280, 32), (640, 320, 64),
    (320, 320, 64), (512, 512, 64), (512, 512, 128),
]  # fmt: skip


def conv_row(c_in: int, c_out: int, side: int, dtype: torch.dtype, reps: int) -> str:
    """One table row: this convolution through torch and through the fast path that would take it."""
    torch.manual_seed(0)
    conv = WinogradConv2d(c_in, c_out, 3, padding=1).to(dtype)
    conv.packed_dtypes = packed_dtypes()
    x = torch.randn(2, c_in, side, side).to(dtype)
    tiles = conv._winograd_tiles(x, dtype)
    path = f"winograd {tiles.m}x{tiles.m}" if tiles else "matmul" if conv._as_matmul(x) else "torch"
    label = f"| {str(dtype)[6:]} 3x3 {c_in}->{c_out} at {side}x{side} | {path}"
    if path != "torch" and dtype not in conv.packed_dtypes:
        return f"{label} | not packed on this CPU | | | | |"
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    plain = torch.nn.Conv2d.forward(conv, x)
    fast = conv(x)
    times = alternate({"torch": lambda: torch.nn.Conv2d.forward(conv, x), "fast": lambda: conv(x)}, reps)
    gflop = 2 * 2 * side * side * c_in * c_out * 9 / 1e9
    errors = [(out.double() - exact).abs().max().item() for out in (plain, fast)]
    return (
        f"{label} | {times['torch'] * 1e3:.1f} ms ({gflop / times['torch']:.0f} GFLOP/s) | "
        f"{times['fast'] * 1e3:.1f} ms | {times['fast'] / times['torch']:.2f} | {errors[0]:.1e} | {errors[1]:.1e} |"
    )


def unet_rows(models: dict, size: int, reps: int) -> list[str]:
    """Table rows: the UNet step at `size`² of each model ("fp32", "bf16") with all paths, with Winograd's
    F(2x2, 3x3) only, without Winograd, without both."""
    c = models["fp32"].get_learned_conditioning(["", PROMPT])
    t = torch.full((2,), 500, dtype=torch.long)
    x = torch.randn(2, 4, size // 8, size // 8)
    as_matmul, winograd_tiles = MatmulConv2d._as_matmul, WinogradConv2d._winograd_tiles

    def only_2x2(self: WinogradConv2d, x: torch.Tensor, dtype: torch.dtype) -> WinogradTiles | None:
        return F2X2 if winograd_tiles(self, x, dtype) else None

    rows = []
    for name, unet in models.items():

        def step(variant: str, unet=unet, name=name) -> torch.Tensor:
            MatmulConv2d._as_matmul = as_matmul if variant != "torch" else lambda self, x: False
            WinogradConv2d._winograd_tiles = {"all": winograd_tiles, "2x2": only_2x2}.get(
                variant, lambda self, x, dtype: None
            )
            try:
                with precision_scope("autocast" if name == "bf16" else "full", torch.device("cpu")):
                    return unet.apply_model(x, t, c).float()
            finally:
                MatmulConv2d._as_matmul, WinogradConv2d._winograd_tiles = as_matmul, winograd_tiles

        times = alternate({v: lambda v=v: step(v) for v in ("all", "2x2", "matmul", "torch")}, reps)
        diff = (step("all") - step("matmul")).abs().max().item()
        rows.append(
            f"| {size}², {name} | {times['torch']:.2f} s | {times['matmul']:.2f} s | {times['2x2']:.2f} s | "
            f"{times['all']:.2f} s | {times['all'] / times['matmul']:.2f} | {diff:.1e} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    print(f"Machine: {machine()}. Command: `python benchmarks/bench_conv.py {' '.join(sys.argv[1:])}`\n")
    print(
        "| convolution (batch 2) | path | torch (oneDNN) | fast path | ratio | error torch | error fast path |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for shape in SHAPES:
                print(conv_row(*shape, dtype, opt.reps * 3), flush=True)
        prepare(opt.workdir)
        model = load_ours(opt.workdir / "model.safetensors")
        models = {"fp32": model}
        if torch.bfloat16 in packed_dtypes():
            models["bf16"] = copy.deepcopy(model)  # before any run packs weights (which do not copy)
            low_precision_with_fast_paths(models["bf16"], torch.bfloat16)  # as the scripts prepare bf16
        print(
            "\n| UNet step (batch 2) | torch's convolutions | + matrix products | + Winograd F(2x2) only |"
            " + Winograd | ratio Winograd | max abs diff |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for size in (256, 512):
            for row in unet_rows(models, size, opt.reps):
                print(row, flush=True)


if __name__ == "__main__":
    main()

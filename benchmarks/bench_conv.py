"""What the CPU matrix-product path of `ldm.runtime.fast_paths.MatmulConv2d` gains over torch's own
(oneDNN) convolution: each convolution shape of the SD v1 UNet's low-resolution levels, then the whole UNet step.

    python benchmarks/bench_conv.py [--workdir /tmp/sdbench] [--reps 3] [--threads N]

The UNet step uses the random-weights checkpoint that bench_vs_diffusers.py saves; timings interleave the two paths.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_diffusers import PROMPT, alternate, load_ours, machine, prepare  # noqa: E402

from ldm.runtime.fast_paths import MatmulConv2d  # noqa: E402

# (input channels, output channels, feature map side): the UNet's 3x3 convolutions at 8x8 and 4x4 (256² images),
# and some it leaves to torch: 16x16 (512² images) and narrower layers
SHAPES = [(1280, 1280, 8), (2560, 1280, 8), (1280, 1280, 4), (1280, 1280, 16), (640, 640, 8), (128, 128, 8)]


def conv_row(c_in: int, c_out: int, side: int, reps: int) -> str:
    """One table row: a convolution of this shape through torch and through the matrix-product path."""
    conv = MatmulConv2d(c_in, c_out, 3, padding=1)
    conv.MATMUL_MAX_PIXELS, conv.MATMUL_MIN_CHANNELS = (
        side * side,
        1,
    )  # the matrix-product path, whatever the shape
    x = torch.randn(2, c_in, side, side)
    times = alternate(
        {"torch": lambda: torch.nn.MatmulConv2d.forward(conv, x), "matmul": lambda: conv(x)}, reps
    )
    gflop = 2 * 2 * side * side * c_in * c_out * 9 / 1e9
    diff = (conv(x) - torch.nn.MatmulConv2d.forward(conv, x)).abs().max().item()
    return (
        f"| 3x3 {c_in}->{c_out} at {side}x{side} | {gflop:.2f} | "
        f"{times['torch'] * 1e3:.0f} ms ({gflop / times['torch']:.0f} GFLOP/s) | "
        f"{times['matmul'] * 1e3:.0f} ms ({gflop / times['matmul']:.0f} GFLOP/s) | "
        f"{times['matmul'] / times['torch']:.2f} | {diff:.1e} |"
    )


def unet_row(model, size: int, reps: int) -> str:
    """One table row: the UNet step at `size`² with torch's convolutions only, and with the matrix-product path."""
    c = model.get_learned_conditioning(["", PROMPT])
    t = torch.full((2,), 500, dtype=torch.long)
    x = torch.randn(2, 4, size // 8, size // 8)
    as_matmul = MatmulConv2d._as_matmul

    def step(matmul: bool) -> torch.Tensor:
        MatmulConv2d._as_matmul = as_matmul if matmul else lambda self, x: False
        try:
            return model.apply_model(x, t, c)
        finally:
            MatmulConv2d._as_matmul = as_matmul

    times = alternate({"torch": lambda: step(False), "matmul": lambda: step(True)}, reps)
    diff = (step(True) - step(False)).abs().max().item()
    return (
        f"| {size}² | {times['torch']:.2f} s | {times['matmul']:.2f} s | "
        f"{times['matmul'] / times['torch']:.2f} | {diff:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    print(f"Machine: {machine()}. Command: `python benchmarks/bench_conv.py {' '.join(sys.argv[1:])}`\n")
    print("| convolution (batch 2) | GFLOP | torch (oneDNN) | matrix product | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for shape in SHAPES:
            print(conv_row(*shape, opt.reps * 3), flush=True)
        prepare(opt.workdir)
        model = load_ours(opt.workdir / "model.safetensors")
        print(
            "\n| UNet step (batch 2) | torch convolutions | with the matrix-product path | ratio | max abs diff |"
        )
        print("|---|---:|---:|---:|---:|")
        for size in (256, 512):
            print(unet_row(model, size, opt.reps), flush=True)


if __name__ == "__main__":
    main()

"""Merge Stable Diffusion checkpoints as A1111's checkpoint merger does, streaming tensor by tensor:

    python scripts/merge.py A.safetensors B.safetensors merged.safetensors --multiplier 0.3
        weighted sum: A * (1 - m) + B * m
    python scripts/merge.py A.safetensors B.safetensors merged.safetensors --c C.safetensors --multiplier 1
        add difference: A + (B - C) * m   (e.g. A = a model, B = sd-v1-5-inpainting, C = sd-v1-5)

Inputs may be .safetensors (read tensor by tensor), .ckpt (read safely, memory-mapped) or diffusers folders; the
output is .safetensors. An inpainting model must be A when merged with a normal one."""

import argparse
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="model A (the primary model; its other tensors are kept)")
    parser.add_argument("b", type=Path, help="model B")
    parser.add_argument("output", type=Path, help="merged model (.safetensors)")
    parser.add_argument(
        "--c", type=Path, default=None, help="model C: switches to add-difference A + (B - C) * m"
    )
    parser.add_argument(
        "--multiplier",
        "-m",
        type=float,
        default=0.5,
        help="m: B's share, or the difference's scale (default 0.5)",
    )
    parser.add_argument("--fp16", action="store_true", help="store the merged network weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    import torch

    from ldm.adapters.merge import merge_checkpoints

    mode = "add-difference" if args.c is not None else "weighted-sum"
    counts = merge_checkpoints(
        args.a,
        args.b,
        args.output,
        args.multiplier,
        mode=mode,
        c_path=args.c,
        dtype=torch.float16 if args.fp16 else None,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.output} ({mode}, m={args.multiplier:g}): {counts['merged']} tensors merged, "
        f"{counts['copied']} copied from A, {counts['dropped']} left out"
    )


if __name__ == "__main__":
    arguments = parse_args()  # --help and flag errors end here, before torch is imported
    from ldm.cli import run_cli

    run_cli(lambda: main(arguments))

"""Convert a Stable Diffusion v1 checkpoint: `.ckpt` <-> `.safetensors` <-> diffusers folder, to fp16, with the
EMA weights, without training state, with LoRAs baked in.

    python scripts/convert.py sd-v1-5.ckpt sd-v1-5.safetensors --fp16
    python scripts/convert.py sd-v1-5.safetensors sd-v1-5-diffusers/        (a diffusers pipeline folder)
    python scripts/convert.py sd-v1-5-diffusers/ back.safetensors
    python scripts/convert.py v1-5-full.ckpt v1-5-ema.safetensors --ema --lora style.safetensors:0.8

The output's suffix picks the format: .safetensors, .ckpt, anything else is a diffusers folder. Nothing is
written unless the whole output is (an existing output is replaced only with --overwrite)."""

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "input", type=Path, help="checkpoint (.ckpt, .safetensors, .pt, .bin) or diffusers folder"
    )
    parser.add_argument("output", type=Path, help="output: .safetensors, .ckpt, or a folder path (diffusers)")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="model config of a single-file input, used for a diffusers output (default: the SD v1 config)",
    )
    parser.add_argument("--fp16", action="store_true", help="store the network weights as float16")
    parser.add_argument(
        "--ema",
        action="store_true",
        help="use the EMA weights (model_ema.*) of a full checkpoint for the UNet",
    )
    parser.add_argument(
        "--keep-training-state",
        action="store_true",
        help="keep model_ema.* and the autoencoder's loss weights (by default they are pruned)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="bake a LoRA into the weights (weight default 1.0); repeatable",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    import torch
    from omegaconf import OmegaConf

    from ldm.adapters.convert import convert
    from ldm.adapters.lora import parse_lora_arg
    from ldm.errors import UserError

    if not args.config.is_file():
        raise UserError(f"config not found: {args.config}")
    loras = [parse_lora_arg(value) for value in args.lora]
    for path, _ in loras:
        if not Path(path).is_file():
            raise UserError(f"LoRA not found: {path}")
    kind = convert(
        args.input,
        args.output,
        config=OmegaConf.load(args.config),
        ema=args.ema,
        prune=not args.keep_training_state,
        dtype=torch.float16 if args.fp16 else None,
        loras=loras,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output} ({kind})")


if __name__ == "__main__":
    arguments = parse_args()  # --help and flag errors end here, before torch is imported
    from ldm.cli import run_cli

    run_cli(lambda: main(arguments))

"""Sample a prompt set at several guidance scales for FID / CLIP-score evaluation, on one or many processes.

    python scripts/sample_dataset.py --ckpt shapes --prompts prompts.txt --outdir outputs/sweep \\
        --scales 1.5,2,3,4,5,6,7,8 --steps 50
    python scripts/sample_dataset.py ... --devices 8 --strategy ddp            # 8 GPUs through Lightning
    torchrun --nproc_per_node 8 scripts/sample_dataset.py ... --devices 8      # or under torchrun

Prompts come from a .txt file (one per line), a .jsonl file ({"caption": ..., "id": ...}) or a COCO captions
.json. Images go to OUTDIR/scale_<s>/<shard>/<prompt>_<image>.png with a manifest per shard and
OUTDIR/manifest.jsonl; a rerun with the same flags finishes an interrupted sweep (see ldm.evaluation.sweep).
"""

import argparse
import os
from pathlib import Path

from ldm.bundled import bundled_model, resolve_model
from ldm.cli import run_cli
from ldm.errors import UserError
from ldm.models.diffusion.registry import SAMPLERS, canonical_name

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
FILES_PER_FOLDER = 1000


def parse_scales(text: str) -> list[float]:
    """ "1.5,2,3" -> [1.5, 2.0, 3.0] (duplicates dropped, order kept)."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad scale list {text!r}: write numbers joined by commas") from None
    if not scales:
        raise argparse.ArgumentTypeError("no scales given: write e.g. 1.5,2,3")
    return list(dict.fromkeys(scales))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", required=True, help="prompt file: .txt, .jsonl or COCO captions .json")
    parser.add_argument("--n_prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--outdir", default="outputs/sweep", help="folder of the images and manifests")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint path, or a bundled model's name")
    parser.add_argument(
        "--config", default=None, help=f"model config (default: {DEFAULT_CONFIG}, or the bundled model's)"
    )
    parser.add_argument("--sampler", default="plms", help=f"sampler: {', '.join(SAMPLERS)}")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=parse_scales("1.5,2,3,4,5,6,7,8"),
        help="guidance scales, comma-separated",
    )
    parser.add_argument("--n_images", type=int, default=1, help="images per prompt (and scale)")
    parser.add_argument(
        "--H", type=int, default=None, help="image height (default: 512, or the bundled model's)"
    )
    parser.add_argument(
        "--W", type=int, default=None, help="image width (default: 512, or the bundled model's)"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="base seed: image j of prompt i has seed f(seed, i, j)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images sampled together")
    parser.add_argument(
        "--shard_size",
        type=int,
        default=None,
        help=f"prompts per shard/folder (default: {FILES_PER_FOLDER} images per folder)",
    )
    lightning = parser.add_argument_group("lightning", "where the processes run")
    lightning.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    lightning.add_argument("--devices", type=int, default=1, help="processes (devices) per node")
    lightning.add_argument("--num_nodes", type=int, default=1, help="nodes")
    lightning.add_argument("--strategy", default="auto", help="e.g. ddp (several devices)")
    lightning.add_argument(
        "--precision", default="32-true", help="Lightning precision, e.g. 16-mixed on GPUs"
    )
    lightning.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: cores / devices); CPU runs give the same pixels at the same --threads",
    )
    return parser  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    opt = get_parser().parse_args(argv)
    # heavy imports after parsing, so that --help is instant
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from ldm.checkpoint import cached_model_hash, load_model_from_config
    from ldm.evaluation.prompts import load_prompts
    from ldm.evaluation.sweep import SweepModule, SweepSettings, check_settings, prompts_hash

    try:
        sampler = canonical_name(opt.sampler)
    except ValueError as error:
        raise UserError(str(error)) from None
    bundled = bundled_model(opt.ckpt)
    height = opt.H or (bundled.height if bundled else 512)
    width = opt.W or (bundled.width if bundled else 512)
    if height % 8 or width % 8:
        raise UserError(f"--H {height} --W {width}: image sides must be multiples of 8")
    for name in ("steps", "n_images", "batch_size", "devices", "num_nodes"):
        if getattr(opt, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if opt.n_prompts is not None and opt.n_prompts < 1:
        raise UserError("--n_prompts must be at least 1")
    prompts = load_prompts(opt.prompts)[: opt.n_prompts]
    try:
        config_path, ckpt_path = resolve_model(opt.ckpt, opt.config or (None if bundled else DEFAULT_CONFIG))
    except ValueError as error:
        raise UserError(str(error)) from None
    if not Path(ckpt_path).is_file():
        raise UserError(
            f"checkpoint {ckpt_path} not found: pass --ckpt with a checkpoint file or a bundled name"
        )

    settings = SweepSettings(
        model_hash=cached_model_hash(ckpt_path),
        prompts_hash=prompts_hash(prompts),
        sampler=sampler,
        steps=opt.steps,
        height=height,
        width=width,
        n_images=opt.n_images,
        seed=opt.seed,
        shard_size=opt.shard_size or max(1, FILES_PER_FOLDER // opt.n_images),
        batch_size=opt.batch_size,
    )
    out = Path(opt.outdir)
    check_settings(out, settings)

    torch.set_num_threads(opt.threads or max(1, (os.cpu_count() or 1) // opt.devices))
    model = load_model_from_config(OmegaConf.load(config_path), ckpt_path, verbose=False)
    module = SweepModule(model, prompts, opt.scales, settings, out)
    trainer = pl.Trainer(
        accelerator=opt.accelerator,
        devices=opt.devices,
        num_nodes=opt.num_nodes,
        strategy=opt.strategy,
        precision=opt.precision,
        use_distributed_sampler=False,  # SweepModule hands whole shards to ranks itself
        logger=False,
        enable_progress_bar=False,  # one bar per rank instead, counting images
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(module, return_predictions=False)


if __name__ == "__main__":
    run_cli(main)

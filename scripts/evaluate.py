"""FID and CLIP score of guidance sweeps (made by scripts/sample_dataset.py), per scale, as CSV and as the
README's plot of FID against CLIP score, one line per checkpoint.

    python scripts/evaluate.py --sweeps outputs/sweep-ckptA outputs/sweep-ckptB --labels A B \\
        --reference coco-val2014-images/ --outdir outputs/eval

FID uses Inception-v3 pool features (torchvision's weights, from --inception or torchvision's cache) against
the images under --reference (their statistics are cached by content); CLIP score uses CLIP ViT-L/14 from the
Hugging Face cache or --clip. For the bundled `shapes` model the adherence to the caption (shape, color and
background read back from the image) is a third column; --shapes_reference N renders a reference set.
"""

import argparse
import os
from pathlib import Path

from ldm.cli import run_cli
from ldm.errors import UserError

DEFAULT_STATS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm" / "fid-stats"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sweeps", nargs="+", required=True, help="output folders of scripts/sample_dataset.py"
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="one name per sweep (default: folder names)"
    )
    parser.add_argument("--reference", default=None, help="folder of reference images for FID (none: no FID)")
    parser.add_argument(
        "--reference_size",
        type=int,
        default=None,
        help="center-crop and resize the reference images to this square size (sets of mixed sizes, e.g. COCO)",
    )
    parser.add_argument(
        "--shapes_reference",
        type=int,
        default=0,
        help="first render N images of ldm.data.shapes into an empty --reference",
    )
    parser.add_argument(
        "--features",
        choices=("inception", "random"),
        default="inception",
        help="FID features: Inception-v3, or a small fixed random network (offline smoke runs)",
    )
    parser.add_argument(
        "--inception", default=None, help="Inception-v3 weights file (default: torchvision's cache)"
    )
    parser.add_argument(
        "--clip",
        default=None,
        help="CLIP model: HF id in the local cache or a folder (default: openai/clip-vit-large-patch14)",
    )
    parser.add_argument("--no_clip", action="store_true", help="skip the CLIP score")
    parser.add_argument(
        "--stats_cache",
        default=str(DEFAULT_STATS_CACHE),
        help="folder caching reference statistics ('' : none)",
    )
    parser.add_argument("--outdir", default="outputs/eval", help="where metrics.csv and the plot go")
    parser.add_argument(
        "--x",
        choices=("clip_score", "shape_adherence"),
        default=None,
        help="the plot's x axis (default: CLIP score, or shapes adherence with --no_clip)",
    )
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    return parser  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    opt = get_parser().parse_args(argv)
    import torch

    from ldm.evaluation.clip_score import DEFAULT_CLIP, ClipEmbedder
    from ldm.evaluation.features import InceptionV3Features, RandomConvFeatures
    from ldm.evaluation.fid import reference_stats
    from ldm.evaluation.report import evaluate_sweep, plot_curves, write_csv, write_shapes_reference

    labels = opt.labels or [Path(s).name for s in opt.sweeps]
    if len(labels) != len(opt.sweeps):
        raise UserError(
            f"{len(opt.sweeps)} sweeps but {len(labels)} labels: pass one --labels entry per sweep"
        )
    if opt.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(opt.device)

    extractor = reference = None
    if opt.reference:
        if opt.shapes_reference and not any(Path(opt.reference).glob("*.png")):
            write_shapes_reference(opt.reference, opt.shapes_reference)
        extractor = (
            InceptionV3Features(opt.inception) if opt.features == "inception" else RandomConvFeatures()
        )
        extractor = extractor.to(device)
        reference = reference_stats(
            opt.reference, extractor, opt.stats_cache or None, opt.batch_size, opt.reference_size
        )
        print(f"reference: {reference.n} images under {opt.reference} ({extractor.name} features)")
    clip = None if opt.no_clip else ClipEmbedder(opt.clip or DEFAULT_CLIP, device)

    results = []
    for sweep, label in zip(opt.sweeps, labels, strict=True):
        results += evaluate_sweep(sweep, label, extractor, reference, clip, opt.batch_size)
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "metrics.csv")
    print((out / "metrics.csv").read_text(), end="")
    x = opt.x or ("clip_score" if clip is not None else "shape_adherence")
    if reference is not None:
        fid_label = "FID" if opt.features == "inception" else f"FID ({extractor.name} features)"
        plot_curves(
            results, out / f"fid_vs_{x}.png", x=x, y="fid", title=opt.title, axis_labels={"fid": fid_label}
        )
        print(f"plot: {out / f'fid_vs_{x}.png'}")


if __name__ == "__main__":
    run_cli(main)

"""Metrics of a sweep (the output folder of scripts/sample_dataset.py) per guidance scale, as CSV and as the
README's FID-vs-CLIP-score plot (one line per checkpoint, one point per scale)."""

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.shape_analysis import analyze_shape_image, caption_attributes
from ldm.data.shapes import make_example
from ldm.errors import UserError
from ldm.evaluation.clip_score import ClipEmbedder
from ldm.evaluation.fid import FeatureStats, fid_from_stats
from ldm.evaluation.images import load_images
from ldm.evaluation.sweep import MANIFEST

METRIC_LABELS = {
    "fid": "FID",
    "clip_score": "CLIP score",
    "shape_adherence": "shape/color/background adherence (%)",
}


@dataclass
class ScaleResult:
    """One point of the plot: a checkpoint's metrics at one guidance scale (None: not measured)."""

    label: str
    scale: float
    n_images: int
    fid: float | None
    clip_score: float | None
    shape_adherence: float | None  # % of images showing their caption's shape, color and background


def read_manifest(sweep: str | Path) -> list[dict]:
    path = Path(sweep) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: finish the sweep first (rerun scripts/sample_dataset.py)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def is_shapes_prompt(prompt: str) -> bool:
    try:
        caption_attributes(prompt)
    except ValueError:
        return False
    return True


def shape_matches(images: torch.Tensor, prompts: Sequence[str]) -> list[bool]:
    """Whether each uint8 image [3, H, W] shows its shapes caption's shape, color and background
    (ldm.data.shape_analysis, the bundled model's own judge)."""
    matches = []
    for image, prompt in zip(images, prompts, strict=True):
        got = analyze_shape_image(image.permute(1, 2, 0).numpy())
        want = caption_attributes(prompt)
        matches.append(all(got[key] == want[key] for key in want))
    return matches


def write_shapes_reference(folder: str | Path, n: int, seed: int = 1, resolution: int = 64) -> None:
    """Render examples 0..n-1 of ldm.data.shapes (`seed` 1: not the training draws) as PNGs into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        image, _ = make_example(index, seed, resolution)
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def evaluate_sweep(
    sweep: str | Path,
    label: str,
    extractor: torch.nn.Module | None,
    reference: FeatureStats | None,
    clip: ClipEmbedder | None,
    batch_size: int = 32,
) -> list[ScaleResult]:
    """FID against `reference` (with `extractor`), CLIP score (with `clip`) and, when every prompt is a shapes
    caption, the shapes adherence, per scale of the sweep, ascending."""
    rows_by_scale = defaultdict(list)
    for row in read_manifest(sweep):
        rows_by_scale[row["scale"]].append(row)
    shapes = all(is_shapes_prompt(row["prompt"]) for rows in rows_by_scale.values() for row in rows)
    results = []
    for scale in sorted(rows_by_scale):
        rows = rows_by_scale[scale]
        stats = FeatureStats(extractor.num_features) if extractor is not None else None
        scores, matches = [], []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = load_images([Path(sweep) / row["path"] for row in chunk])
            prompts = [row["prompt"] for row in chunk]
            if stats is not None:
                stats.add(extractor(images))
            if clip is not None:
                scores.append(clip.scores(images, prompts))
            if shapes:
                matches += shape_matches(images, prompts)
        results.append(
            ScaleResult(
                label=label,
                scale=scale,
                n_images=len(rows),
                fid=fid_from_stats(stats, reference) if stats is not None and reference is not None else None,
                clip_score=float(torch.cat(scores).mean()) if scores else None,
                shape_adherence=100.0 * float(np.mean(matches)) if shapes else None,
            )
        )
    return results


def write_csv(results: Sequence[ScaleResult], path: str | Path) -> None:
    """One row per (checkpoint, scale); empty cells for what was not measured."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(ScaleResult)])
        writer.writeheader()
        for result in results:
            writer.writerow(
                {
                    k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                    for k, v in asdict(result).items()
                }
            )


def plot_curves(
    results: Sequence[ScaleResult],
    path: str | Path,
    x: str = "clip_score",
    y: str = "fid",
    title: str = "",
    axis_labels: dict[str, str] | None = None,
) -> None:
    """`y` against `x` over the scales, one line per label, each point annotated with its scale (PNG).
    `axis_labels` overrides METRIC_LABELS, e.g. to name the features of an FID."""
    names = METRIC_LABELS | (axis_labels or {})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    by_label = defaultdict(list)
    for result in results:
        by_label[result.label].append(result)
    for label, points in by_label.items():
        points = [
            p
            for p in sorted(points, key=lambda p: p.scale)
            if getattr(p, x) is not None and getattr(p, y) is not None
        ]
        if not points:
            raise UserError(f"no {names[x]} or {names[y]} for {label}: choose measured metrics to plot")
        xs, ys = [getattr(p, x) for p in points], [getattr(p, y) for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for p, px, py in zip(points, xs, ys, strict=True):
            ax.annotate(f"{p.scale:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(names[x])
    ax.set_ylabel(names[y])
    ax.set_title(title or f"{METRIC_LABELS[y]} vs {METRIC_LABELS[x]} over guidance scales", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

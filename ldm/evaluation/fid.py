"""Frechet distance between the feature distributions of two image sets (FID with Inception-v3 features).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), with each set's feature mean mu and covariance S
(unbiased, n - 1) accumulated in float64 as torchmetrics does. The statistics of a reference folder are cached
under the hash of its files' contents and the extractor's name.
"""

import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from ldm.evaluation.images import batches, image_files


class FeatureStats:
    """Running float64 sums of features [N, D]: count, sum [D] and sum of outer products [D, D]."""

    def __init__(self, num_features: int):
        self.n = 0
        self.sum = np.zeros(num_features, dtype=np.float64)
        self.outer = np.zeros((num_features, num_features), dtype=np.float64)

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        f = np.asarray(torch.as_tensor(features).detach().cpu().double())
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased covariance."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: Path) -> None:
        np.savez(path, n=self.n, sum=self.sum, outer=self.outer)

    @classmethod
    def load(cls, path: Path) -> "FeatureStats":
        with np.load(path) as data:
            stats = cls(data["sum"].shape[0])
            stats.n, stats.sum, stats.outer = int(data["n"]), data["sum"], data["outer"]
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2)), in float64.

    sqrtm of a product of covariances is real in exact arithmetic; rounding leaves tiny imaginary parts, which
    are dropped. Fewer images than features make the covariances singular (scipy then warns; the square root
    is still accurate enough); when sqrtm fails outright, eps * I is added to both (as pytorch-fid does)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def feature_stats(extractor: torch.nn.Module, images: Iterable[torch.Tensor]) -> FeatureStats:
    """Statistics of the extractor's features over uint8 image batches [B, 3, H, W]."""
    stats = FeatureStats(extractor.num_features)
    for batch in images:
        stats.add(extractor(batch))
    return stats


def files_hash(paths: Iterable[Path], root: Path) -> str:
    """sha256 (first 16 hex digits) of the files' paths relative to `root` and their contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def reference_stats(
    folder: str | Path,
    extractor: torch.nn.Module,
    cache_dir: str | Path | None,
    batch_size: int = 32,
    size: int | None = None,
) -> FeatureStats:
    """Feature statistics of every image under `folder` (center-cropped and resized to `size` when given),
    from `cache_dir` when this extractor has seen these exact files before (their content hash), else
    computed and stored there."""
    folder = Path(folder)
    paths = image_files(folder)
    cache = None
    if cache_dir is not None:
        resize = f"-{size}px" if size else ""
        cache = Path(cache_dir) / f"{extractor.name}{resize}-{files_hash(paths, folder)}.npz"
        if cache.is_file():
            return FeatureStats.load(cache)
    stats = feature_stats(extractor, batches(paths, batch_size, size))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.tmp.npz")
        stats.save(tmp)
        tmp.replace(cache)
    return stats

"""Sample a prompt set at several guidance scales, on as many processes as Lightning is given.

The work is fixed by the settings alone, never by the number of processes: prompt i's image j has the seed
`image_seed(seed, i, j)` at every scale; prompts are cut into shards of `shard_size` (one output folder per
shard and scale, `scale_7.5/00000/000123_0.png`), and each shard into batches in a fixed way. Processes take
whole shards (pending shard k goes to rank k mod world_size), so every image comes out of the same batch,
hence the same pixels, whatever the split. Each PNG is written atomically; a shard's manifest
(`manifest.jsonl` in its folder) is written atomically once all its images are there, and rank 0 joins the
shard manifests into `OUT/manifest.jsonl` at the end. A rerun skips shards with a manifest and batches whose
images all exist, so a killed process loses at most the batch it was sampling.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ldm.errors import UserError
from ldm.evaluation.prompts import Prompt
from ldm.models.diffusion.registry import make_sampler
from ldm.outputs import save_png, to_pil

MANIFEST = "manifest.jsonl"
SETTINGS = "sweep.json"


@dataclass(frozen=True)
class SweepSettings:
    """Everything that decides a sweep's images and paths except the scales (a rerun may add scales)."""

    model_hash: str  # ldm.checkpoint.model_hash of the checkpoint
    prompts_hash: str  # prompts_hash() of the prompt set
    sampler: str  # registry name
    steps: int
    height: int
    width: int
    n_images: int  # images per prompt
    seed: int  # base seed
    shard_size: int  # prompts per shard (and output folder)
    batch_size: int  # images sampled together


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    """sha256 (first 16 hex digits) of the prompt set: ids and captions, in order."""
    text = json.dumps([[p.id, p.caption] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def image_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of prompt `prompt_index`'s image `image_index` (the same at every guidance scale), in [0, 2^32)."""
    sequence = np.random.SeedSequence(entropy=base_seed, spawn_key=(prompt_index, image_index))
    return int(sequence.generate_state(1)[0])


def scale_dir(scale: float) -> str:
    """The folder of one guidance scale: `scale_7.5`, `scale_2`."""
    return f"scale_{scale:g}"


def shard_dir(scale: float, shard: int) -> Path:
    """A shard's folder, relative to the output folder."""
    return Path(scale_dir(scale)) / f"{shard:05d}"


def image_path(scale: float, prompt_index: int, image_index: int, shard_size: int) -> Path:
    """An image's path relative to the output folder: `scale_7.5/00000/000123_0.png`."""
    return shard_dir(scale, prompt_index // shard_size) / f"{prompt_index:06d}_{image_index}.png"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it onto `path` (readers see all or nothing)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_settings(out: Path, settings: SweepSettings) -> None:
    """Record the settings in `out/sweep.json`, or check that they match the ones recorded there."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS
    wanted = asdict(settings)
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v]
        if changed:
            raise UserError(
                f"{out} holds a sweep made with other settings ({', '.join(changed)}): "
                "pass another --outdir, or the same settings to resume it"
            )
        return
    write_atomically(path, json.dumps(wanted, indent=1) + "\n")


@dataclass(frozen=True)
class WorkBatch:
    """Images sampled together: one scale, one shard, entries (prompt index, image index).

    `closes_shard`: the last batch of its shard in this run, after which the shard's manifest is written.
    An empty batch only closes its shard (its images were all there already)."""

    scale: float
    shard: int
    entries: tuple[tuple[int, int], ...]
    closes_shard: bool


def plan_work(out: Path, n_prompts: int, scales: Sequence[float], settings: SweepSettings) -> list[WorkBatch]:
    """The batches still to do, shard after shard: shards without a manifest, and in them the batches whose
    images are not all on disk. The batches of a shard are cut the same way in every run."""
    work = []
    for scale in scales:
        for shard in range((n_prompts + settings.shard_size - 1) // settings.shard_size):
            if (out / shard_dir(scale, shard) / MANIFEST).is_file():
                continue
            first = shard * settings.shard_size
            entries = [
                (i, j)
                for i in range(first, min(first + settings.shard_size, n_prompts))
                for j in range(settings.n_images)
            ]
            batches = [
                entries[k : k + settings.batch_size] for k in range(0, len(entries), settings.batch_size)
            ]
            pending = [
                b
                for b in batches
                if not all((out / image_path(scale, i, j, settings.shard_size)).is_file() for i, j in b)
            ]
            pending = pending or [[]]  # all images there: an empty batch writes the manifest
            for k, batch in enumerate(pending):
                work.append(WorkBatch(scale, shard, tuple(batch), closes_shard=k == len(pending) - 1))
    return work


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files that a killed run left in the shard folders (`.NAME-XXXX.tmp`)."""
    for path in out.glob("scale_*/*/.*.tmp"):
        path.unlink(missing_ok=True)


class ShardSampler(Sampler[int]):
    """Indices of the batches of this rank: whole shards, the k-th shard of the work to rank k % world_size
    (no padding and no duplicates: ranks may get one shard more than others)."""

    def __init__(self, work: Sequence[WorkBatch], rank: int, world_size: int):
        shards = list(dict.fromkeys((b.scale, b.shard) for b in work))
        mine = set(shards[rank::world_size])
        self.indices = [k for k, b in enumerate(work) if (b.scale, b.shard) in mine]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def generate_images(
    model: Any,
    sampler: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    scale: float,
    steps: int,
    height: int,
    width: int,
) -> list[Image.Image]:
    """One image per (prompt, seed): x_T [C, H/8, W/8] drawn on the CPU from the image's own seed, then
    `steps` sampler steps at guidance `scale` (eta 0), decoded."""
    shape = (model.channels, height // 8, width // 8)
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with model.ema_scope():
        c = model.get_learned_conditioning(list(prompts))
        uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
        samples, _ = sampler.sample(
            S=steps,
            batch_size=len(prompts),
            shape=shape,
            conditioning=c,
            unconditional_conditioning=uc,
            unconditional_guidance_scale=scale,
            eta=0.0,
            x_T=x_T.to(model.device),
            verbose=False,
        )
        return to_pil(model.decode_first_stage(samples))


def manifest_row(prompts: Sequence[Prompt], settings: SweepSettings, scale: float, i: int, j: int) -> dict:
    """The manifest entry of prompt i's image j at `scale`."""
    return {
        "id": prompts[i].id,
        "prompt": prompts[i].caption,
        "scale": scale,
        "seed": image_seed(settings.seed, i, j),
        "path": image_path(scale, i, j, settings.shard_size).as_posix(),
        "model_hash": settings.model_hash,
        "prompt_index": i,
        "image_index": j,
    }


def shard_rows(prompts: Sequence[Prompt], settings: SweepSettings, scale: float, shard: int) -> list[dict]:
    first = shard * settings.shard_size
    return [
        manifest_row(prompts, settings, scale, i, j)
        for i in range(first, min(first + settings.shard_size, len(prompts)))
        for j in range(settings.n_images)
    ]


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def join_manifests(out: Path) -> int:
    """Write `out/manifest.jsonl`: the rows of every finished shard of every scale in `out`, by scale then
    prompt. Returns the number of rows."""
    rows = []
    for path in out.glob(f"scale_*/*/{MANIFEST}"):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows.sort(key=lambda r: (r["scale"], r["prompt_index"], r["image_index"]))
    write_atomically(out / MANIFEST, _jsonl(rows))
    return len(rows)


class SweepModule(pl.LightningModule):
    """`trainer.predict(SweepModule(...))` samples the sweep into `out`; each predict step is one WorkBatch."""

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Prompt],
        scales: Sequence[float],
        settings: SweepSettings,
        out: str | Path,
    ):
        super().__init__()
        self.model = model
        self.prompts = list(prompts)
        self.scales = list(scales)
        self.settings = settings
        self.out = Path(out)

    def setup(self, stage: str) -> None:
        if self.trainer.global_rank == 0:
            remove_temporaries(self.out)
        self.work = plan_work(self.out, len(self.prompts), self.scales, self.settings)
        self.trainer.strategy.barrier()  # every rank has seen the same files before any rank writes

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(self.work, self.trainer.global_rank, self.trainer.world_size)
        self.n_pending = sum(len(self.work[k].entries) for k in sampler)
        return DataLoader(self.work, batch_size=None, sampler=sampler, collate_fn=lambda batch: batch)

    def transfer_batch_to_device(
        self, batch: WorkBatch, device: torch.device, dataloader_idx: int
    ) -> WorkBatch:
        return batch  # indices only: the tensors are made in predict_step

    def on_predict_start(self) -> None:
        self.diffusion_sampler = make_sampler(self.settings.sampler, self.model)
        rank = self.trainer.global_rank
        self.progress = tqdm(
            total=self.n_pending, desc=f"rank {rank}", unit="img", position=rank, dynamic_ncols=True
        )
        self.n_images, self.seconds = 0, 0.0

    def predict_step(self, batch: WorkBatch, batch_idx: int) -> int:
        """Sample and write the batch (its images not yet on disk); close its shard; the number sampled."""
        settings, out = self.settings, self.out
        if batch.entries:
            start = time.perf_counter()
            seeds = [image_seed(settings.seed, i, j) for i, j in batch.entries]
            captions = [self.prompts[i].caption for i, _ in batch.entries]
            images = generate_images(
                self.model,
                self.diffusion_sampler,
                captions,
                seeds,
                batch.scale,
                settings.steps,
                settings.height,
                settings.width,
            )
            for (i, j), image in zip(batch.entries, images, strict=True):
                path = out / image_path(batch.scale, i, j, settings.shard_size)
                if not path.is_file():  # a batch that a killed run left half-written
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_png(
                        image,
                        path,
                        self.image_parameters(manifest_row(self.prompts, settings, batch.scale, i, j)),
                    )
            self.seconds += time.perf_counter() - start
            self.n_images += len(images)
            self.progress.update(len(images))
        if batch.closes_shard:
            folder = out / shard_dir(batch.scale, batch.shard)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(
                folder / MANIFEST, _jsonl(shard_rows(self.prompts, settings, batch.scale, batch.shard))
            )
        return len(batch.entries)

    def image_parameters(self, row: dict) -> dict:
        """The generation parameters stored in each PNG's text chunk."""
        s = self.settings
        return {
            "prompt": row["prompt"],
            "seed": row["seed"],
            "scale": row["scale"],
            "sampler": s.sampler,
            "steps": s.steps,
            "size": [s.height, s.width],
            "model_hash": s.model_hash,
        }

    def on_predict_end(self) -> None:
        self.progress.close()
        stats = torch.tensor([float(self.n_images), self.seconds], device=self.device)
        # [world_size, 2], on every rank
        gathered = self.trainer.strategy.all_gather(stats).reshape(-1, 2).cpu()
        if self.trainer.global_rank != 0:
            return
        report_throughput(gathered.tolist())
        n_rows = join_manifests(self.out)
        expected = len(self.prompts) * self.settings.n_images * len(self.scales)
        print(f"{self.out / MANIFEST}: {n_rows} images ({expected} in this run's scales)")


def report_throughput(per_rank: Sequence[Sequence[float]]) -> None:
    """Print images/s of each process and of all together ([images, seconds] per rank)."""
    for rank, (n, seconds) in enumerate(per_rank):
        print(
            f"rank {rank}: {int(n)} images in {seconds:.1f} s, {n / seconds if seconds else 0.0:.2f} images/s"
        )
    total = sum(n for n, _ in per_rank)
    wall = max(seconds for _, seconds in per_rank)
    if wall > 0:
        print(f"total: {int(total)} images, {total / wall:.2f} images/s on {len(per_rank)} processes")

"""scripts/sample_dataset.py and ldm.evaluation.sweep: guidance sweeps that give the same files on any number of
processes, and resume after a kill."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption
from ldm.errors import UserError
from ldm.evaluation.prompts import Prompt, load_prompts
from ldm.evaluation.sweep import (
    ShardSampler,
    SweepSettings,
    WorkBatch,
    check_settings,
    image_path,
    image_seed,
    plan_work,
)

SCRIPT = ROOT / "scripts" / "sample_dataset.py"
CAPTIONS = [caption(c, s, b) for b, c, s in itertools.product(BACKGROUNDS, COLORS, SHAPES)]  # 24
# 24 prompts x 2 scales, 8 shards of 3 prompts per scale, batches of 2 (a shard has 2 batches)
SWEEP_FLAGS = [
    "--ckpt",
    "shapes",
    "--scales",
    "2,5",
    "--steps",
    "4",
    "--shard_size",
    "3",
    "--batch_size",
    "2",
]
SWEEP_FLAGS += ["--accelerator", "cpu", "--threads", "1"]


def settings(**changes) -> SweepSettings:
    values = dict(
        model_hash="abc", prompts_hash="def", sampler="plms", steps=4, height=64, width=64, n_images=2, seed=7,
        shard_size=3, batch_size=4,
    )  # fmt: skip
    return SweepSettings(**(values | changes))


def sweep_command(prompts, out, *flags) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--prompts",
        str(prompts),
        "--outdir",
        str(out),
        *SWEEP_FLAGS,
        *flags,
    ]


def run_sweep(prompts, out, *flags) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        sweep_command(prompts, out, *flags), capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def files(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(prompt_file, tmp_path_factory):
    """The sweep written by one process: {path: bytes}."""
    out = tmp_path_factory.mktemp("one") / "sweep"
    result = run_sweep(prompt_file, out)
    assert "images/s" in result.stdout
    return files(out)


def test_one_process_writes_every_image_and_manifest(one_process):
    manifest = [json.loads(line) for line in one_process["manifest.jsonl"].decode().splitlines()]
    assert len(manifest) == 24 * 2
    assert {row["path"] for row in manifest} == {p for p in one_process if p.endswith(".png")}
    assert sum(p.endswith("/manifest.jsonl") for p in one_process) == 16  # one per shard
    by_key = {(row["prompt_index"], row["scale"]): row for row in manifest}
    for i, text in enumerate(CAPTIONS):
        assert by_key[i, 2.0]["prompt"] == by_key[i, 5.0]["prompt"] == text
        assert (
            by_key[i, 2.0]["seed"] == by_key[i, 5.0]["seed"] == image_seed(42, i, 0)
        )  # same noise across scales
        assert by_key[i, 2.0]["path"] == f"scale_2/{i // 3:05d}/{i:06d}_0.png"
    assert one_process["scale_2/00000/000000_0.png"] != one_process["scale_5/00000/000000_0.png"]


def test_two_processes_write_the_same_files(prompt_file, one_process, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(prompt_file, out, "--devices", "2", "--strategy", "ddp")
    assert "rank 1:" in result.stdout and "on 2 processes" in result.stdout
    assert files(out) == one_process


@pytest.mark.slow
def test_torchrun_writes_the_same_files(prompt_file, one_process, tmp_path):
    out = tmp_path / "sweep"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
    ]
    command = torchrun + sweep_command(prompt_file, out, "--devices", "2", "--strategy", "ddp")[1:]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(out) == one_process


def test_killed_run_resumes_to_the_same_files(prompt_file, one_process, tmp_path):
    out = tmp_path / "sweep"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        sweep_command(prompt_file, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_shard = out / "scale_2" / "00000"
    deadline = time.monotonic() + 300
    while (
        not (first_shard / "manifest.jsonl").is_file()
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (first_shard / "manifest.jsonl").is_file()
    assert not (out / "manifest.jsonl").exists()  # killed before the end
    # and as if it were killed while writing the second shard's first batch: one image there, no manifest
    second_shard = out / "scale_2" / "00001"
    (second_shard / "manifest.jsonl").unlink(missing_ok=True)
    for name in ("000004_0.png", "000005_0.png"):
        (second_shard / name).unlink(missing_ok=True)
    kept = {p: p.stat().st_ino for p in first_shard.iterdir()}

    run_sweep(prompt_file, out)
    assert files(out) == one_process
    assert {p: p.stat().st_ino for p in first_shard.iterdir()} == kept  # finished shards are not redone


def test_plan_skips_finished_shards_and_batches(tmp_path):
    s = settings()  # 2 images per prompt, batches of 4: a shard of 3 prompts has batches of 4 and 2 entries
    work = plan_work(tmp_path, 7, [2.0], s)
    assert [(b.shard, len(b.entries), b.closes_shard) for b in work] == [
        (0, 4, False), (0, 2, True), (1, 4, False), (1, 2, True), (2, 2, True),
    ]  # fmt: skip
    for i, j in work[0].entries:  # the first batch of shard 0 is on disk
        path = tmp_path / image_path(2.0, i, j, s.shard_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
    (tmp_path / "scale_2" / "00001").mkdir()
    (tmp_path / "scale_2" / "00001" / "manifest.jsonl").write_text("")  # shard 1 is finished
    assert plan_work(tmp_path, 7, [2.0], s) == [work[1], work[4]]
    path.unlink()  # half of the first batch: it is redone whole
    assert plan_work(tmp_path, 7, [2.0], s) == [work[0], work[1], work[4]]


def test_shard_sampler_splits_whole_shards_without_duplicates():
    work = [
        WorkBatch(scale, shard, ((shard, k),), k == 1)
        for scale in (2.0, 3.0)
        for shard in range(5)
        for k in range(2)
    ]
    for world_size in (1, 2, 3, 4, 7):
        parts = [list(ShardSampler(work, rank, world_size)) for rank in range(world_size)]
        assert sorted(itertools.chain(*parts)) == list(range(len(work)))
        for part in parts:
            shards = {(work[k].scale, work[k].shard) for k in part}
            assert len(part) == 2 * len(shards)  # both batches of a shard on the same rank
        assert max(map(len, parts)) - min(map(len, parts)) <= 2


def test_seeds_depend_on_prompt_and_image_only():
    seeds = {image_seed(42, i, j) for i in range(100) for j in range(4)}
    assert len(seeds) == 400
    assert image_seed(42, 3, 1) == image_seed(42, 3, 1) != image_seed(43, 3, 1)


def test_settings_are_recorded_and_checked(tmp_path):
    check_settings(tmp_path, settings())
    check_settings(tmp_path, settings())  # the same settings resume
    with pytest.raises(UserError, match="steps 4 -> 8"):
        check_settings(tmp_path, settings(steps=8))


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n a dog \n")
    assert load_prompts(text) == [Prompt("0", "a cat"), Prompt("2", "a dog")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a cat", "id": 17}\n{"caption": "a dog"}\n')
    assert load_prompts(jsonl) == [Prompt("17", "a cat"), Prompt("1", "a dog")]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 9, "id": 48, "caption": "A cat. "}]}))
    assert load_prompts(coco) == [Prompt("48", "A cat.")]
    jsonl.write_text('{"text": "a cat"}\n')
    with pytest.raises(UserError, match='no "caption"'):
        load_prompts(jsonl)
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.txt")

"""ldm.heap: the heap warmed on another core is the memory the next allocations get (no page faults for them, on
any thread), it goes to the UNet's first step, and the scripts start it only for CPU runs, sized by the
checkpoint."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm import cli, heap
from ldm.errors import UserError
from ldm.runtime import RuntimeOptions, prepare

ROOT = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(heap.libc_function("malloc") is None, reason="glibc's malloc (Linux)")

# allocates 12 x 16 MiB and prints the page faults that took: after a warmed 256 MiB block, on this thread or
# on a new one
PROBE = """
import resource, sys, threading, torch
from ldm import heap

mode, where = sys.argv[1:]
if mode == "warm":
    assert heap.warm_heap(256 * 2**20)
    heap._warm_block.thread.join()  # let it fault in the whole block
    heap.release_warm_heap()
else:
    assert heap.keep_freed_memory()
faults = []

def allocate():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(4 * 2**20) for _ in range(12)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=allocate) if where == "thread" else None
allocate() if thread is None else (thread.start(), thread.join())
print(faults[0])
"""


def probe_faults(mode: str, where: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, where], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@needs_glibc
@pytest.mark.parametrize("where", ["main", "thread"])
def test_allocations_after_a_warmed_heap_take_its_pages(where):
    """192 MiB of tensors page-fault ~49k times in fresh memory; after `warm_heap` they take the warmed block,
    on the main thread and on another one (one malloc arena)."""
    cold, warm = probe_faults("cold", where), probe_faults("warm", where)
    assert cold >= 40_000
    assert warm < cold / 10


@needs_glibc
def test_one_warm_block_at_a_time_and_release_is_idempotent():
    assert heap.warm_heap(8 * 2**20)
    assert not heap.warm_heap(8 * 2**20)  # one pending block
    heap.release_warm_heap()
    heap.release_warm_heap()  # nothing left: no-op
    assert heap._warm_block is None
    assert not heap.warm_heap(0)


@needs_glibc
def test_the_unets_first_step_releases_the_warm_block(tiny_ldm):
    """prepare() hands the block to the UNet's first forward (after the unit switch's trim), not before."""
    assert heap.warm_heap(8 * 2**20)
    prepare(tiny_ldm, torch.device("cpu"), "full", RuntimeOptions())
    cond = tiny_ldm.get_learned_conditioning(["a"])
    assert heap._warm_block is not None  # the text encoder ran: still held, so its switch's trim keeps it
    x = torch.randn(1, tiny_ldm.channels, tiny_ldm.image_size, tiny_ldm.image_size)
    with torch.inference_mode():
        tiny_ldm.apply_model(x, torch.tensor([10]), cond)
    assert heap._warm_block is None


@needs_glibc
def test_run_cli_frees_a_block_a_refused_run_left():
    assert heap.warm_heap(8 * 2**20)

    def refused() -> None:
        raise UserError("no")

    with pytest.raises(SystemExit):
        cli.run_cli(refused)
    assert heap._warm_block is None


def warm_request(monkeypatch, tmp_path, **flags) -> int | None:
    """The bytes `warm_heap_for` asks `warm_heap` for with these options (a 1000-byte checkpoint), or None."""
    asked = []
    monkeypatch.setattr(cli, "warm_heap", lambda nbytes: asked.append(nbytes) or True)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\0" * 1000)
    opt = argparse.Namespace(**({"device": "auto", "backend": "torch", "ckpt": str(ckpt)} | flags))
    return asked[0] if cli.warm_heap_for(opt) else None


@pytest.mark.skipif(not hasattr(cli.os, "sched_getaffinity"), reason="CPU affinity (Linux)")
def test_warm_heap_for_cpu_runs_only_sized_by_the_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cli, "GPU_DEVICE_FILES", ())
    want = int(cli.WARM_BYTES_PER_CHECKPOINT_BYTE * 1000)
    assert 0 < want < 1000
    assert warm_request(monkeypatch, tmp_path) == want
    assert warm_request(monkeypatch, tmp_path, device="cpu") == want
    assert warm_request(monkeypatch, tmp_path, device="cuda") is None
    assert warm_request(monkeypatch, tmp_path, backend="openvino") is None
    assert warm_request(monkeypatch, tmp_path, ckpt=str(tmp_path / "missing.ckpt")) is None
    monkeypatch.setattr(cli, "GPU_DEVICE_FILES", (str(tmp_path / "model.ckpt"),))  # "a GPU is there"
    assert warm_request(monkeypatch, tmp_path) is None  # auto would pick it
    assert warm_request(monkeypatch, tmp_path, device="cpu") == want
    free = {"SC_AVPHYS_PAGES": 2, "SC_PAGE_SIZE": 400}  # 800 bytes free
    monkeypatch.setattr(cli.os, "sysconf", lambda name: free[name])
    assert warm_request(monkeypatch, tmp_path, device="cpu") == 200  # at most a quarter of the free memory
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0})
    assert warm_request(monkeypatch, tmp_path, device="cpu") is None  # no idle core to warm it on

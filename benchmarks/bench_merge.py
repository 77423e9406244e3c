"""Peak memory of merging three full-size SD v1 checkpoints (add difference) with scripts/merge.py.

    python benchmarks/bench_merge.py [--workdir DIR] [--keep] [--write BENCHMARKS.md]

Writes three random SD v1 checkpoints (every key and shape of tests/data/sd-v1-state-dict-manifest.json, networks
in fp16, ~2.1 GB each) into a temporary folder, runs `scripts/merge.py A B out --c C` in a child process and
reports the child's peak resident set (ru_maxrss) against the largest input's size; the target is < 1.5x. The
files are deleted afterwards unless --keep.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.adapters.tensor_files import TensorSpec, write_safetensors  # noqa: E402
from ldm.runtime.bf16 import cpu_identity  # noqa: E402

MANIFEST = ROOT / "tests" / "data" / "sd-v1-state-dict-manifest.json"


def random_checkpoint(path: Path, seed: int) -> None:
    """Every tensor of the SD v1 manifest, random; float networks in fp16 (as shared .safetensors are), the noise
    schedule in fp32; written tensor by tensor so this process stays small too."""
    entries = json.loads(MANIFEST.read_text())["keys"]
    specs = {}
    for entry in entries:
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        if dtype.is_floating_point and "." in entry["key"]:
            dtype = torch.float16
        specs[entry["key"]] = TensorSpec(dtype, tuple(entry["shape"]))
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        spec = specs[key]
        if not spec.dtype.is_floating_point:
            return torch.arange(spec.shape[-1]).expand(spec.shape).to(spec.dtype).contiguous()
        return (torch.randn(spec.shape, generator=generator) * 0.05).to(spec.dtype)

    write_safetensors(path, specs, tensor)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--write", type=Path, default=None, help="append the result to this markdown file")
    opt = parser.parse_args()
    workdir = Path(opt.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / f"{name}.safetensors" for name in "abc"]
    out = workdir / "merged.safetensors"
    try:
        start = time.perf_counter()
        for seed, path in enumerate(paths):
            if not path.exists():
                random_checkpoint(path, seed)
        print(f"checkpoints written in {time.perf_counter() - start:.0f} s")
        command = [sys.executable, str(ROOT / "scripts" / "merge.py"), *map(str, paths[:2]), str(out)]
        command += ["--c", str(paths[2]), "--multiplier", "1", "--overwrite"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        largest = max(p.stat().st_size for p in paths)
        report = (
            f"\n## Merging checkpoints (scripts/merge.py)\n\n"
            f"`python benchmarks/bench_merge.py`: three random full-size SD v1 checkpoints (all 1,143 tensors, "
            f"fp16 networks, {largest / 1e9:.2f} GB each), add difference `A + (B - C) * 1` into a fourth file, "
            f"in a child process on {cpu_identity()[0]} ({platform.system()}).\n\n"
            f"| peak RSS of the merge | largest input | ratio | target | time |\n|---|---|---|---|---|\n"
            f"| {peak / 1e9:.2f} GB | {largest / 1e9:.2f} GB | {peak / largest:.2f}x | < 1.5x | {seconds:.0f} s |\n\n"
            "Inputs are read with positioned reads one tensor at a time (a memory map would count every touched "
            "page of all three files as resident) and the output is written tensor by tensor, so the peak is "
            "the interpreter and torch plus a few of the largest tensors in float32 (the 49408x768 token "
            "embedding: 152 MB each). `.ckpt` inputs go through the memory-mapped safe unpickler instead, whose "
            "touched pages do count.\n"
        )
        print(report)
        if opt.write:
            with open(opt.write, "a") as f:
                f.write(report)
    finally:
        if not opt.keep:
            for path in [*paths, out]:
                path.unlink(missing_ok=True)
            if opt.workdir is None:
                workdir.rmdir()


if __name__ == "__main__":
    main()

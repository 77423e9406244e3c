"""The SD v1 VAE decoder at a given size, tiled and untiled, each in a fresh process: time and the peak resident
memory it adds over the loaded model (random weights: bench_vs_diffusers.py's `prepare` writes them).

    python benchmarks/bench_vae_tiling.py [--workdir /tmp/sdbench] [--size 1024] [--threads 2]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_once(workdir: Path, size: int, tiled: bool) -> dict:
    """Load the model, then decode one random latent of a size x size image; the time and added peak RSS."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.runtime.fast_paths import apply_cpu_fast_paths

    model = load_model_from_config(OmegaConf.load(CONFIG), str(workdir / "model.safetensors"), verbose=False)
    apply_cpu_fast_paths(model)
    if tiled:
        model.first_stage_model.enable_tiling()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    loaded = peak_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        model.decode_first_stage(z)
    return {"seconds": time.perf_counter() - start, "added_peak_mib": peak_rss_mib() - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("tiled", "untiled"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(decode_once(args.workdir, args.size, args.child == "tiled")), flush=True)
        return
    for mode in ("untiled", "tiled"):
        command = [sys.executable, __file__, "--workdir", str(args.workdir), "--size", str(args.size),
                   "--threads", str(args.threads), "--child", mode]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{args.size}x{args.size} VAE decode, {mode}: {result['seconds']:.1f} s, "
              f"+{result['added_peak_mib']:.0f} MiB peak RSS over the loaded model")  # fmt: skip


if __name__ == "__main__":
    main()

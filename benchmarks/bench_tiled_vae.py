"""Peak memory and time of the SD v1 VAE decode (full-size, torch's random init, fp32, CPU) tiled and untiled.

    python benchmarks/bench_tiled_vae.py [--latent 128] [--tile 64] [--reps 2] [--threads N]

Each decode runs in a fresh process, untiled and tiled alternating; the parent prints the medians, the peak RSS
the decode adds to the process (Linux: VmHWM reset before it, minus VmRSS), and the largest difference between
the tiled and untiled images.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"


def rss_mib(field: str) -> float:
    """This process's VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(latent: int, tile: int | None, out: Path) -> None:
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    vae = instantiate_from_config(OmegaConf.load(CONFIG).model.params.first_stage_config).eval()
    with torch.no_grad():
        z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
        vae.enable_tiling(tile)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now (Linux)
        base = rss_mib("VmRSS")
        start = time.perf_counter()
        image = vae.decode(z)
        seconds = time.perf_counter() - start
        peak = rss_mib("VmHWM")
    torch.save(image, out)
    print("RESULT " + json.dumps({"s": seconds, "peak_mib": peak - base, "base_mib": base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent", type=int, default=128, help="latent side (image side / 8)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if opt.child:
        latent, tile, out = opt.child
        return child(int(latent), None if tile == "none" else int(tile), Path(out))
    opt.workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"untiled": [], "tiled": []}
    for _ in range(opt.reps):
        for name, tile in (("untiled", "none"), ("tiled", str(opt.tile))):
            args = [
                sys.executable,
                __file__,
                "--child",
                str(opt.latent),
                tile,
                str(opt.workdir / f"{name}.pt"),
            ]
            if opt.threads:
                args += ["--threads", str(opt.threads)]
            done = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs[name].append({**json.loads(line[7:]), "load": os.getloadavg()[0]})
            print(name, runs[name][-1], flush=True)
    images = {name: torch.load(opt.workdir / f"{name}.pt") for name in runs}
    summary = {
        name: {
            "median_s": statistics.median(r["s"] for r in done),
            "peak_rss_above_model_mib": statistics.median(r["peak_mib"] for r in done),
            "load_1min": [round(r["load"], 1) for r in done],
        }
        for name, done in runs.items()
    }
    summary["max_abs_diff"] = (images["tiled"] - images["untiled"]).abs().max().item()
    summary["image_std"] = images["untiled"].std().item()
    summary["image_px"] = opt.latent * 8
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

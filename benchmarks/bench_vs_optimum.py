"""Whole txt2img against optimum-intel's OpenVINO pipeline (`OVStableDiffusionPipeline`), same weights.

    python benchmarks/bench_vs_optimum.py --optimum-python /path/to/venv/bin/python [--size 512] [--steps 20]
        [--reps 2] [--threads 2] [--ours-openvino] [--sd-cpp PATH/sd] [--workdir /tmp/sdbench] [--write FILE]

optimum-intel pins its own transformers, so it lives in a virtual environment of its own, named by
`--optimum-python` (`python -m venv V && V/bin/pip install torch==2.14.1 "optimum-intel[openvino]" diffusers`).
The full-size random SD v1 weights of bench_vs_diffusers.py (`prepare`) are saved once as a diffusers folder
(here) and exported once to OpenVINO IR in fp32 (there, `--weight-format fp32`: no weight compression); those
one-time conversions are not timed, as our own checkpoint is not converted either.

Each image runs in a fresh process, ours and OpenVINO's alternated, everything a user waits for counted: imports,
load, OpenVINO's compile (its compiled-model cache on; the first OpenVINO process fills it and is reported
apart), prompt, 20 DDIM steps at guidance 7.5, decode, PNG. Both run at their default precision on this CPU
(ours `--precision auto`, OpenVINO's default inference precision), with static shapes for OpenVINO
(`pipe.reshape`, what its docs advise for speed). Reported: wall time and peak RSS of each process, medians.
`--ours-openvino` adds our txt2img with `--backend openvino` (its first run, converting into
~/.cache/stable-diffusion/openvino, reported apart); `--sd-cpp PATH` adds stable-diffusion.cpp's binary on the
same .safetensors file (its euler sampler: one UNet call a step, as DDIM).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
SCALE = 7.5


def child_openvino(ov_dir: Path, size: int, steps: int, threads: int, outdir: Path) -> None:
    """optimum-intel's pipeline, as its docs use it: load the IR, reshape to static shapes, compile, generate."""
    from diffusers import DDIMScheduler
    from optimum.intel import OVStableDiffusionPipeline

    config = {"CACHE_DIR": str(ov_dir / "model_cache"), "INFERENCE_NUM_THREADS": str(threads)}
    pipe = OVStableDiffusionPipeline.from_pretrained(ov_dir, compile=False, ov_config=config)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    import numpy as np

    np.random.seed(42)
    image = pipe(
        PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=SCALE, eta=0.0
    ).images[0]
    outdir.mkdir(parents=True, exist_ok=True)
    image.save(outdir / "openvino.png")


def child_ours(ckpt: Path, size: int, steps: int, threads: int, outdir: Path, backend: str = "torch") -> None:
    """`python scripts/txt2img.py` as a user runs it (through run_cli), default precision, `--backend`."""
    sys.path.insert(0, str(ROOT))
    from ldm.cli import run_cli
    from scripts.txt2img import main

    argv = [
        "--prompt", PROMPT, "--ckpt", str(ckpt), "--H", str(size), "--W", str(size), "--ddim_steps", str(steps),
        "--scale", str(SCALE), "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no-safety-checker",
        "--threads", str(threads), "--outdir", str(outdir), "--backend", backend,
    ]  # fmt: skip
    run_cli(lambda: main(argv))


def run(*command: str) -> dict:
    """One child process: its wall time and its own peak RSS (MiB, from wait4's rusage)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{command} failed ({proc.returncode}):\n{log.read()[-4000:]}")
    return {"wall_s": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "load_1min": os.getloadavg()[0]}


def export(opt: argparse.Namespace) -> tuple[Path, Path]:
    """The diffusers folder (from our checkpoint, with our venv's diffusers) and the OpenVINO IR (with
    optimum-intel's exporter in its venv), each made once in --workdir."""
    ckpt = opt.workdir / "model.safetensors"
    diffusers_dir, ov_dir = opt.workdir / "diffusers", opt.workdir / "openvino-ir"
    from bench_vs_diffusers import diffusers_pipeline, load_diffusers, prepare

    prepare(opt.workdir)
    if not (diffusers_dir / "model_index.json").exists():
        diffusers_pipeline(load_diffusers(ckpt)).save_pretrained(diffusers_dir)
    if not (ov_dir / "model_index.json").exists():
        code = (
            "import sys; from optimum.exporters.openvino import main_export;"
            "main_export(sys.argv[1], output=sys.argv[2], task='text-to-image', weight_format='fp32')"
        )
        subprocess.run([opt.optimum_python, "-c", code, str(diffusers_dir), str(ov_dir)], check=True)
    return ckpt, ov_dir


def measure(opt: argparse.Namespace) -> dict:
    ckpt, ov_dir = export(opt)
    common = ["--size", str(opt.size), "--steps", str(opt.steps), "--threads", str(opt.threads)]
    out = opt.workdir / "e2e-out"
    ours = ["--child", "ours", str(ckpt), *common, "--outdir", str(out)]
    theirs = ["--child", "openvino", str(ov_dir), *common, "--outdir", str(out)]
    ours_ov = ["--child", "ours-openvino", str(ckpt), *common, "--outdir", str(out)]
    commands = {
        "ours": (sys.executable, __file__, *ours),
        "ours-openvino": (sys.executable, __file__, *ours_ov),
        "openvino": (opt.optimum_python, __file__, *theirs),
    }
    if opt.sd_cpp:  # stable-diffusion.cpp reads the .safetensors itself; euler: one UNet call a step, as DDIM
        commands["sd.cpp"] = (
            opt.sd_cpp, "-m", str(ckpt), "-p", PROMPT, "-W", str(opt.size), "-H", str(opt.size),
            "--steps", str(opt.steps), "--cfg-scale", str(SCALE), "--sampling-method", "euler",
            "-t", str(opt.threads), "-s", "42", "-o", str(out / "sd-cpp.png"),
        )  # fmt: skip
    impls = [impl for impl in commands if impl != "ours-openvino" or opt.ours_openvino]
    results: dict = {impl: [] for impl in impls} | {"openvino_first": None, "ours-openvino_first": None}
    cache = ov_dir / "model_cache"
    if not cache.exists() or not any(cache.iterdir()):
        results["openvino_first"] = run(*commands["openvino"])  # fills the compiled-model cache
        print("openvino, first (compiles)", results["openvino_first"], flush=True)
    if opt.ours_openvino:  # converts (or finds converted) our UNet and decoder in ~/.cache/stable-diffusion
        results["ours-openvino_first"] = run(*commands["ours-openvino"])
        print("ours-openvino, first (converts or reuses)", results["ours-openvino_first"], flush=True)
    for rep in range(opt.reps):
        for impl in impls if rep % 2 == 0 else impls[::-1]:
            results[impl].append(run(*commands[impl]))
            print(impl, results[impl][-1], flush=True)
    return results


def report(opt: argparse.Namespace, results: dict) -> str:
    from bench_vs_diffusers import cpu_flags

    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[impl])

    labels = {
        "ours": "ours (`scripts/txt2img.py`, default precision)",
        "ours-openvino": "ours with `--backend openvino` (default precision)",
        "openvino": "optimum-intel `OVStableDiffusionPipeline` (default precision, static shapes)",
        "sd.cpp": "stable-diffusion.cpp (`--sampling-method euler`, the file's f32 weights)",
    }
    rows = ["| | wall (each run) | peak RSS |", "|---|---:|---:|"]
    for impl, label in labels.items():
        if impl not in results:
            continue
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in results[impl])
        rows.append(
            f"| {label} | {med(impl, 'wall_s'):.1f} s ({walls}) | {med(impl, 'peak_rss_mib'):.0f} MiB |"
        )
    ratio_wall = med("ours", "wall_s") / med("openvino", "wall_s")
    ratio_rss = med("ours", "peak_rss_mib") / med("openvino", "peak_rss_mib")
    rows.append(f"| ratio ours / OpenVINO | {ratio_wall:.2f}x | {ratio_rss:.2f}x |")
    if "ours-openvino" in results:
        wall = med("ours-openvino", "wall_s") / med("openvino", "wall_s")
        rss = med("ours-openvino", "peak_rss_mib") / med("openvino", "peak_rss_mib")
        rows.append(f"| ratio ours `--backend openvino` / OpenVINO | {wall:.2f}x | {rss:.2f}x |")
    if "sd.cpp" in results:
        wall, rss = (
            med("ours", "wall_s") / med("sd.cpp", "wall_s"),
            med("ours", "peak_rss_mib") / med("sd.cpp", "peak_rss_mib"),
        )
        rows.append(f"| ratio ours / stable-diffusion.cpp | {wall:.2f}x | {rss:.2f}x |")
    notes = []
    for key, what in (("openvino_first", "OpenVINO's first run (compiling, filling its cache)"),
                      ("ours-openvino_first", "Our `--backend openvino`'s first run (converting, unless "
                       "~/.cache/stable-diffusion/openvino already had the models)")):  # fmt: skip
        if results.get(key):
            notes.append(f"{what}: {results[key]['wall_s']:.1f} s, {results[key]['peak_rss_mib']:.0f} MiB.")
    loads = [r["load_1min"] for impl in ("ours", "openvino") for r in results[impl]]
    extra = (" --ours-openvino" if "ours-openvino" in results else "") + (
        " --sd-cpp sd" if "sd.cpp" in results else ""
    )
    return (
        f"Command: `python benchmarks/bench_vs_optimum.py --optimum-python V/bin/python --size {opt.size} "
        f"--steps {opt.steps} --reps {opt.reps} --threads {opt.threads}{extra}`. CPU: {cpu_flags()}. "
        f"1-minute load average after each run: {min(loads):.1f}-{max(loads):.1f}.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + " ".join(notes)
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--optimum-python", help="python of a virtual environment with optimum-intel[openvino]"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2, help="processes per implementation, alternated")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ours-openvino", action="store_true", help="also ours with --backend openvino")
    parser.add_argument(
        "--sd-cpp", help="also stable-diffusion.cpp: the path of its `sd` (or `sd-cli`) binary"
    )
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--outdir", type=Path, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.child:
        impl, path = opt.child
        if impl == "openvino":
            child_openvino(Path(path), opt.size, opt.steps, opt.threads, opt.outdir)
        else:
            backend = "openvino" if impl == "ours-openvino" else "torch"
            child_ours(Path(path), opt.size, opt.steps, opt.threads, opt.outdir, backend)
        return
    if not opt.optimum_python:
        parser.error("--optimum-python is required: the python of a venv with optimum-intel[openvino]")
    from bench_vs_diffusers import publish

    publish(report(opt, measure(opt)), opt.write)


if __name__ == "__main__":
    main()

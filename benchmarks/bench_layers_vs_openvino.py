"""Where our UNet step and OpenVINO's differ: time by kind of op, and convolution by convolution.

    python benchmarks/bench_layers_vs_openvino.py [--size 256] [--reps 5] [--threads 2] [--precision bf16]
        [--top 20] [--workdir /tmp/sdbench] [--write FILE]      # needs the openvino extra

On the full-size random SD v1 weights of bench_vs_diffusers.py (`prepare`), in one process, calls alternated: our
UNet step (batch 2, the runtime's fast paths; bf16 as `--precision autocast` runs it, or fp32) and OpenVINO's,
compiled from our plain fp32 UNet (`openvino.convert_model`) at its default precision (bf16 on CPUs with bf16
units) or f32, with its per-node profile on (`PERF_COUNT`). Reported: the steps' medians; OpenVINO's node times
summed by node type and kernel; ours by torch operator (torch's profiler, self time); and every convolution of
both, ours timed by forward hooks, OpenVINO's by the Convolution nodes its converter names after our module
(`__module.<name>/...`), the `--top` layers where ours is slowest against it first. OpenVINO's node times include
what it fused into a node (bias, residual adds, activations); ours are the layer's call alone. Per-node medians
are noisy on a shared machine: compare layers within one run, and repeat a run before trusting a difference.
"""

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def conv_path(layer: torch.nn.Conv2d, x: torch.Tensor) -> str:
    """Which of the runtime's paths `layer` takes for x (`ldm.runtime.fast_paths`)."""
    from ldm.runtime.fast_paths import MatmulConv2d, WinogradConv2d, _product_dtype

    dtype = _product_dtype(layer, layer.weight, x)
    tiles = layer._winograd_tiles(x, dtype) if isinstance(layer, WinogradConv2d) and dtype else None
    if tiles is not None:
        return f"Winograd F({tiles.m}x{tiles.m})"
    if isinstance(layer, MatmulConv2d) and layer._as_matmul(x):
        return "matmul"
    return "oneDNN convolution"


def measure(workdir: Path, size: int, reps: int, precision: str) -> dict:
    """The steps' medians, OpenVINO's node times and types, our operator times and convolution layers."""
    import openvino as ov
    from bench_vs_diffusers import CONFIG, prepare
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.heap import keep_freed_memory
    from ldm.runtime import precision_scope
    from ldm.runtime.fast_paths import apply_cpu_fast_paths, low_precision_with_fast_paths

    def load():
        model = load_model_from_config(
            OmegaConf.load(CONFIG), str(workdir / "model.safetensors"), verbose=False
        )
        model.cond_stage_model = model.first_stage_model = None  # the UNet alone
        return model

    prepare(workdir)
    keep_freed_memory()  # as the scripts run: freed activations are reused, not faulted in afresh
    torch.manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8)
    t = torch.full((2,), 500, dtype=torch.long)
    c = torch.randn(2, 77, 768)
    with torch.inference_mode():
        plain = load()
        converted = ov.convert_model(plain.model.diffusion_model, example_input=(x, t, c))
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": True}
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        request = ov.Core().compile_model(converted, "CPU", config).create_infer_request()
        del converted, plain
        model = load()
        apply_cpu_fast_paths(model)
        if precision == "bf16":
            low_precision_with_fast_paths(model, torch.bfloat16)
        mode = "autocast" if precision == "bf16" else "full"

        def ours() -> None:
            with precision_scope(mode, torch.device("cpu")):
                model.apply_model(x, t, c)

        def theirs() -> None:
            request.infer((x.numpy(), t.numpy(), c.numpy()))

        convs = {
            name: layer
            for name, layer in model.model.diffusion_model.named_modules()
            if isinstance(layer, torch.nn.Conv2d)
        }
        conv_times: dict[str, list[float]] = collections.defaultdict(list)
        starts: dict[str, float] = {}
        input_sizes: dict[str, tuple[int, ...]] = {}
        paths: dict[str, str] = {}

        def before(name: str):
            def hook(layer, args):
                input_sizes[name] = tuple(args[0].shape[-2:])
                paths[name] = conv_path(layer, args[0])
                starts[name] = time.perf_counter()

            return hook

        def after(name: str):
            return lambda layer, args, output: conv_times[name].append(time.perf_counter() - starts[name])

        ours()  # warm-up: packing
        theirs()  # OpenVINO's first inference
        steps: dict[str, list[float]] = {"ours": [], "OpenVINO": []}
        node_times: dict[str, list[float]] = collections.defaultdict(list)
        node_kinds: dict[str, tuple[str, str]] = {}
        handles = [
            hook
            for name, layer in convs.items()
            for hook in (
                layer.register_forward_pre_hook(before(name)),
                layer.register_forward_hook(after(name)),
            )
        ]
        for rep in range(reps):
            for impl, fn in (("ours", ours), ("OpenVINO", theirs))[:: 1 if rep % 2 == 0 else -1]:
                start = time.perf_counter()
                fn()
                steps[impl].append(time.perf_counter() - start)
            for node in request.profiling_info:
                node_times[node.node_name].append(node.real_time.total_seconds())
                node_kinds[node.node_name] = (node.node_type, node.exec_type)
        for handle in handles:
            handle.remove()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(reps):
                ours()
    operators = collections.Counter()
    for event in profile.key_averages():
        operators[event.key] += event.self_cpu_time_total / 1e3 / reps  # ms a step
    return {
        "steps": {impl: median_ms(seconds) for impl, seconds in steps.items()},
        "nodes": {name: (*node_kinds[name], median_ms(seconds)) for name, seconds in node_times.items()},
        "operators": operators,
        "convs": {
            name: (
                paths[name],
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size[0],
                layer.stride[0],
                input_sizes[name],
                median_ms(conv_times[name]),
            )
            for name, layer in convs.items()
        },  # fmt: skip
    }


def report(results: dict, top: int) -> str:
    """Markdown: steps, OpenVINO by node kind, ours by operator, convolutions side by side."""
    steps = results["steps"]
    lines = [
        f"UNet step: ours {steps['ours']:.0f} ms, OpenVINO {steps['OpenVINO']:.0f} ms "
        f"({steps['ours'] / steps['OpenVINO']:.2f}x). OpenVINO's node medians sum to "
        f"{sum(ms for *_, ms in results['nodes'].values()):.0f} ms, ours by operator to "
        f"{sum(results['operators'].values()):.0f} ms (more than a step where the machine's speed moved).",
        "",
        "| OpenVINO node type / kernel | ms a step |",
        "|---|---:|",
    ]
    kinds = collections.Counter()
    for node_type, kernel, ms in results["nodes"].values():
        kinds[f"{node_type} / {kernel}"] += ms
    lines += [f"| {kind} | {ms:.1f} |" for kind, ms in kinds.most_common(15)]
    lines += ["", "| our operator (self time) | ms a step |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in results["operators"].most_common(15)]
    rows = []
    for name, (kind, c_in, c_out, k, stride, hw, mine) in results["convs"].items():
        prefix = f"__module.{name}/"
        theirs = [
            (ms, kernel)
            for node, (node_type, kernel, ms) in results["nodes"].items()
            if node.startswith(prefix) and node_type == "Convolution"
        ]
        rows.append((name, kind, c_in, c_out, k, stride, hw, mine, sum(ms for ms, _ in theirs), theirs))
    ours_total = sum(row[7] for row in rows)
    theirs_total = sum(row[8] for row in rows)
    matched = sum(1 for row in rows if row[9])
    lines += [
        "",
        f"Convolutions: ours {ours_total:.0f} ms, OpenVINO {theirs_total:.0f} ms "
        f"({matched} of {len(rows)} layers found in its profile); the {top} where ours is slowest against it:",
        "",
        "| layer | our path | C_in -> C_out, kernel, stride, map | ours ms | OpenVINO ms (kernel) |",
        "|---|---|---|---:|---:|",
    ]
    for name, kind, c_in, c_out, k, stride, hw, mine, total, theirs in sorted(
        rows,
        key=lambda row: (not row[9], row[8] - row[7]),  # layers OpenVINO's profile lacks last
    )[:top]:
        kernel = theirs[0][1] if theirs else "-"
        shape = f"{c_in} -> {c_out}, {k}x{k}, {stride}, {hw[0]}x{hw[1]}"
        lines.append(f"| {name} | {kind} | {shape} | {mine:.2f} | {total:.2f} ({kernel}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--size", type=int, default=256, help="image side; the UNet runs on size / 8")
    parser.add_argument("--reps", type=int, default=5, help="timed steps of each, alternated")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--top", type=int, default=20, help="convolutions listed")
    parser.add_argument("--write", type=Path, default=None, help="append the report to this markdown file")
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    from bench_vs_diffusers import cpu_flags, publish

    text = f"CPU: {cpu_flags()}. Size {opt.size}², {opt.precision}, medians of {opt.reps}.\n\n"
    publish(text + report(measure(opt.workdir, opt.size, opt.reps, opt.precision), opt.top), opt.write)


if __name__ == "__main__":
    main()

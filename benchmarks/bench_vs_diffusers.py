"""Speed and memory of this project against diffusers, on the same random-init SD v1 weights.

    python benchmarks/bench_vs_diffusers.py [--workdir /tmp/sdbench] [--reps 3] [--write BENCHMARKS.md]
    python benchmarks/bench_vs_diffusers.py --peers [--sizes 256 512]   # needs the openvino extra

Saves a full-size random-weights SD v1 checkpoint once (`.ckpt` and `.safetensors` in --workdir), converts it
to diffusers with diffusers' own helpers (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`; the CLIP
text model takes the same weights), then measures, alternating the two implementations in one process: the
UNet step (batch 2, classifier-free guidance) at 256² and 512² with its FLOP count, VAE decode, text encoding;
and, each in a fresh process, model load (time, peak RSS) and end-to-end txt2img (wall time, peak RSS;
`--e2e-reps` alternated processes each).
The machine's fp32/bf16 GEMM peak puts the UNet step in context. With `--cuda` it instead measures fp16
sampling speed (it/s) and peak VRAM at 512² (batch 1, 50 steps) and 768², each image in a fresh process, and
ours with --lowvram. With `--peers` it measures only the CPU table against OpenVINO (`pip install .[openvino]`):
our fp32 and bf16 UNet step and VAE decode against OpenVINO's f32 and default (bf16 on CPUs with bf16 units),
exported from our own modules.
"""

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
SCALE = 7.5


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish(text: str, write: Path | None) -> None:
    """Print a report, and append it to the markdown file `write` when one is given."""
    print(text)
    if write:
        with open(write, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def emit(result: dict) -> None:
    """A child's result: one JSON line the parent picks out of its stdout."""
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- weights


def prepare(workdir: Path) -> None:
    """Save random-init SD v1 weights (seed 0) as model.ckpt and model.safetensors, once.

    Zero-initialized layers (the UNet's output convs) get small random weights too, so images are not trivial."""
    if (workdir / "model.safetensors").exists() and (workdir / "model.ckpt").exists():
        return
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config, save_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = load_model_from_config(OmegaConf.load(CONFIG), None, verbose=False)
    state_dict = model.state_dict()
    with torch.no_grad():
        for tensor in state_dict.values():
            if tensor.is_floating_point() and tensor.ndim > 1 and not tensor.any():
                tensor.normal_(0.0, 0.02)
    save_checkpoint(workdir / "model.safetensors", state_dict)
    save_checkpoint(workdir / "model.ckpt", state_dict)


def tensor_bytes(path: Path) -> int:
    from ldm.checkpoint import read_state_dict

    state_dict, _ = read_state_dict(path)
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def load_ours(path: Path, device: str = "cpu"):
    """Our model as the scripts run it: on the CPU with the runtime's fast paths applied."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.runtime.fast_paths import apply_cpu_fast_paths

    model = load_model_from_config(OmegaConf.load(CONFIG), str(path), device=device, verbose=False)
    if device == "cpu":
        apply_cpu_fast_paths(model)
    return model


def load_diffusers(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """diffusers UNet2DConditionModel / AutoencoderKL and transformers CLIPTextModel holding the checkpoint's
    weights, converted with diffusers' single-file helpers; models built on the meta device and assigned the
    converted tensors (what diffusers does with accelerate installed)."""
    import safetensors.torch
    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG

    original_config = yaml.safe_load(CONFIG.read_text())
    checkpoint = safetensors.torch.load_file(str(path))
    unet_config = sf.create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    vae_config = sf.create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    unet_sd = sf.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    vae_sd = sf.convert_ldm_vae_checkpoint(checkpoint, vae_config)
    prefix = "cond_stage_model.transformer."
    text_sd = {k[len(prefix) :]: checkpoint[k] for k in checkpoint if k.startswith(prefix)}
    del checkpoint
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**VIT_L14_TEXT_CONFIG))
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    models = {}
    for name, model, sd in (
        ("unet", unet, unet_sd),
        ("vae", vae, vae_sd),
        ("text_encoder", text_encoder, text_sd),
    ):
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"diffusers {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for module in model.modules():
            ids = module._buffers.get("position_ids")
            if ids is not None and ids.is_meta:
                module.position_ids = torch.arange(ids.shape[-1]).expand(ids.shape)
        models[name] = model.to(device=device, dtype=None if dtype == torch.float32 else dtype).eval()
    return models


def diffusers_pipeline(models: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.modules.encoders.modules import builtin_clip_tokenizer

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = builtin_clip_tokenizer()
    tokenizer.model_max_length = 77
    return StableDiffusionPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        unet=models["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------- children


def child_load(impl: str, path: Path) -> None:
    start = time.perf_counter()
    if impl == "ours":
        load_ours(path)
    else:
        load_diffusers(path)
    emit({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()})


def child_e2e(impl: str, path: Path, size: int, steps: int, outdir: Path) -> None:
    """Everything a user waits for: imports, load, text, sampling, decode, PNG, and the process's exit. Ours runs
    as `python scripts/txt2img.py` does (through run_cli)."""
    if impl == "ours":
        from ldm.cli import run_cli
        from scripts.txt2img import main

        argv = [
            "--prompt", PROMPT, "--ckpt", str(path), "--H", str(size), "--W", str(size), "--ddim_steps",
            str(steps), "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no-safety-checker",
            "--outdir", str(outdir),
        ]  # fmt: skip
        run_cli(lambda: main(argv))
    else:
        pipe = diffusers_pipeline(load_diffusers(path))
        generator = torch.Generator().manual_seed(42)
        image = pipe(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=SCALE,
            generator=generator, eta=0.0,
        ).images[0]  # fmt: skip
        outdir.mkdir(parents=True, exist_ok=True)
        image.save(outdir / "diffusers.png")
    emit({"peak_rss_mib": peak_rss_mib()})


def child_unet(impl: str, path: Path, size: int, reps: int) -> None:
    """UNet steps (batch 2) in a fresh process set up as each implementation's txt2img sets it up: ours with
    `keep_freed_memory`, as its scripts do on the CPU. Median of `reps` steps after one warm-up."""
    from ldm.heap import keep_freed_memory

    torch.manual_seed(0)
    x, t, c = (
        torch.randn(2, 4, size // 8, size // 8),
        torch.full((2,), 500, dtype=torch.long),
        torch.randn(2, 77, 768),
    )
    with torch.inference_mode():
        if impl == "ours":
            model = load_ours(path)
            keep_freed_memory()
            step = lambda: model.apply_model(x, t, c)  # noqa: E731
        else:
            unet = load_diffusers(path)["unet"]
            step = lambda: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        emit({"step_s": alternate({impl: step}, reps)[impl]})


def run_child(args: list[str]) -> dict:
    """Run this script as a child; its result plus the wall time of the whole process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": seconds, **json.loads(lines[-1][len("RESULT ") :])}


def child_args(opt: argparse.Namespace, *args: str) -> list[str]:
    return [*(["--threads", str(opt.threads)] if opt.threads else []), "--child", *args]


def alternated_children(opt: argparse.Namespace, label: str, args_of) -> dict[str, list[dict]]:
    """`--e2e-reps` child processes per implementation, alternated (order flipped each round); `args_of(impl)`
    gives a child's arguments. Each implementation's results in order."""
    runs = {"ours": [], "diffusers": []}
    for rep in range(opt.e2e_reps):
        for impl in ("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours"):
            runs[impl].append(run_child(child_args(opt, *args_of(impl))))
            print(label, impl, runs[impl][-1], flush=True)
    return runs


# ---------------------------------------------------------------------------------------------- timing


def timed(fn, reps: int, sync=lambda: None) -> float:
    """Seconds of one call of `fn` (one untimed warm-up first)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


# seconds of rest before each timed call of `alternate`: in one check, ours ran ~7% slower right after an OpenVINO
# call (0.54 -> 0.58 s a 256² bf16 step, OpenVINO's unchanged), as if its worker threads were still busy
PAUSE_S = 0.3


def alternate(fns: dict, reps: int, warmup: bool = True) -> dict:
    """Median seconds per call of each function, calls interleaved (order flipped each round) so that
    machine drift hits both alike, each after PAUSE_S of rest; one warm-up call each first unless `warmup` is
    False."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of n x n @ n x n matmuls in `dtype` on the CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = timed(lambda: a @ b, reps)
    return 2 * n**3 / seconds / 1e9


def unet_flops(fn) -> int:
    """FLOPs of one call of fn, attention included: FlopCounterMode knows the CUDA attention kernels but not the
    CPU one, which alone would leave out the 64x64-token self-attention (~15% of a 512² step's FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def micro(path: Path, reps: int) -> dict:
    """In-process, interleaved: UNet step, VAE decode and text encoding of both implementations."""
    ours = load_ours(path)
    theirs = load_diffusers(path)
    tokenizer = diffusers_pipeline(theirs).tokenizer
    results = {}
    torch.manual_seed(0)
    with torch.inference_mode():
        c = ours.get_learned_conditioning(["", PROMPT])
        for size in (256, 512):
            x = torch.randn(2, 4, size // 8, size // 8)
            t = torch.full((2,), 500, dtype=torch.long)
            fns = {
                "ours": lambda x=x, t=t: ours.apply_model(x, t, c),
                "diffusers": lambda x=x, t=t: theirs["unet"](x, t, encoder_hidden_states=c).sample,
            }
            # 512² reuses the 256² warm-up: one step there takes a minute on a 2-core machine
            results[f"unet_step_{size}"] = alternate(fns, reps if size == 256 else 1, warmup=size == 256)
            results[f"unet_flops_{size}"] = unet_flops(fns["ours"])
            diff = (fns["ours"]() - fns["diffusers"]()).abs().max().item()
            results[f"unet_maxdiff_{size}"] = diff
        results.update(bf16_step(ours, theirs["unet"], c))
        z = torch.randn(1, 4, 32, 32)
        results["vae_decode_256"] = alternate(
            {
                "ours": lambda: ours.decode_first_stage(z),
                "diffusers": lambda: theirs["vae"].decode(z / ours.scale_factor).sample,
            },
            reps,
        )

        def encode_diffusers():
            ids = tokenizer(
                ["", PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            return theirs["text_encoder"](ids.input_ids).last_hidden_state

        results["text_encode"] = alternate(
            {"ours": lambda: ours.get_learned_conditioning(["", PROMPT]), "diffusers": encode_diffusers}, 5
        )
    return results


def bf16_step(ours, unet, c: torch.Tensor) -> dict:
    """UNet step 256² in bf16 as each implementation runs it (ours: `--precision autocast`, i.e. bf16 weights
    and `precision_scope`; diffusers: its UNet in bf16 under bf16 autocast), one cold run each (torch's own
    bf16 kernels take minutes on a CPU without bf16 units), and our bf16 eps against fp32."""
    from ldm.runtime import precision_scope
    from ldm.runtime.fast_paths import low_precision_with_fast_paths

    x, t = torch.randn(2, 4, 32, 32), torch.full((2,), 500, dtype=torch.long)
    plain = ours.apply_model(x, t, c)
    ours_bf16 = copy.deepcopy(ours)
    low_precision_with_fast_paths(ours_bf16, torch.bfloat16)
    unet_bf16 = copy.deepcopy(unet).to(torch.bfloat16)

    def step_ours():
        with precision_scope("autocast", torch.device("cpu")):
            return ours_bf16.apply_model(x, t, c)

    def step_diffusers():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet_bf16(x.bfloat16(), t, encoder_hidden_states=c.bfloat16()).sample

    result = {
        "unet_step_256_bf16": alternate({"ours": step_ours, "diffusers": step_diffusers}, 1, warmup=False)
    }
    result["unet_bf16_maxdiff_256"] = (step_ours().float() - plain).abs().max().item()
    result["unet_fp32_maxabs_256"] = plain.abs().max().item()
    return result


# ---------------------------------------------------------------------------------------------- OpenVINO


def cpu_flags() -> str:
    """The CPU's model and which of the flags that decide its fast paths it has (`cpu_identity`)."""
    from ldm.runtime.bf16 import cpu_identity

    flags = cpu_identity()[2]
    named = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return f"{machine()}; {named}"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def openvino_peer(model, example: tuple, z: torch.Tensor, hints: tuple[str, ...]) -> dict[str, dict]:
    """OpenVINO models compiled from our fp32 UNet and VAE decoder (`openvino.convert_model`, traced on the example
    inputs), each at the inference precisions `hints`: f32, OpenVINO's default (bf16 where the CPU has bf16 units); as
    many threads as torch. No compiled-model cache: OpenVINO 2026.4 gives the f32 and the default compile of one
    model the same cache entry, and on an AMX CPU the default one then crashes (segfault) on the f32 blob.
    Returns {"unet" | "vae": {"f32" | "default": fn}}."""
    import openvino as ov

    class Decode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv

        def forward(self, z):
            return self.decoder(self.post_quant_conv(z))

    core = ov.Core()
    peers: dict[str, dict] = {}
    for name, module, inputs in (
        ("unet", model.model.diffusion_model, example),
        ("vae", Decode(model.first_stage_model), (z,)),
    ):
        converted = ov.convert_model(module, example_input=inputs)
        peers[name] = {}
        for hint in hints:
            config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
            if hint == "f32":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = core.compile_model(converted, "CPU", config)
            print(
                f"OpenVINO {ov.__version__} {name} {hint}: runs in",
                compiled.get_property("INFERENCE_PRECISION_HINT"),
            )

            def run(*args, compiled=compiled):
                return torch.from_numpy(compiled(tuple(a.numpy() for a in args))[0])

            peers[name][hint] = run
        del converted
    return peers


def peers(path: Path, reps: int, sizes: tuple[int, ...]) -> dict:
    """In one process, interleaved: UNet step (batch 2) at `sizes` and VAE decode 256² of ours fp32, ours bf16
    (`--precision autocast`), OpenVINO f32 and OpenVINO default; max |eps - ours fp32| of each. On a CPU without
    bf16 units, where `--precision auto` and OpenVINO's default both run fp32, only ours fp32 and OpenVINO f32.
    The text encoder and VAE encoder are dropped (random conditioning) to fit the machine's memory."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.heap import keep_freed_memory
    from ldm.runtime import precision_scope
    from ldm.runtime.bf16 import cpu_has_native_bf16
    from ldm.runtime.fast_paths import apply_cpu_fast_paths, low_precision_with_fast_paths

    def load():
        loaded = load_model_from_config(OmegaConf.load(CONFIG), str(path), verbose=False)
        loaded.cond_stage_model = loaded.first_stage_model.encoder = None
        return loaded

    model = load()
    keep_freed_memory()
    torch.manual_seed(0)
    c = torch.randn(2, 77, 768)
    z = torch.randn(1, 4, 32, 32)
    t = torch.full((2,), 500, dtype=torch.long)
    example = (torch.randn(2, 4, sizes[0] // 8, sizes[0] // 8), t, c)
    results: dict = {"cpu": cpu_flags(), "load_1min": [os.getloadavg()[0]]}
    with torch.inference_mode():
        start = time.perf_counter()
        bf16_units = cpu_has_native_bf16()
        hints = ("f32", "default") if bf16_units else ("f32",)
        ov = openvino_peer(model, example, z, hints)  # plain layers, before our fast paths
        results["openvino_convert_compile_s"] = time.perf_counter() - start
        apply_cpu_fast_paths(model)
        unets = {"ours fp32": model.apply_model, "OpenVINO f32": ov["unet"]["f32"]}
        decoders = {
            "ours fp32": model.decode_first_stage,
            "OpenVINO f32": lambda z: ov["vae"]["f32"](z / model.scale_factor),
        }
        if bf16_units:
            # as the scripts prepare a bf16 run: from the memory-mapped checkpoint (a copy of the fp32 model would
            # hold the fp32 weights that the packed layers keep in anonymous memory, 3 GB more, and crowd the
            # page cache that both models' plain weights are read from)
            bf16 = load()
            apply_cpu_fast_paths(bf16)
            low_precision_with_fast_paths(bf16, torch.bfloat16)
            cpu = torch.device("cpu")

            def autocast(fn):
                def run(*args):
                    with precision_scope("autocast", cpu):
                        return fn(*args).float()

                return run

            unets.update({"ours bf16": autocast(bf16.apply_model), "OpenVINO default": ov["unet"]["default"]})
            decoders["ours bf16"] = autocast(bf16.decode_first_stage)
            decoders["OpenVINO default"] = lambda z: ov["vae"]["default"](z / model.scale_factor)
        for size in sizes:
            x = torch.randn(2, 4, size // 8, size // 8)
            fns = {name: lambda fn=fn, x=x: fn(x, t, c) for name, fn in unets.items()}
            results[f"unet_step_{size}"] = alternate(fns, reps)
            plain = fns["ours fp32"]()
            results[f"unet_maxdiff_{size}"] = {
                name: (fn() - plain).abs().max().item() for name, fn in fns.items()
            }
            results["load_1min"].append(os.getloadavg()[0])
            print(json.dumps(results), flush=True)
        fns = {name: lambda fn=fn: fn(z) for name, fn in decoders.items()}
        results["vae_decode_256"] = alternate(fns, reps)
        plain = fns["ours fp32"]()
        results["vae_maxdiff_256"] = {name: (fn() - plain).abs().max().item() for name, fn in fns.items()}
        results["load_1min"].append(os.getloadavg()[0])
    return results


def peers_table(results: dict, sizes: tuple[int, ...]) -> str:
    names = list(results["vae_decode_256"])
    rows = [
        "| variant | " + " | ".join(f"UNet step {s}², batch 2" for s in sizes) + " | VAE decode 256² |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    for name in names:
        cells = []
        for key, diff in [
            *((f"unet_step_{s}", f"unet_maxdiff_{s}") for s in sizes),
            ("vae_decode_256", "vae_maxdiff_256"),
        ]:
            seconds, base = results[key][name], results[key]["ours fp32"]
            peer = results[key]["OpenVINO default" if "bf16" in name else "OpenVINO f32"]
            cells.append(
                f"{seconds:.2f} s ({seconds / base:.2f}x ours fp32, {seconds / peer:.2f}x OV "
                f"{'default' if 'bf16' in name else 'f32'}; max diff {results[diff][name]:.1e})"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    load = ", ".join(f"{v:.1f}" for v in results["load_1min"])
    return (
        f"CPU: {results['cpu']}. 1-minute load average during the run: {load}. OpenVINO convert + compile "
        f"({2 * (len(names) // 2)} models): "
        f"{results['openvino_convert_compile_s']:.0f} s.\n\n" + "\n".join(rows)
    )


# ---------------------------------------------------------------------------------------------- CUDA


def child_sampling(impl: str, path: Path, size: int, steps: int, lowvram: bool, device: str) -> None:
    """Sampling speed and peak memory in a fresh process, as each implementation runs on a GPU (fp16; fp32 when
    `device` is the CPU, for a smoke test): two images, the first warming up cuDNN and the allocator; it/s between
    the first and the last sampling step of the second, and the peak memory of the whole process."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.runtime import precision_scope
    from ldm.runtime.memory import enable_lowvram, half_precision

    on_gpu = device != "cpu"
    marks: list[float] = []

    def mark() -> None:
        if on_gpu:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    if impl == "ours":
        model = load_ours(path, device="cpu" if lowvram else device)
        if on_gpu:
            half_precision(model)
        if lowvram:
            enable_lowvram(model, device)
        sampler = DDIMSampler(model)
        scope = lambda: precision_scope("autocast" if on_gpu else "full", torch.device(device))  # noqa: E731

        def image():
            c, uc = model.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([""])
            z, _ = sampler.sample(
                S=steps, batch_size=1, shape=(4, size // 8, size // 8), conditioning=c,
                unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False,
                callback=lambda i: mark(),
            )  # fmt: skip
            return model.decode_first_stage(z)
    else:
        dtype = torch.float16 if on_gpu else torch.float32
        pipe = diffusers_pipeline(load_diffusers(path, device=device, dtype=dtype))
        scope = contextlib.nullcontext

        def on_step_end(pipe, step, timestep, callback_kwargs):
            mark()
            return callback_kwargs

        def image():
            return pipe(
                PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=SCALE,
                callback_on_step_end=on_step_end,
            ).images  # fmt: skip

    with torch.inference_mode(), scope():
        image()
        marks.clear()
        image()
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mib()
    emit({"it_per_s": (len(marks) - 1) / (marks[-1] - marks[0]), "peak_mib": peak})


def sampling_bench(opt: argparse.Namespace, path: Path, device: str = "cuda") -> dict:
    """fp16 it/s and peak VRAM of both implementations at 512² and 768² (batch 1, `--steps` steps), each image in
    a fresh process (`--e2e-reps` alternated processes each: median it/s, highest peak), and ours with --lowvram
    at 512² (one process)."""

    def summary(done: list[dict]) -> dict:
        return {
            "it_per_s": statistics.median(r["it_per_s"] for r in done),
            "peak_mib": max(r["peak_mib"] for r in done),
        }

    def args(impl: str, size: int, lowvram: bool) -> tuple:
        return ("sampling", impl, str(path), str(size), str(opt.steps), str(int(lowvram)), device)

    results = {}
    for size in (512, 768):
        runs = alternated_children(opt, f"sampling {size}", lambda impl, size=size: args(impl, size, False))
        results.update({f"{impl}_{size}": summary(done) for impl, done in runs.items()})
    results["ours_lowvram_512"] = summary([run_child(child_args(opt, *args("ours", 512, True)))])
    return results


def sampling_table(results: dict) -> str:
    rows = ["| fp16, batch 1 | this project | diffusers | ratio |", "|---|---:|---:|---:|"]
    for size in (512, 768):
        ours, theirs = results[f"ours_{size}"], results[f"diffusers_{size}"]
        rows.append(ratio_row(f"{size}²: speed", ours["it_per_s"], theirs["it_per_s"], "it/s"))
        rows.append(ratio_row(f"{size}²: peak memory", ours["peak_mib"], theirs["peak_mib"], "MiB"))
    low = results["ours_lowvram_512"]
    rows.append(
        f"| 512², `--lowvram`: it/s, peak memory | {low['it_per_s']:.2f}, {low['peak_mib']:.0f} MiB | | |"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    from ldm.runtime.bf16 import cpu_identity

    return (
        f"{cpu_identity()[0]}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )


def ratio_row(
    name: str, ours: float, theirs: float, unit: str, extra_ours: str = "", extra_theirs: str = ""
) -> str:
    """A table row: both values with their unit, and ours / theirs."""
    fmt = ".0f" if unit == "MiB" else ".3g"
    return (
        f"| {name} | {ours:{fmt}} {unit}{extra_ours} | {theirs:{fmt}} {unit}{extra_theirs} "
        f"| {ours / theirs:.2f} |"
    )


def table(results: dict, peaks: dict) -> str:
    rows = ["| measurement | this project | diffusers | ratio |", "|---|---:|---:|---:|"]

    def row(*args) -> None:
        rows.append(ratio_row(*args))

    def of_peak(seconds: float, flops: int, peak: str = "fp32") -> str:
        rate = flops / seconds / 1e9
        return f" ({rate:.0f} GFLOP/s, {rate / peaks[peak]:.0%} of the {peak} peak)"

    for size in (256, 512):
        step, flops = results[f"unet_step_{size}"], results[f"unet_flops_{size}"]
        row(
            f"UNet step {size}² (batch 2, {flops / 1e12:.2f} TFLOP)", step["ours"], step["diffusers"], "s",
            of_peak(step["ours"], flops), of_peak(step["diffusers"], flops),
        )  # fmt: skip
    if "unet_step_256_bf16" in results:
        # measured against the faster way this CPU multiplies bf16 values: its bf16 units, or fp32 without them
        step, flops = results["unet_step_256_bf16"], results["unet_flops_256"]
        peak = "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"
        row(
            "UNet step 256², bf16 (one cold run each)", step["ours"], step["diffusers"], "s",
            of_peak(step["ours"], flops, peak), of_peak(step["diffusers"], flops, peak),
        )  # fmt: skip
    if "unet_proc_512" in results:
        r, flops = results["unet_proc_512"], results["unet_flops_512"]
        row(
            "UNet step 512², a process each, set up as its txt2img", r["ours"], r["diffusers"], "s",
            of_peak(r["ours"], flops), of_peak(r["diffusers"], flops),
        )  # fmt: skip
    for key, name in (("vae_decode_256", "VAE decode 256²"), ("text_encode", "text encoding (2 prompts)")):
        row(name, results[key]["ours"], results[key]["diffusers"], "s")
    for key, name in (("load_safetensors", "model load (.safetensors)"),):
        r = results[key]
        row(f"{name}: time", r["ours"]["seconds"], r["diffusers"]["seconds"], "s")
        row(f"{name}: peak RSS", r["ours"]["peak_rss_mib"], r["diffusers"]["peak_rss_mib"], "MiB")
    for key in ("e2e_256_10", "e2e_512_2"):
        _, size, steps = key.split("_")
        r = results[key]
        row(f"txt2img {size}², DDIM {steps} steps: wall", r["ours"]["wall_s"], r["diffusers"]["wall_s"], "s")
        row(f"txt2img {size}², DDIM {steps} steps: peak RSS", r["ours"]["peak_rss_mib"],
            r["diffusers"]["peak_rss_mib"], "MiB")  # fmt: skip
    return "\n".join(rows)


def bf16_note(results: dict) -> str:
    if "unet_bf16_maxdiff_256" not in results:
        return ""
    return (
        f" Our bf16 eps against fp32 at 256²: max |diff| {results['unet_bf16_maxdiff_256']:.3f} "
        f"(fp32 eps up to {results['unet_fp32_maxabs_256']:.2f})."
    )


def load_table(results: dict) -> str:
    """Peak RSS of loading through ldm.checkpoint.load_model_from_config against the checkpoint's tensor bytes."""
    tensors = results["tensor_mib"]
    rows = [
        "| checkpoint | load time | peak RSS | peak RSS / tensor bytes |",
        "|---|---:|---:|---:|",
    ]
    for name, r in (
        (".safetensors", results["load_safetensors"]["ours"]),
        (".ckpt", results["load_ckpt_ours"]),
    ):
        rows.append(
            f"| {name} ({tensors:.0f} MiB of tensors) | {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB "
            f"| {r['peak_rss_mib'] / tensors:.2f}x |"
        )
    return "\n".join(rows) + "\n"


def measure(opt: argparse.Namespace, path: Path) -> tuple[dict, dict]:
    """GEMM peaks and every measurement: load and txt2img in child processes, then the in-process ones."""
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16, n=2048, reps=2)}
    print(f"GEMM peak: {peaks}", flush=True)
    results = {}
    results["load_safetensors"] = {}
    for impl in ("ours", "diffusers"):
        results["load_safetensors"][impl] = run_child(child_args(opt, "load", impl, str(path)))
        print(impl, results["load_safetensors"][impl], flush=True)
    results["load_ckpt_ours"] = run_child(child_args(opt, "load", "ours", str(opt.workdir / "model.ckpt")))
    results["tensor_mib"] = tensor_bytes(path) / 2**20
    runs = alternated_children(opt, "unet_proc_512", lambda impl: ("unet", impl, str(path), "512", "2"))
    results["unet_proc_512"] = {
        impl: statistics.median(r["step_s"] for r in done) for impl, done in runs.items()
    }
    # Our scripts remember the checkpoint's sha256 (PNG metadata) by size and mtime: runs after a checkpoint's
    # first skip hashing it, and those are the runs measured (the cache lives in --workdir, filled here).
    os.environ["LDM_HASH_CACHE"] = str(opt.workdir / "model-hashes.json")
    from ldm.checkpoint import cached_model_hash

    cached_model_hash(path)
    for size, steps in ((256, 10), (512, 2)):
        key = f"e2e_{size}_{steps}"

        def e2e_args(impl: str, size: int = size, steps: int = steps) -> tuple:
            out = opt.workdir / f"out-{impl}-{size}"
            return ("e2e", impl, str(path), str(size), str(steps), str(out))

        runs = alternated_children(opt, key, e2e_args)
        results[key] = {
            impl: {
                "wall_s": statistics.median(r["wall_s"] for r in done),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
            }
            for impl, done in runs.items()
        }
    results.update(micro(path, opt.reps))
    print(json.dumps(results), flush=True)
    return peaks, results


def cpu_report(opt: argparse.Namespace, path: Path) -> str:
    """Measure (or with --report reread results.json) and format the CPU tables."""
    if opt.report:
        saved = json.loads((opt.workdir / "results.json").read_text())
        peaks, command, results = saved.pop("peaks"), saved.pop("command"), saved
    else:
        command = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]])
        peaks, results = measure(opt, path)
        saved = {"peaks": peaks, "command": command, **results}
        (opt.workdir / "results.json").write_text(json.dumps(saved, indent=2))
    return (
        f"Machine: {machine()}. GEMM peak: fp32 {peaks['fp32']:.0f} GFLOP/s (4096² matmul), "
        f"bf16 {peaks['bf16']:.2f} GFLOP/s (2048²).\n"
        f"Command: `{command}` (medians of {opt.reps} interleaved runs in one process, one run each for the "
        f"512² UNet step; load once in a fresh process; txt2img: median wall time and highest peak RSS of "
        f"{opt.e2e_reps} alternated fresh processes each).\n\n" + table(results, peaks) + "\n\n"
        f"UNet max |ours - diffusers| on the same input: 256²: {results['unet_maxdiff_256']:.2e}, "
        f"512²: {results['unet_maxdiff_512']:.2e}.{bf16_note(results)}\n\n" + load_table(results)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions of each in-process measurement"
    )
    parser.add_argument(
        "--e2e-reps", type=int, default=2, help="txt2img processes per implementation and size (alternated)"
    )
    parser.add_argument("--write", type=Path, default=None, help="append the results to this markdown file")
    parser.add_argument("--cuda", action="store_true", help="measure fp16 it/s and peak VRAM on the GPU")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per image with --cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both implementations (default: torch's)"
    )
    parser.add_argument(
        "--report", action="store_true", help="only rebuild the report from --workdir/results.json"
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="only the CPU peer table: ours fp32/bf16 against OpenVINO f32/default",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="UNet step sizes with --peers")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if opt.child:
        kind, impl, path, *rest = opt.child
        if kind == "load":
            child_load(impl, Path(path))
        elif kind == "sampling":
            child_sampling(impl, Path(path), int(rest[0]), int(rest[1]), rest[2] == "1", rest[3])
        elif kind == "unet":
            child_unet(impl, Path(path), int(rest[0]), int(rest[1]))
        else:
            child_e2e(impl, Path(path), int(rest[0]), int(rest[1]), Path(rest[2]))
        return

    prepare(opt.workdir)
    path = opt.workdir / "model.safetensors"
    if opt.peers:
        results = peers(path, opt.reps, tuple(opt.sizes))
        (opt.workdir / "peers.json").write_text(json.dumps(results, indent=2))
        command = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]])
        text = f"Command: `{command}` (medians of {opt.reps} interleaved runs).\n" + peers_table(
            results, tuple(opt.sizes)
        )
    elif opt.cuda:
        results = sampling_bench(opt, path)
        print(json.dumps(results, indent=2))
        text = f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + sampling_table(results)
    else:
        text = cpu_report(opt, path)
    publish(text, opt.write)


if __name__ == "__main__":
    main()

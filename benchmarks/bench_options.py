"""Before/after numbers of this project's speed and memory options on the full-size SD v1 model (CPU, fp32
unless said): channels_last, bf16 weights, chunked attention, tiled VAE decode, and the bf16 image difference.

    python benchmarks/bench_options.py [--workdir /tmp/sdbench] [--reps 2] [--threads N]

Uses the random-weights checkpoint that bench_vs_diffusers.py saves. Timings interleave the variants.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_diffusers import PROMPT, alternate, load_ours, machine, prepare  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.runtime import precision_scope  # noqa: E402
from ldm.runtime.fast_paths import low_precision_with_fast_paths  # noqa: E402
from ldm.runtime.memory import set_attention_chunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    prepare(opt.workdir)
    cpu = torch.device("cpu")
    fp32 = load_ours(opt.workdir / "model.safetensors")
    bf16 = copy.deepcopy(fp32)
    low_precision_with_fast_paths(bf16, torch.bfloat16)
    results = {"machine": machine()}
    torch.manual_seed(0)
    with torch.inference_mode():
        c = fp32.get_learned_conditioning(["", PROMPT])
        x = torch.randn(2, 4, 16, 16)
        t = torch.full((2,), 500, dtype=torch.long)
        unet = fp32.model.diffusion_model

        def channels_last():
            unet.to(memory_format=torch.channels_last)
            out = fp32.apply_model(x.contiguous(memory_format=torch.channels_last), t, c)
            unet.to(memory_format=torch.contiguous_format)
            return out

        def bf16_step():
            with precision_scope("autocast", cpu):
                return bf16.apply_model(x, t, c)

        def chunked():
            set_attention_chunk(fp32, 64)
            out = fp32.apply_model(x, t, c)
            set_attention_chunk(fp32, None)
            return out

        plain = fp32.apply_model(x, t, c)
        fns = {
            "fp32": lambda: fp32.apply_model(x, t, c),
            "fp32 channels_last": channels_last,
            "fp32 attention chunk 64": chunked,
        }
        results["unet_step_128_s"] = alternate(fns, opt.reps)
        fns["bf16 weights + autocast"] = bf16_step
        start = time.perf_counter()
        bf16_step()
        results["unet_step_128_s"]["bf16 weights + autocast (one run)"] = time.perf_counter() - start
        results["unet_step_128_maxdiff_vs_fp32"] = {
            name: (fn().float() - plain).abs().max().item() for name, fn in fns.items()
        }
        print(json.dumps(results, indent=1), flush=True)

        z = torch.randn(1, 4, 16, 16)
        image32 = fp32.decode_first_stage(z)

        def bf16_decode():
            with precision_scope("autocast", cpu):
                return bf16.decode_first_stage(z)

        vae = fp32.first_stage_model
        results["vae_decode_128_s"] = alternate(
            {
                "fp32": lambda: fp32.decode_first_stage(z),
                "bf16 decoder": bf16_decode,
            },
            opt.reps,
        )
        results["vae_decode_128_bf16_maxdiff"] = (bf16_decode().float() - image32).abs().max().item()

        z48 = torch.randn(1, 4, 48, 48)
        start = time.perf_counter()
        untiled = fp32.decode_first_stage(z48)
        results["vae_decode_384_untiled_s"] = time.perf_counter() - start
        vae.enable_tiling(32)
        start = time.perf_counter()
        tiled = fp32.decode_first_stage(z48)
        results["vae_decode_384_tiled_s"] = time.perf_counter() - start
        vae.enable_tiling(None)
        diff = (tiled - untiled).abs()
        results["vae_decode_384_tiled_vs_untiled"] = {
            "max": diff.max().item(),
            "mean": diff.mean().item(),
            "image_std": untiled.std().item(),
        }
        print(json.dumps(results, indent=1), flush=True)

        def txt2img(model, precision):
            with precision_scope(precision, cpu):
                cond = model.get_learned_conditioning([PROMPT])
                uncond = model.get_learned_conditioning([""])
                x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(42))
                samples, _ = DDIMSampler(model).sample(
                    S=3, batch_size=1, shape=(4, 16, 16), conditioning=cond, unconditional_guidance_scale=7.5,
                    unconditional_conditioning=uncond, x_T=x_T, verbose=False,
                )  # fmt: skip
                image = model.decode_first_stage(samples).float().clamp(-1, 1)
            return ((image + 1) * 127.5).round()

        start = time.perf_counter()
        pixels32 = txt2img(fp32, "full")
        results["txt2img_128_3_fp32_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pixels16 = txt2img(bf16, "autocast")
        results["txt2img_128_3_bf16_s"] = time.perf_counter() - start
        pixel_diff = (pixels16 - pixels32).abs()
        results["txt2img_128_3_bf16_vs_fp32_pixels"] = {
            "max": pixel_diff.max().item(),
            "mean": pixel_diff.mean().item(),
        }
    print(json.dumps(results, indent=1))
    (opt.workdir / "options.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Text to image: `python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms`."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import (  # noqa: E402
    Batch,
    add_common_args,
    apply_bundled_model,
    check_args,
    choose_sampler,
    generate,
    open_session,
    read_prompts,
)
from ldm.inference import (  # noqa: E402
    check_image_size,
    check_latent_flags,
    initial_noise,
    load_config,
    run_cli,
    size_multiple,
)
from ldm.outputs import to_pil  # noqa: E402

LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, outdir="outputs/txt2img-samples", n_iter=2, n_samples=3, scale=7.5)
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    parser.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    return apply_bundled_model(parser.parse_args(argv), parser)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        opt.config, opt.ckpt, opt.outdir = LAION_CONFIG, LAION_CKPT, "outputs/txt2img-samples-laion400m"
    sampler_name = choose_sampler(opt)
    check_args(opt, sampler_name)
    config = load_config(opt.config)
    check_latent_flags(opt.C, opt.f, config)
    check_image_size(opt.H, opt.W, size_multiple(config))
    batches = read_prompts(opt)
    session = open_session(opt, config, sampler_name, "scripts/txt2img.py")
    latent_shape = (opt.C, opt.H // opt.f, opt.W // opt.f)

    def render(batch: Batch) -> list:
        samples, _ = session.sampler.sample(
            S=opt.ddim_steps, conditioning=batch.c, batch_size=len(batch.prompts), shape=latent_shape,
            verbose=False, unconditional_guidance_scale=opt.scale, unconditional_conditioning=batch.uc,
            eta=opt.ddim_eta, x_T=initial_noise(batch.seeds, latent_shape, session.device),
            generator=batch.generator, callback=batch.callback,
        )  # fmt: skip
        return to_pil(session.model.decode_first_stage(samples))

    with session.scope():
        generate(
            session, batches, render, steps=opt.ddim_steps, params={"width": opt.W, "height": opt.H},
            remake_args=["--H", str(opt.H), "--W", str(opt.W)], batch_dependent=opt.ddim_eta > 0,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

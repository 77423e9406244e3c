"""Text to image: `python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms`."""

from collections.abc import Sequence

from ldm.cli import (
    check_memory,
    check_prompt_options,
    check_sampler_options,
    parse_args,
    read_prompts,
    recorded_parameters,
    remake_command,
    run_cli,
)
from ldm.loading import check_image_size, check_latent_flags, load_config, size_multiple

LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"


def main(argv: Sequence[str] | None = None) -> None:
    opt = parse_args("txt2img", __doc__, argv)
    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        opt.config, opt.ckpt, opt.outdir = LAION_CONFIG, LAION_CKPT, "outputs/txt2img-samples-laion400m"
    config = load_config(opt.config, trust=opt.trust_config, ckpt=opt.ckpt)
    check_latent_flags(opt.C, opt.f, config)
    check_image_size(opt.H, opt.W, size_multiple(config))
    batches = read_prompts(opt)
    check_sampler_options(opt)
    check_prompt_options(opt, batches)
    check_memory(opt, opt.H, opt.W)

    from ldm.pipeline import Record, generate, open_session, txt2img_render

    session = open_session(opt, config)
    record = Record(
        recorded_parameters("txt2img", opt), lambda *image: remake_command("txt2img", opt, *image)
    )
    with session.scope():
        generate(
            session, batches, txt2img_render(session), steps=opt.ddim_steps, record=record,
            batch_dependent=opt.ddim_eta > 0,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

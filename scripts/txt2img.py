"""Text to image: `python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms`.

Hires fix (A1111's): `--hr-scale 2` renders at --W x --H, upscales (--hr-upscaler: the latents, or the decoded
pixels) and refines the result with an img2img pass of --hr-steps steps at --hr-strength.
"""

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
    warm_heap_for,
)
from ldm.hires import decide_vae_tiling, hires_options, hires_record, resolve_hires_sampler
from ldm.loading import check_image_size, check_latent_flags, load_config, size_multiple

LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"


def main(argv: Sequence[str] | None = None) -> None:
    opt = parse_args("txt2img", __doc__, argv)
    warm_heap_for(opt)
    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        opt.config, opt.ckpt, opt.outdir = LAION_CONFIG, LAION_CKPT, "outputs/txt2img-samples-laion400m"
    config = load_config(opt.config, trust=opt.trust_config, ckpt=opt.ckpt)
    check_latent_flags(opt.C, opt.f, config)
    check_image_size(opt.H, opt.W, size_multiple(config))
    batches = read_prompts(opt)
    check_sampler_options(opt)
    check_prompt_options(opt, batches)
    hires = hires_options(opt, size_multiple(config))
    if hires is not None:
        hires = resolve_hires_sampler(hires, opt)
    height, width = (opt.H, opt.W) if hires is None else (hires.height, hires.width)
    decide_vae_tiling(opt, height, width)
    check_memory(opt, height, width)

    from ldm.pipeline import Record, generate, hires_render, open_session, txt2img_render

    session = open_session(opt, config)
    parameters = recorded_parameters("txt2img", opt)
    if hires is not None:
        parameters.update(hires_record(hires))
    record = Record(parameters, lambda *image: remake_command("txt2img", opt, *image))
    with session.scope():
        render = txt2img_render(session) if hires is None else hires_render(session, hires)
        generate(
            session, batches, render, steps=opt.ddim_steps, record=record, batch_dependent=opt.ddim_eta > 0,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

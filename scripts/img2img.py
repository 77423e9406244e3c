"""Image to image (SDEdit): `python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation"
--init-img sketch.jpg --strength 0.8`.

The image is encoded, noised to step t_enc = int(strength * ddim_steps) of the schedule and denoised with the
prompt over those last t_enc steps: strength 0 returns the image through the autoencoder, 1 ignores it (the
same as txt2img with the same seed). Any size works: the image is resized to the nearest multiples of the
model's size multiple (64 for SD v1) and each result back to the input's size. Transparent pixels are
composited on white; 16-bit, palette and grayscale images are converted to 8-bit RGB.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import (  # noqa: E402
    Batch,
    add_common_args,
    add_max_pixels_arg,
    apply_bundled_model,
    check_args,
    choose_sampler,
    generate,
    open_session,
    read_prompts,
)
from ldm.image_input import fit_size, image_to_tensor, load_image, resize_image  # noqa: E402
from ldm.inference import (  # noqa: E402
    UserError,
    check_latent_flags,
    draw_noise,
    encode_image,
    load_config,
    noised_latents,
    run_cli,
    seed_generators,
    size_multiple,
    strength_steps,
)
from ldm.outputs import to_pil  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0)
    parser.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information in init image",
    )
    add_max_pixels_arg(parser)
    return apply_bundled_model(parser.parse_args(argv), parser)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    sampler_name = choose_sampler(opt)
    check_args(opt, sampler_name)
    if not opt.init_img:
        raise UserError("no input image: pass --init-img with the path of the image to transform")
    if not 0.0 <= opt.strength <= 1.0:
        raise UserError(f"--strength must be between 0.0 and 1.0, got {opt.strength}")
    config = load_config(opt.config)
    check_latent_flags(opt.C, opt.f, config)
    image = load_image(opt.init_img, opt.max_pixels)
    size = fit_size(*image.size, size_multiple(config))
    batches = read_prompts(opt)
    session = open_session(opt, config, sampler_name, "scripts/img2img.py")
    model, sampler = session.model, session.sampler
    print(f"loaded input image of size {image.width}x{image.height} from {opt.init_img}")
    if size != image.size:
        print(f"resized to {size[0]}x{size[1]} for the model; the results are resized back")
    sampler.make_schedule(ddim_num_steps=opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)
    t_enc = strength_steps(opt.strength, opt.ddim_steps)
    print(f"target t_enc is {t_enc} steps")
    latent_shape = (opt.C, size[1] // opt.f, size[0] // opt.f)

    init_img = str(Path(opt.init_img).resolve())
    with session.scope():
        posterior = model.encode_first_stage(image_to_tensor(resize_image(image, size)).to(session.device))

        def render(batch: Batch) -> list:
            generators = seed_generators(batch.seeds)
            noise = draw_noise(generators, latent_shape, session.device)  # first draw: txt2img's x_T
            z0 = encode_image(model, posterior, generators)
            samples = sampler.decode(
                noised_latents(sampler, z0, noise, t_enc), batch.c, t_enc,
                unconditional_guidance_scale=opt.scale, unconditional_conditioning=batch.uc,
                callback=batch.callback, generator=batch.generator, verbose=False,
            )  # fmt: skip
            return [resize_image(result, image.size) for result in to_pil(model.decode_first_stage(samples))]

        generate(
            session, batches, render, steps=t_enc,
            params={"init_img": init_img, "strength": opt.strength, "width": image.width, "height": image.height},
            remake_args=["--init-img", init_img, "--strength", str(opt.strength), "--max-pixels", str(opt.max_pixels)],
            batch_dependent=opt.ddim_eta > 0,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

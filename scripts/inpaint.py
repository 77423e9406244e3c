"""Inpainting: `python scripts/inpaint.py --prompt "a vase of flowers" --init-img room.png --mask mask.png`.

The mask is an image of the same size: white (gray level >= 128) is repainted, black is kept; a transparent
mask pixel counts as black. Two kinds of model work:
- an ordinary SD v1 model (4 UNet input channels): masked sampling, the kept region of the latent replaced at
  every step by the image's latent noised to that step (ddim or plms; dpm cannot blend);
- an SD inpainting model (`--config configs/stable-diffusion/v1-inpainting-inference.yaml`, hybrid conditioning,
  9 input channels): the UNet also sees the mask and the latent of the masked image (any sampler).
Any size works (resized to the model's size multiple and back). At the very end, after the watermark, the kept
pixels are pasted back from the input, so they are exactly the input's.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

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
from ldm.image_input import (  # noqa: E402
    fit_size,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    resize_image,
    resize_mask,
)
from ldm.inference import (  # noqa: E402
    UserError,
    check_latent_flags,
    draw_noise,
    encode_image,
    inpainting_concat,
    is_inpainting_model,
    latent_keep_mask,
    load_config,
    masked_image,
    run_cli,
    seed_generators,
    size_multiple,
)
from ldm.outputs import to_pil  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, outdir="outputs/inpainting-samples", n_iter=1, n_samples=2, scale=7.5)
    parser.add_argument("--init-img", type=str, help="path to the image to inpaint")
    parser.add_argument("--mask", type=str, help="path to the mask: white = repaint, black = keep")
    add_max_pixels_arg(parser)
    return apply_bundled_model(parser.parse_args(argv), parser)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    sampler_name = choose_sampler(opt)
    check_args(opt, sampler_name)
    if not opt.init_img or not opt.mask:
        raise UserError("inpainting needs an image and a mask: pass --init-img IMAGE --mask MASK")
    config = load_config(opt.config)
    check_latent_flags(opt.C, opt.f, config)
    image = load_image(opt.init_img, opt.max_pixels)
    mask = load_mask(opt.mask, image.size, opt.max_pixels)
    size = fit_size(*image.size, size_multiple(config))
    batches = read_prompts(opt)
    session = open_session(opt, config, sampler_name, "scripts/inpaint.py", image_conditioning=True)
    model, sampler = session.model, session.sampler
    concat = is_inpainting_model(model)
    if not concat and sampler_name == "dpm":
        raise UserError(
            "the dpm sampler cannot do masked sampling, which this (non-inpainting) model needs: "
            "use --sampler ddim or plms, or an inpainting model"
        )
    if size != image.size:
        print(
            f"resizing {image.width}x{image.height} to {size[0]}x{size[1]} for the model and the results back"
        )
    latent_shape = (opt.C, size[1] // opt.f, size[0] // opt.f)

    def paste_back(result: Image.Image) -> Image.Image:
        """The result where the mask is white, the input image's own pixels elsewhere."""
        return Image.composite(result, image, mask)

    init_img, mask_path = str(Path(opt.init_img).resolve()), str(Path(opt.mask).resolve())
    with session.scope():
        x = image_to_tensor(resize_image(image, size)).to(session.device)
        repaint = mask_to_tensor(resize_mask(mask, size)).to(session.device)
        if concat:
            posterior = model.encode_first_stage(masked_image(x, repaint))
        else:
            posterior = model.encode_first_stage(x)
            keep = latent_keep_mask(repaint, latent_shape[1:])

        def render(batch: Batch) -> list:
            generators = seed_generators(batch.seeds)
            x_T = draw_noise(generators, latent_shape, session.device)  # first draw: txt2img's x_T
            kwargs = dict(
                S=opt.ddim_steps, batch_size=len(batch.prompts), shape=latent_shape, x_T=x_T, eta=opt.ddim_eta,
                unconditional_guidance_scale=opt.scale, generator=batch.generator, callback=batch.callback,
                verbose=False,
            )  # fmt: skip
            if concat:
                c_concat = [inpainting_concat(model, posterior, repaint, generators)]
                uc = None if batch.uc is None else {"c_concat": c_concat, "c_crossattn": [batch.uc]}
                cond = {"c_concat": c_concat, "c_crossattn": [batch.c]}
                samples, _ = sampler.sample(conditioning=cond, unconditional_conditioning=uc, **kwargs)
            else:
                z0 = encode_image(model, posterior, generators)
                samples, _ = sampler.sample(
                    conditioning=batch.c, unconditional_conditioning=batch.uc, mask=keep, x0=z0, **kwargs
                )
                samples = keep * z0 + (1.0 - keep) * samples  # the decoder sees the image's own kept latents
            return [resize_image(result, image.size) for result in to_pil(model.decode_first_stage(samples))]

        generate(
            session, batches, render, steps=opt.ddim_steps, finish=paste_back,
            params={"init_img": init_img, "mask": mask_path, "width": image.width, "height": image.height,
                    "inpainting": "model" if concat else "masked sampling"},
            remake_args=["--init-img", init_img, "--mask", mask_path, "--max-pixels", str(opt.max_pixels)],
            batch_dependent=opt.ddim_eta > 0 or not concat,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

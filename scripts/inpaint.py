"""Inpainting: `python scripts/inpaint.py --prompt "a vase of flowers" --init-img room.png --mask mask.png`.

The mask is an image of the same size: white (gray level >= 128) is repainted, black is kept; a transparent
mask pixel counts as black. Two kinds of model work:
- an ordinary SD v1 model (4 UNet input channels): masked sampling, the kept region of the latent replaced at
  every step by the image's latent noised to that step (samplers that support a mask: ddim, plms);
- an SD inpainting model (`--config configs/stable-diffusion/v1-inpainting-inference.yaml`, hybrid conditioning,
  9 input channels): the UNet also sees the mask and the latent of the masked image (any sampler).
Any size works (resized to the model's size multiple and back). At the very end, after the watermark, the kept
pixels are pasted back from the input, so they are exactly the input's.

Outpainting: `--outpaint left=128,top=64` extends the canvas by those borders (multiples of 8), starts them
from the edge colors plus noise and paints them; the sampler may blend a few pixels into the image across the
seam (a soft mask), but every pixel of the image is pasted back. A --mask (of the input's size) is optional.
"""

from collections.abc import Sequence
from pathlib import Path

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
from ldm.errors import UserError
from ldm.hires import decide_vae_tiling, parse_outpaint
from ldm.loading import check_latent_flags, load_config, size_multiple


def main(argv: Sequence[str] | None = None) -> None:
    opt = parse_args("inpaint", __doc__, argv)
    warm_heap_for(opt)
    if not opt.init_img or not (opt.mask or opt.outpaint):
        raise UserError(
            "inpainting needs an image and a mask: pass --init-img IMAGE --mask MASK (or --outpaint SIDES)"
        )
    config = load_config(opt.config, trust=opt.trust_config, ckpt=opt.ckpt)
    check_latent_flags(opt.C, opt.f, config)
    batches = read_prompts(opt)
    check_sampler_options(opt)
    check_prompt_options(opt, batches)

    from PIL import Image

    from ldm.image_input import (
        fit_size,
        image_to_tensor,
        load_image,
        load_mask,
        mask_to_tensor,
        resize_image,
        resize_mask,
    )
    from ldm.latents import is_inpainting_model
    from ldm.outpaint import latent_soft_keep, outpaint_canvas
    from ldm.pipeline import Record, generate, inpaint_render, open_session

    image = load_image(opt.init_img, opt.max_pixels)
    mask = load_mask(opt.mask, image.size, opt.max_pixels) if opt.mask else Image.new("L", image.size, 0)
    keep = None
    if opt.outpaint:
        image, mask, keep = outpaint_canvas(image, mask, parse_outpaint(opt.outpaint), opt.seed)
        print(f"outpainting: the canvas is {image.width}x{image.height}")
    size = fit_size(*image.size, size_multiple(config))
    decide_vae_tiling(opt, size[1], size[0])
    check_memory(opt, size[1], size[0])
    opt.init_img = str(Path(opt.init_img).resolve())
    opt.mask = str(Path(opt.mask).resolve()) if opt.mask else None
    session = open_session(opt, config, image_conditioning=True)
    if size != image.size:
        print(
            f"resizing {image.width}x{image.height} to {size[0]}x{size[1]} for the model and the results back"
        )

    def paste_back(result: Image.Image) -> Image.Image:
        """The result where the mask is white, the input image's own pixels elsewhere."""
        return Image.composite(result, image, mask)

    with session.scope():
        x = image_to_tensor(resize_image(image, size))
        if keep is not None:
            keep = latent_soft_keep(keep, (size[1] // opt.f, size[0] // opt.f))
        render = inpaint_render(session, x, mask_to_tensor(resize_mask(mask, size)), image.size, keep)
        concat = is_inpainting_model(session.model)
        parameters = {**recorded_parameters("inpaint", opt), "width": image.width, "height": image.height,
                      "inpainting": "model" if concat else "masked sampling"}  # fmt: skip
        record = Record(parameters, lambda *image: remake_command("inpaint", opt, *image))
        generate(
            session, batches, render, steps=opt.ddim_steps, record=record, finish=paste_back,
            batch_dependent=opt.ddim_eta > 0 or not concat,
        )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

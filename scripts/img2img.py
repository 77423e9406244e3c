"""Image to image (SDEdit): `python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation"
--init-img sketch.jpg --strength 0.8`.

The image is encoded, noised to step t_enc = int(strength * ddim_steps) of the schedule and denoised with the
prompt over those last t_enc steps: strength 0 returns the image through the autoencoder, 1 ignores it (the
same as txt2img with the same seed). Any size works: the image is resized to the nearest multiples of the
model's size multiple (64 for SD v1) and each result back to the input's size. Transparent pixels are
composited on white; 16-bit, palette and grayscale images are converted to 8-bit RGB.

Upscaling: `--scale-by 2` (or the result's `--W`/`--H`) resizes the input (Lanczos) to that size, a multiple
of the size multiple, and refines it there; the results keep that size.
"""

import sys
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
from ldm.hires import decide_vae_tiling, scaled_size
from ldm.loading import check_latent_flags, load_config, size_multiple


def size_given(argv: Sequence[str] | None) -> set[str]:
    """Which of --W/--H the command line gives (a bundled model's defaults would fill them in otherwise)."""
    words = sys.argv[1:] if argv is None else argv
    return {word.split("=")[0][2:] for word in words if word.split("=")[0] in ("--W", "--H")}


def main(argv: Sequence[str] | None = None) -> None:
    opt = parse_args("img2img", __doc__, argv)
    warm_heap_for(opt)
    given = size_given(argv)
    opt.W, opt.H = (opt.W if "W" in given else None), (opt.H if "H" in given else None)
    if not opt.init_img:
        raise UserError("no input image: pass --init-img with the path of the image to transform")
    config = load_config(opt.config, trust=opt.trust_config, ckpt=opt.ckpt)
    check_latent_flags(opt.C, opt.f, config)
    batches = read_prompts(opt)
    check_sampler_options(opt)
    check_prompt_options(opt, batches)

    from ldm.image_input import fit_size, image_to_tensor, load_image, resize_image
    from ldm.pipeline import Record, generate, img2img_render, img2img_steps, open_session

    image = load_image(opt.init_img, opt.max_pixels)
    target = scaled_size(opt, *image.size, size_multiple(config))
    size = target or fit_size(*image.size, size_multiple(config))
    result_size = target or image.size
    decide_vae_tiling(opt, size[1], size[0])
    check_memory(opt, size[1], size[0])
    opt.init_img = str(Path(opt.init_img).resolve())
    session = open_session(opt, config)
    print(f"loaded input image of size {image.width}x{image.height} from {opt.init_img}")
    if target is not None:
        print(f"upscaled to {size[0]}x{size[1]}, then refined")
    elif size != image.size:
        print(f"resized to {size[0]}x{size[1]} for the model; the results are resized back")
    t_enc = img2img_steps(session, opt.strength)
    print(f"target t_enc is {t_enc} steps")
    parameters = {**recorded_parameters("img2img", opt), "width": result_size[0], "height": result_size[1]}
    record = Record(parameters, lambda *image: remake_command("img2img", opt, *image))
    with session.scope():
        render = img2img_render(session, image_to_tensor(resize_image(image, size)), result_size, t_enc)
        generate(session, batches, render, steps=t_enc, record=record, batch_dependent=opt.ddim_eta > 0)


if __name__ == "__main__":
    run_cli(main)

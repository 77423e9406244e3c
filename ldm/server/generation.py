"""A1111 requests as generation runs: checked against the server's limits before any work (`plan`), then run
on the model's thread (`run`) batch by batch through `ldm.pipeline.render_batch`, as the scripts run them.

Image k of a request gets seed + k; a request's options are a copy of the model's defaults with the request's
values set, so a request reproduces the CLI's image for the same flags.
"""

import copy
import dataclasses
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.cli import FLAGS, recorded_parameters, remake_command
from ldm.models.diffusion import registry
from ldm.server.engine import Engine
from ldm.server.images import ImageError, decode_image, encode_png, infotext
from ldm.server.jobs import Interrupted, Job, Skipped
from ldm.server.models import Img2ImgRequest, Txt2ImgRequest

MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request value the server refuses: HTTP 422 naming `field`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's --max-* flags)."""

    max_size: int = 2048  # pixels per side, of the output and of input images
    max_batch: int = 8  # images per batch (memory)
    max_images: int = 64  # images per request, batch_size * n_iter (time)
    max_steps: int = 150


@dataclass
class Plan:
    """A checked request: which script it runs as, its sampler, and its decoded images."""

    script: str  # "txt2img", "img2img" or "inpaint" (img2img with a mask)
    request: Txt2ImgRequest
    sampler: str
    image: Image.Image | None = None
    mask: Image.Image | None = None


def display_name(name: str) -> str:
    """A sampler's A1111 display name: its first alias, else its registry name."""
    return next((alias for alias, target in registry.ALIASES.items() if target == name), name)


def schedulers() -> tuple[str, ...]:
    """The registry's schedulers (read at request time: they appear as they are added)."""
    return tuple(getattr(registry, "SCHEDULERS", ()))


def _first_problem(checks: list[tuple[bool, str, str]]) -> None:
    """Raise RequestError for the first (ok, field, message) that is not ok."""
    for ok, field, message in checks:
        if not ok:
            raise RequestError(field, message)


def _size_checks(request: Txt2ImgRequest, multiple: int, max_size: int) -> list[tuple[bool, str, str]]:
    checks = []
    for field in ("width", "height"):
        side = getattr(request, field)
        if side is not None:
            lower = max(multiple, side // multiple * multiple)
            checks += [
                (0 < side <= max_size, field, f"must be between {multiple} and --max-size {max_size}"),
                (
                    side % multiple == 0,
                    field,
                    f"must be a multiple of {multiple}: use {lower} or {lower + multiple}",
                ),
            ]
    return checks


def _decoded(data: str, field: str, max_side: int) -> Image.Image:
    try:
        return decode_image(data, field, max_side)
    except ImageError as error:
        raise RequestError(field.split("[")[0], str(error)) from None


def plan(request: Txt2ImgRequest, engine: Engine, limits: Limits) -> Plan:
    """Check every value against the limits and the model, decode the images; RequestError on the first
    problem. Nothing here touches the model."""
    r = request
    _first_problem([
        (1 <= r.steps <= limits.max_steps, "steps", f"must be between 1 and --max-steps {limits.max_steps}"),
        (1 <= r.batch_size <= limits.max_batch, "batch_size", f"must be between 1 and --max-batch {limits.max_batch}"),
        (r.n_iter >= 1, "n_iter", "must be at least 1"),
        (r.batch_size * r.n_iter <= limits.max_images, "n_iter",
         f"batch_size * n_iter must be at most --max-images {limits.max_images}"),
        (r.seed == -1 or 0 <= r.seed <= MAX_SEED - r.batch_size * r.n_iter, "seed", "must be -1 or >= 0"),
        *_size_checks(r, engine.size_multiple, limits.max_size),
        (r.cfg_scale is None or math.isfinite(r.cfg_scale), "cfg_scale", "must be a finite number"),
        (r.eta is None or (math.isfinite(r.eta) and r.eta >= 0), "eta", "must be a finite number >= 0"),
        (r.scheduler in (None, "", "Automatic", *schedulers()), "scheduler",
         f"unknown scheduler: choose one of {', '.join(('Automatic', *schedulers()))}"),
    ])  # fmt: skip
    try:
        sampler = registry.canonical_name(r.sampler_name or r.sampler_index or "ddim")
    except ValueError as error:
        raise RequestError("sampler_name" if r.sampler_name else "sampler_index", str(error)) from None
    if not isinstance(r, Img2ImgRequest):
        return Plan("txt2img", r, sampler)

    from ldm.image_input import binary_mask, rgb_image

    _first_problem([
        (0.0 <= r.denoising_strength <= 1.0, "denoising_strength", "must be between 0 and 1"),
        (len(r.init_images) > 0, "init_images", "needs an image (base64)"),
    ])  # fmt: skip
    image = rgb_image(_decoded(r.init_images[0], "init_images[0]", limits.max_size))
    if not r.mask:
        return Plan("img2img", r, sampler, image)
    mask = binary_mask(_decoded(r.mask, "mask", limits.max_size))
    _first_problem([
        (mask.size == image.size, "mask",
         f"is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: make them the same size"),
        (registry.sampler_class(sampler).supports_mask, "sampler_name",
         f"{sampler} cannot do masked sampling, which inpainting needs: use ddim or plms"),
    ])  # fmt: skip
    return Plan("inpaint", r, sampler, image, mask)


def outdir(script: str) -> str:
    return next(flag for flag in FLAGS if flag.dest == "outdir").default_for(script)


def request_options(plan: Plan, defaults: Any) -> Any:
    """The scripts' options for this request: a copy of the model's defaults with the request's values."""
    r, opt = plan.request, copy.copy(defaults)
    opt.prompt, opt.negative_prompt = r.prompt, r.negative_prompt
    opt.ddim_steps, opt.sampler = r.steps, plan.sampler
    opt.n_samples, opt.n_iter, opt.fixed_code = r.batch_size, r.n_iter, False
    opt.seed = secrets.randbelow(2**32) if r.seed == -1 else r.seed
    opt.scale = defaults.scale if r.cfg_scale is None else r.cfg_scale
    uses_eta = registry.sampler_class(plan.sampler).uses_eta
    opt.ddim_eta = r.eta if r.eta is not None and uses_eta else 0.0  # A1111 ignores eta where unused
    opt.outdir = outdir(plan.script)
    if plan.image is not None:
        opt.W, opt.H = r.width or plan.image.width, r.height or plan.image.height
        opt.strength, opt.init_img, opt.mask, opt.max_pixels = r.denoising_strength, None, None, None
    else:
        opt.W, opt.H = r.width or defaults.W, r.height or defaults.H
    if r.scheduler not in (None, "", "Automatic"):
        opt.scheduler = r.scheduler
    return opt


def image_metadata(script: str, opt: Any, model_hash: str, prompt: str, seed: int, extra: dict) -> dict:
    """An image's PNG metadata, as the CLI writes it: the flags that change the image, the sampler, the model's
    hash, prompt, seed and the command that re-makes it."""
    return {
        **recorded_parameters(script, opt),
        **extra,
        "sampler": opt.sampler,
        "model_hash": model_hash,
        "prompt": prompt,
        "seed": seed,
        "remake": remake_command(script, opt, prompt, seed, 1),
    }


@dataclass
class Result:
    images: list[Image.Image]
    metadata: list[dict]
    seeds: list[int]
    opt: Any
    interrupted: bool


def renderer(plan: Plan, view: Any, size_multiple: int) -> tuple[Any, int, Any, dict]:
    """(render, the steps it reports, what runs on each finished image or None, the metadata it adds) for the
    request's script, as scripts/txt2img.py, img2img.py and inpaint.py set them up. Call inside `view.scope()`."""
    from ldm.image_input import fit_size, image_to_tensor, mask_to_tensor, resize_image, resize_mask
    from ldm.pipeline import img2img_render, img2img_steps, inpaint_render, txt2img_render

    opt = view.opt
    if plan.script == "txt2img":
        return txt2img_render(view), opt.ddim_steps, None, {}
    size = (opt.W, opt.H)
    source = resize_image(plan.image, size)
    model_size = fit_size(*size, size_multiple)
    x = image_to_tensor(resize_image(source, model_size))
    extra = {"width": opt.W, "height": opt.H}
    if plan.script == "img2img":
        t_enc = img2img_steps(view, opt.strength)
        return img2img_render(view, x, size, t_enc), t_enc, None, extra
    mask = resize_mask(plan.mask, size)
    render = inpaint_render(view, x, mask_to_tensor(resize_mask(mask, model_size)), size)

    def paste_back(result: Image.Image) -> Image.Image:
        """The result where the mask is white, the input's own pixels elsewhere."""
        return Image.composite(result, source, mask)

    return render, opt.ddim_steps, paste_back, {**extra, "inpainting": "masked sampling"}


def run(plan: Plan, engine: Engine, job: Job, save_outputs: bool) -> Result:
    """Render the request's batches on the model's thread (`job` counts the steps and stops on interrupt or
    skip); with `save_outputs`, write every image as the CLI does."""
    from ldm.models.diffusion.registry import make_sampler
    from ldm.outputs import NumberedFolder
    from ldm.pipeline import render_batch

    session = engine.session
    opt = request_options(plan, session.opt)
    sampler = make_sampler(opt.sampler, session.model)
    view = dataclasses.replace(session, opt=opt, sampler=sampler, uc_cache={})
    folder = Path(opt.outdir)
    if save_outputs and plan.image is not None:  # the re-make command then names the input files
        opt.init_img = str(NumberedFolder(folder / "inputs").save(plan.image).resolve())
        if plan.mask is not None:
            opt.mask = str(NumberedFolder(folder / "inputs").save(plan.mask).resolve())
    result = Result([], [], [], opt, interrupted=False)
    with view.scope():
        render, steps, finish, extra = renderer(plan, view, engine.size_multiple)
        for index in range(opt.n_iter):
            job.batch = index
            job.start_batch(steps)
            first = opt.seed + index * opt.n_samples
            seeds = list(range(first, first + opt.n_samples))
            try:
                images = render_batch(view, render, opt.n_samples * [opt.prompt], seeds, job.on_step, steps)
            except Skipped:
                continue
            except Interrupted:  # stopped before the sampler had an estimate to show (or in img2img)
                result.interrupted = True
                break
            for image, seed in zip(images, seeds, strict=True):
                image = finish(image) if finish is not None else image
                result.images.append(image)
                result.seeds.append(seed)
                result.metadata.append(
                    image_metadata(plan.script, opt, session.model_hash, opt.prompt, seed, extra)
                )
                job.latest_image = image
            if job.interrupted:  # the batch just added was stopped part-way: nothing after it runs
                result.interrupted = True
                break
        job.batch = opt.n_iter
    if save_outputs:
        save(result, folder, view)
    return result


def save(result: Result, folder: Path, session: Any) -> None:
    """The images into `folder/samples` as the CLI names and tags them, and a grid when there are several."""
    from ldm.outputs import NumberedFolder, make_image_grid

    samples = NumberedFolder(folder / "samples")
    for image, metadata in zip(result.images, result.metadata, strict=True):
        samples.save(image, metadata)
    if len(result.images) > 1:
        grid = session.watermark(make_image_grid(result.images, result.opt.n_samples))
        shared = {k: v for k, v in result.metadata[0].items() if k not in ("prompt", "seed", "remake")}
        grid_folder = NumberedFolder(folder, prefix="grid-", digits=4)
        grid_folder.save(grid, {**shared, "prompts": [result.opt.prompt], "seed": result.opt.seed})


def response(plan: Plan, result: Result, engine: Engine, job: Job) -> dict:
    """A1111's response body: base64 PNGs with their metadata, the request echoed, `info` as a JSON string."""
    r, opt = plan.request, result.opt
    n = len(result.images)
    info = {
        "prompt": opt.prompt, "all_prompts": n * [opt.prompt],
        "negative_prompt": opt.negative_prompt, "all_negative_prompts": n * [opt.negative_prompt],
        "seed": result.seeds[0] if result.seeds else opt.seed, "all_seeds": result.seeds,
        "subseed": -1, "all_subseeds": n * [-1], "subseed_strength": 0,
        "width": opt.W, "height": opt.H, "sampler_name": display_name(opt.sampler), "cfg_scale": opt.scale,
        "steps": opt.ddim_steps, "batch_size": opt.n_samples, "restore_faces": False,
        "sd_model_name": engine.checkpoint.model_name, "sd_model_hash": engine.session.model_hash,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": getattr(opt, "strength", None), "extra_generation_params": {"eta": opt.ddim_eta},
        "index_of_first_image": 0, "infotexts": [infotext(m) for m in result.metadata], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
    }  # fmt: skip
    parameters = r.model_dump()
    if isinstance(r, Img2ImgRequest):
        parameters["init_images"], parameters["mask"] = None, None  # as A1111: not echoed back
    pairs = zip(result.images, result.metadata, strict=True)
    images = [encode_png(image, metadata) for image, metadata in pairs] if r.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}

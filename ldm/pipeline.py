"""Generation, shared by the scripts, the server and Python users: a `Session` (model, sampler, safety checker,
watermark) opened from the options, the loop that renders batches of prompts and writes numbered PNGs with
their metadata, and the three ways to render a batch (txt2img, img2img, inpaint).

`opt` is any object with the scripts' option names as attributes (an argparse.Namespace from ldm.cli, or a
SimpleNamespace): prompt, negative_prompt, outdir, skip_grid, skip_save, ddim_steps, sampler, fixed_code,
ddim_eta, n_iter, n_samples, n_rows, scale, config, ckpt, seed, precision, device, safety_checker,
no_safety_checker, C, f and the runtime options (vae_tiling, attention_chunk, lowvram, threads, compile,
backend).
"""

import contextlib
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm, trange

from ldm.errors import UserError
from ldm.latents import (
    encode_image,
    inpainting_concat,
    is_inpainting_model,
    latent_keep_mask,
    masked_image,
    noised_latents,
    strength_steps,
)
from ldm.loading import check_checkpoint, check_config, check_model_kind, hashed_file, load_model
from ldm.models.diffusion.registry import make_sampler
from ldm.outputs import NumberedFolder, Watermarker, make_image_grid, to_pil
from ldm.runtime import (
    RuntimeOptions,
    load_device,
    precision_scope,
    prepare,
    resolve_precision,
    select_device,
)


@dataclass
class Session:
    """A loaded model with everything a run around it needs."""

    opt: Any
    device: torch.device
    precision: str
    model: Any
    sampler: Any
    model_hash: str
    safety_checker: Callable[[list[Image.Image]], list[Image.Image]] | None
    watermark: Watermarker
    prompt_encoder: Any = None  # ldm.prompts.PromptEncoder for --prompt-syntax a1111, None for plain
    loras: Any = None  # ldm.adapters.lora.LoraSet: the LoRAs merged into the weights now
    uc_cache: dict = field(default_factory=dict)  # (batch size, negative prompt) -> uc (plain syntax)
    lora_hash_cache: dict = field(default_factory=dict)  # path -> A1111's LoRA hash
    truncation_warned: set = field(default_factory=set)  # plain-syntax texts already warned about

    def scope(self) -> contextlib.ExitStack:
        """No gradients, the run's precision, and the EMA weights if the model has them."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(precision_scope(self.precision, self.device))
        stack.enter_context(self.model.ema_scope())
        return stack

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, H/f, W/f] of the options' --H/--W."""
        return (self.opt.C, self.opt.H // self.opt.f, self.opt.W // self.opt.f)


def runtime_options(opt: Any) -> RuntimeOptions:
    return RuntimeOptions(
        vae_tiling=opt.vae_tiling,
        attention_chunk=opt.attention_chunk,
        lowvram=opt.lowvram,
        threads=opt.threads,
        compile=opt.compile,
        backend=getattr(opt, "backend", "torch"),
    )


def open_session(opt: Any, config: Any, image_conditioning: bool = False) -> Session:
    """Check the model kind, checkpoint and device, then load the model, sampler and safety checker; sets
    `opt.precision` to the precision chosen for the device.

    Models whose UNet also takes an image (conditioning_key concat or hybrid, e.g. inpainting models) need a
    script that gives it one: `image_conditioning` says this one does."""
    check_config(config, opt.config)
    check_model_kind(config, opt.config, image_conditioning)
    ckpt = check_checkpoint(opt.ckpt)
    device = select_device(opt.device)
    opt.precision = resolve_precision(opt.precision, device)
    options = runtime_options(opt)

    from ldm.adapters.lora import LoraSet
    from ldm.checkpoint import model_hash_in_background
    from ldm.safety import load_safety_checker

    safety_checker = None if opt.no_safety_checker else load_safety_checker(opt.safety_checker, device)
    ckpt_hash = model_hash_in_background(hashed_file(ckpt))
    model = load_model(config, ckpt, load_device(device, options))
    if getattr(opt, "vae", None):
        from ldm.adapters.vae import find_vae, load_vae

        load_vae(model, find_vae(opt.vae, opt.vae_dir))
    loras = LoraSet(model)
    weights = weights_identity(opt, config, ckpt_hash, loras) if options.backend == "openvino" else None
    prepare(model, device, opt.precision, options, weights)
    return Session(
        opt=opt,
        device=device,
        precision=opt.precision,
        model=model,
        sampler=make_sampler(opt.sampler, model),
        safety_checker=safety_checker,
        watermark=Watermarker(),
        prompt_encoder=prompt_encoder(model, opt),
        loras=loras,
        model_hash=ckpt_hash.result(),  # after everything else that loads
    )


def weights_identity(opt: Any, config: Any, ckpt_hash: Future, loras: Any) -> Callable[[str], dict]:
    """What the weights of the UNet ("unet") or the VAE decoder ("decoder") are now, as the OpenVINO backend keys
    its converted models: the checkpoint's hash and the config, with the LoRAs merged now (`loras`, an
    ldm.adapters.lora.LoraSet) for the UNet, the --vae file for the decoder; files named by their sha256."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import cached_model_hash

    hashes: dict[str, str] = {}

    def file_hash(path: str | Path) -> str:
        if str(path) not in hashes:
            hashes[str(path)] = cached_model_hash(path)
        return hashes[str(path)]

    config_hash = hashlib.sha256(OmegaConf.to_yaml(config).encode()).hexdigest()
    vae = getattr(opt, "vae", None)
    if vae:
        from ldm.adapters.vae import find_vae

        vae = find_vae(vae, opt.vae_dir)

    def identity(part: str) -> dict:
        weights = {"checkpoint": ckpt_hash.result(), "config": config_hash}
        if part == "unet":
            return {**weights, "loras": [[file_hash(path), weight] for path, weight in loras.loras]}
        return {**weights, "vae": file_hash(vae) if vae else None}

    return identity


def prompt_encoder(model: Any, opt: Any) -> Any:
    """The A1111 prompt encoder over the model's text encoder (with the embeddings of --embeddings-dir and
    --clip-skip), or None for --prompt-syntax plain."""
    if getattr(opt, "prompt_syntax", "plain") != "a1111":
        return None
    from ldm.prompts import PromptEncoder, load_embeddings

    text_encoder = model.cond_stage_model
    if not hasattr(text_encoder, "encode_tokens"):
        print(
            f"note: {type(text_encoder).__name__} is not a CLIP text encoder: prompts are read as plain text"
        )
        return None
    layers = text_encoder.transformer.text_model.config.num_hidden_layers
    if opt.clip_skip > layers:
        raise UserError(
            f"--clip-skip {opt.clip_skip}: this model's text encoder has {layers} layers: use 1..{layers}"
        )
    folder = Path(opt.embeddings_dir)
    embeddings = load_embeddings(folder, text_encoder.hidden_size) if folder.is_dir() else {}
    return PromptEncoder(text_encoder, embeddings, clip_skip=opt.clip_skip)


@dataclass
class Batch:
    """One sampler call: its prompts, the images' seeds, and the conditionings c and uc (None without guidance)."""

    prompts: list[str]
    seeds: list[int]
    c: Any
    uc: Any
    generator: (
        torch.Generator
    )  # for draws that span the batch (eta > 0 noise, mask blending): seeded by seeds[0]
    callback: Callable[[int], None]  # the samplers' per-step callback: advances the steps progress bar


@dataclass
class Record:
    """What the PNGs record: `parameters` shared by every image of the run, and `remake(prompt, seed,
    n_samples)`, the command that re-makes an image (n_samples 1) or its batch."""

    parameters: dict
    remake: Callable[[str, int, int], str]


Render = Callable[[Batch], list[Image.Image]]


def report_step_times(batches: list[list[float]]) -> None:
    """Print the first sampler step's time (it includes torch.compile's compiling under --compile) and the
    median of the others; each batch's list holds its start time, then the time each step ended."""
    first = batches[0][1] - batches[0][0] if batches and len(batches[0]) > 1 else None
    rest = sorted(b - a for times in batches for a, b in zip(times[1:], times[2:], strict=False))
    if first is not None and rest:
        print(f"Sampler steps: first {first:.2f} s, then {rest[len(rest) // 2]:.2f} s per step (median)")


def conditionings(
    session: Session, prompts: list[str], steps: int, negative_prompt: str | None = None
) -> tuple[Any, Any]:
    """(c, uc) of a batch: the prompts' conditioning, and the negative prompt's (--negative-prompt unless
    `negative_prompt` is given; None when --scale is 1, which needs none). With the A1111 prompt language both
    may change over the `steps` sampler steps (prompt editing) and are padded to the same length; plain text is
    the original's `get_learned_conditioning`, its uc cached per batch size on the session."""
    opt, model = session.opt, session.model
    negative = opt.negative_prompt if negative_prompt is None else negative_prompt
    n = len(prompts)
    if session.prompt_encoder is not None:
        from ldm.prompts import encode_conditioning

        c, uc = encode_conditioning(session.prompt_encoder, prompts, n * [negative], steps)
        return c, uc if opt.scale != 1.0 else None
    warn_truncated(session, [*prompts, negative])
    cache, key = session.uc_cache, (n, negative)
    if opt.scale != 1.0 and key not in cache:
        cache[key] = model.get_learned_conditioning(n * [negative])
    return model.get_learned_conditioning(prompts), cache.get(key) if opt.scale != 1.0 else None


def warn_truncated(session: Session, texts: list[str]) -> None:
    """Plain text is cut at the text encoder's 77 tokens: say once per text how many tokens were dropped."""
    text_encoder = session.model.cond_stage_model
    if not hasattr(text_encoder, "token_ids"):
        return
    warned = session.truncation_warned
    for text, ids in zip(texts, text_encoder.token_ids(texts), strict=True):
        dropped = len(ids) - (text_encoder.max_length - 2)
        if dropped > 0 and text not in warned:
            warned.add(text)
            print(
                f"warning: the prompt is {len(ids)} tokens, {dropped} past the 75 the text encoder takes: they are "
                f"ignored (--prompt-syntax a1111 encodes long prompts in chunks): {text[:60]!r}"
            )


def use_loras(session: Session, prompts: list[str]) -> list[tuple[Path, float]]:
    """Merge the batch's LoRAs into the weights (--lora, then the prompts' <lora:name:weight> tags), undoing the
    previous batch's; returns them as (file, weight)."""
    from ldm.adapters.lora import find_lora, parse_lora_arg
    from ldm.prompts import lora_tags

    opt = session.opt
    wanted = [parse_lora_arg(value) for value in getattr(opt, "lora", None) or []]
    if session.prompt_encoder is not None:
        wanted += lora_tags(prompts)
    loras = [(find_lora(name, opt.lora_dir), weight) for name, weight in wanted]
    if session.loras is not None:
        session.loras.use(loras)
    return loras


def lora_record(session: Session, loras: list[tuple[Path, float]]) -> dict:
    """The metadata of the LoRAs in use, (file, weight) pairs: [[name, weight], ...] and A1111's `Lora hashes`."""
    if not loras:
        return {}
    from ldm.adapters.lora import lora_hash

    loras = [(Path(path), weight) for path, weight in loras]
    hashes = session.lora_hash_cache
    for path, _ in loras:
        hashes.setdefault(path, lora_hash(path))
    return {
        "lora_weights": [[path.stem, weight] for path, weight in loras],
        "lora_hashes": ", ".join(f"{path.stem}: {hashes[path]}" for path, _ in loras),
    }


def render_batch(
    session: Session,
    render: Render,
    prompts: list[str],
    seeds: list[int],
    callback: Callable[[int], None] = lambda step: None,
    steps: int | None = None,
) -> list[Image.Image]:
    """One batch's finished images: its LoRAs merged in, conditioned (prompt editing over `steps` sampler steps,
    --ddim_steps by default), rendered (`callback` after each sampler step), passed through the safety checker
    and watermarked. Call inside `session.scope()`."""
    use_loras(session, prompts)
    c, uc = conditionings(session, prompts, steps or session.opt.ddim_steps)
    batch = Batch(prompts, seeds, c, uc, torch.Generator().manual_seed(seeds[0]), callback)
    images = render(batch)
    if session.safety_checker is not None:
        images = session.safety_checker(images)
    return [session.watermark(image) for image in images]


def save(folder: NumberedFolder, image: Image.Image, parameters: dict, written: int) -> Path:
    """Save the next numbered PNG; a full or failing disk ends the run with one line saying what was kept."""
    try:
        return folder.save(image, parameters)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(
            f"cannot write into {folder.folder} ({reason}): the {written} file{'s' * (written != 1)} written "
            "before are kept; free some space or pass another --outdir"
        ) from None


def generate(
    session: Session,
    batches: list[list[str]],
    render: Render,
    steps: int,
    record: Record,
    finish: Callable[[Image.Image], Image.Image] | None = None,
    batch_dependent: bool = False,
) -> None:
    """Run `render` on every batch of prompts --n_iter times and write the results; call it inside
    `session.scope()`.

    Image k of a run gets seed --seed + k (with --fixed_code, batch position k gets --seed + k every time).
    `render` returns a batch's images (before the safety checker and the watermark); `steps` is how many
    sampler steps it reports through its callback; `finish` runs on each watermarked image (inpainting pastes
    the kept pixels back there). `batch_dependent` says an image depends on its batch (noise drawn for the
    whole batch), so the re-make command re-makes the batch.
    """
    opt = session.opt
    samples_folder = NumberedFolder(Path(opt.outdir) / "samples")
    grid_folder = NumberedFolder(Path(opt.outdir), prefix="grid-", digits=4)
    shared = {**record.parameters, "sampler": opt.sampler, "model_hash": session.model_hash}
    images, written, first_remake, image_index = [], 0, None, 0
    step_times = []
    start = time.perf_counter()
    for _ in trange(opt.n_iter, desc="Sampling"):
        for prompts in tqdm(batches, desc="data"):
            n = len(prompts)
            first_seed = opt.seed if opt.fixed_code else opt.seed + image_index
            seeds = list(range(first_seed, first_seed + n))
            image_index += n
            with tqdm(total=steps, desc=f"{opt.sampler} steps", leave=False) as bar:
                step_times.append([time.perf_counter()])
                batch_images = render_batch(
                    session, render, prompts, seeds,
                    lambda _: (bar.update(), step_times[-1].append(time.perf_counter())), steps,
                )  # fmt: skip
            loras = lora_record(session, session.loras.loras if session.loras is not None else [])
            for k, (image, prompt, seed) in enumerate(zip(batch_images, prompts, seeds, strict=True)):
                if finish is not None:
                    image = finish(image)
                images.append(image)
                if opt.skip_save:
                    continue
                if batch_dependent:
                    remake = record.remake(prompt, seeds[0], n)
                    extra = {"remake": remake, "batch_index": k}
                else:
                    remake = record.remake(prompt, seed, 1)
                    extra = {"remake": remake}
                first_remake = first_remake or remake
                save(
                    samples_folder,
                    image,
                    {**shared, **loras, "prompt": prompt, "seed": seed, **extra},
                    written,
                )
                written += 1

    if not opt.skip_grid:
        grid = session.watermark(make_image_grid(images, opt.n_rows if opt.n_rows > 0 else opt.n_samples))
        prompts = sorted({p for batch in batches for p in batch})
        save(grid_folder, grid, {**shared, "prompts": prompts, "seed": opt.seed}, written)
        written += 1
    seconds = time.perf_counter() - start
    report_step_times(step_times)
    if first_remake:
        which = (
            "its batch (the image at position batch_index of it)" if batch_dependent else "one image alone"
        )
        print(f"To re-make {which}, run the command in its PNG metadata, e.g.: {first_remake}")
    print(
        f"Your samples are ready and waiting for you here: {opt.outdir} "
        f"({written} file{'s' * (written != 1)} written, {len(images)} images, {seconds / len(images):.2f} s per image)"
    )


class StopSampling(Exception):
    """Raised by a sampler step callback to end a batch early: txt2img and inpaint then decode the sampler's
    last estimate of the final latents (what AUTOMATIC1111's interrupt returns)."""


def sample_until_stopped(run: Callable[[Callable], torch.Tensor]) -> torch.Tensor:
    """`run(img_callback)`'s latents, or, when a step callback raised StopSampling, the last denoised estimate
    the sampler reported to `img_callback` (StopSampling again when it had reported none)."""
    latest: list[torch.Tensor] = []

    def keep(pred_x0: torch.Tensor, step: int) -> None:
        latest[:] = [pred_x0]

    try:
        return run(keep)
    except StopSampling:
        if not latest:
            raise
        return latest[0]


def is_k_sampler(sampler: Any) -> bool:
    """A sampler of the k-diffusion family (it has noise schedules; each image draws from its own generator)."""
    return sampler.default_scheduler is not None


def seeded_noise(session: Session, batch: Batch, shape: tuple[int, ...]) -> tuple[torch.Tensor, list]:
    """(x_T [B, *shape] on the device, the images' CPU generators after that first draw).

    Image i's x_T is the first draw of a CPU generator seeded with its seed (slerped towards its variation
    seed's with --subseed/--subseed_strength, as A1111)."""
    from ldm.noise import variation_noise

    opt = session.opt
    subseed = getattr(opt, "subseed", None)
    strength = getattr(opt, "subseed_strength", 0.0)
    subseeds = None if subseed is None else [subseed + (s - batch.seeds[0]) for s in batch.seeds]
    x_T, generators = variation_noise(batch.seeds, shape, subseeds, strength)
    return x_T.to(session.device), generators


def sampler_options(
    session: Session, batch: Batch, generators: list, decode: bool = False, sampler: Any = None
) -> dict:
    """The sampler keywords of the options for `sampler` (the session's by default). The k-diffusion samplers
    continue each image's own generator (A1111's "CPU" RNG: an image never depends on its batch) with --eta,
    --s_noise and --quantize-t (and the schedule, which `decode` takes from make_schedule); DDIM's eta noise
    comes from `batch.generator`, as it always has (its eta is set by make_schedule for `decode`)."""
    opt = session.opt
    if not is_k_sampler(sampler or session.sampler):
        return (
            {"generator": batch.generator} if decode else {"generator": batch.generator, "eta": opt.ddim_eta}
        )
    options = {"generator": generators, "eta": opt.eta, "s_noise": opt.s_noise, "quantize_t": opt.quantize_t}
    return options if decode else {**options, "scheduler": opt.scheduler}


def txt2img_samples(session: Session, batch: Batch) -> torch.Tensor:
    """The batch's latents [B, C, H/f, W/f], sampled from its images' seeded noise x_T."""
    opt, shape = session.opt, session.latent_shape
    x_T, generators = seeded_noise(session, batch, shape)
    return sample_until_stopped(lambda keep: session.sampler.sample(
        S=opt.ddim_steps, conditioning=batch.c, batch_size=len(batch.prompts), shape=shape,
        verbose=False, unconditional_guidance_scale=opt.scale, unconditional_conditioning=batch.uc,
        x_T=x_T, callback=batch.callback, img_callback=keep, **sampler_options(session, batch, generators),
    )[0])  # fmt: skip


def txt2img_render(session: Session) -> Render:
    """Each batch sampled from its images' seeded noise x_T and decoded."""
    return lambda batch: to_pil(session.model.decode_first_stage(txt2img_samples(session, batch)))


def hires_render(session: Session, hires: Any) -> Render:
    """A1111's hires fix (`hires` an ldm.hires.Hires): each batch rendered at --W x --H as txt2img, upscaled to
    the hires size (the latents interpolated, or the decoded pixels resized with PIL and encoded again), then
    refined by an img2img pass of `hires.steps` steps, the last steps of a `hires.schedule_steps`-step schedule
    (A1111's fixed-steps rule). As A1111's sample_hr_pass, the second pass starts from new noise at the hires
    size drawn with the same seeds (and variation seeds), each image's generator continuing from there; with
    --hr-prompt/--hr-negative-prompt the second pass is conditioned on those. Each pass shows its progress bar
    (the first is `generate`'s). Call inside `session.scope()`."""
    from ldm.hires import UPSCALERS

    opt, model = session.opt, session.model
    sampler = make_sampler(hires.sampler or opt.sampler, model)
    if is_k_sampler(sampler):
        sampler.make_schedule(hires.schedule_steps, verbose=False, scheduler=hires.scheduler)
    else:
        sampler.make_schedule(ddim_num_steps=hires.schedule_steps, ddim_eta=opt.ddim_eta, verbose=False)
    shape = (opt.C, hires.height // opt.f, hires.width // opt.f)
    _, mode, antialias = UPSCALERS[hires.upscaler]
    resample = Image.Resampling.LANCZOS if hires.upscaler == "lanczos" else Image.Resampling.NEAREST
    own_conditioning = session.prompt_encoder is not None or hires.prompt or hires.negative_prompt is not None

    def upscale(samples: torch.Tensor, generators: list) -> torch.Tensor:
        if mode is not None:
            return F.interpolate(samples.float(), size=shape[1:], mode=mode, antialias=antialias)
        from ldm.image_input import image_to_tensor

        size = (hires.width, hires.height)
        images = [image.resize(size, resample) for image in to_pil(model.decode_first_stage(samples))]
        return torch.cat([
            encode_image(model, model.encode_first_stage(image_to_tensor(image).to(session.device)), [generator])
            for image, generator in zip(images, generators, strict=True)
        ])  # fmt: skip

    def render(batch: Batch) -> list[Image.Image]:
        samples = txt2img_samples(session, batch)
        noise, generators = seeded_noise(session, batch, shape)  # A1111: a new ImageRNG at the hires size
        z0 = upscale(samples, generators)
        c, uc = batch.c, batch.uc
        if own_conditioning:
            prompts = len(batch.prompts) * [hires.prompt] if hires.prompt else batch.prompts
            c, uc = conditionings(session, prompts, hires.steps, hires.negative_prompt)
        if is_k_sampler(sampler):
            z = sampler.stochastic_encode(z0, hires.steps, noise=noise)
        else:
            z = noised_latents(sampler, z0, noise, hires.steps)
        with tqdm(total=hires.steps, desc=f"hires {hires.sampler or opt.sampler} steps", leave=False) as bar:
            samples = sampler.decode(
                z, c, hires.steps, unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                callback=lambda _: bar.update(), verbose=False,
                **sampler_options(session, batch, generators, decode=True, sampler=sampler),
            )  # fmt: skip
        return to_pil(model.decode_first_stage(samples))

    return render


def img2img_render(session: Session, image: torch.Tensor, size: tuple[int, int], t_enc: int) -> Render:
    """SDEdit: the image [1, 3, H, W] in [-1, 1] (already at the model's size) encoded, noised to step t_enc of
    the schedule (image i with its seed's first draw, txt2img's x_T) and denoised over the schedule's last t_enc
    steps; results resized back to `size` (width, height). Call inside `session.scope()`, after
    `session.sampler.make_schedule`."""
    from ldm.image_input import resize_image

    opt, model, sampler = session.opt, session.model, session.sampler
    posterior = model.encode_first_stage(image.to(session.device))
    shape = (opt.C, image.shape[-2] // opt.f, image.shape[-1] // opt.f)

    def render(batch: Batch) -> list[Image.Image]:
        noise, generators = seeded_noise(session, batch, shape)  # first draw: txt2img's x_T
        z0 = encode_image(model, posterior, generators)
        if is_k_sampler(sampler):  # A1111: x0 + noise * sigma at the first of the steps run
            z = sampler.stochastic_encode(z0, t_enc, noise=noise)
        else:
            z = noised_latents(sampler, z0, noise, t_enc)
        samples = sampler.decode(
            z, batch.c, t_enc, unconditional_guidance_scale=opt.scale, unconditional_conditioning=batch.uc,
            callback=batch.callback, verbose=False, **sampler_options(session, batch, generators, decode=True),
        )  # fmt: skip
        return [resize_image(result, size) for result in to_pil(model.decode_first_stage(samples))]

    return render


def inpaint_render(
    session: Session,
    image: torch.Tensor,
    repaint: torch.Tensor,
    size: tuple[int, int],
    keep: torch.Tensor | None = None,
) -> Render:
    """Inpainting of image [1, 3, H, W] in [-1, 1] where repaint [1, 1, H, W] is 1: with an SD inpainting model
    (hybrid conditioning, 2C + 1 UNet input channels) through its concat conditioning; with an ordinary model by
    masked sampling (the kept latents blended in at every step; `keep` [1, 1, H/f, W/f] in [0, 1], a soft mask,
    replaces the one made from `repaint`). Results resized back to `size`. Call inside `session.scope()`."""
    from ldm.image_input import resize_image

    opt, model, sampler = session.opt, session.model, session.sampler
    shape = (opt.C, image.shape[-2] // opt.f, image.shape[-1] // opt.f)
    concat = is_inpainting_model(model)
    if not concat and not sampler.supports_mask:
        raise UserError(
            f"the {opt.sampler} sampler cannot do masked sampling, which this (non-inpainting) model needs: "
            "use --sampler ddim or plms, or an inpainting model"
        )
    image, repaint = image.to(session.device), repaint.to(session.device)
    if concat:
        posterior = model.encode_first_stage(masked_image(image, repaint))
    else:
        posterior = model.encode_first_stage(image)
        keep = latent_keep_mask(repaint, shape[1:]) if keep is None else keep.to(session.device)

    def render(batch: Batch) -> list[Image.Image]:
        x_T, generators = seeded_noise(session, batch, shape)  # first draw: txt2img's x_T
        kwargs = dict(
            S=opt.ddim_steps, batch_size=len(batch.prompts), shape=shape, x_T=x_T,
            unconditional_guidance_scale=opt.scale, callback=batch.callback, verbose=False,
            **sampler_options(session, batch, generators),
        )  # fmt: skip
        if concat:
            c_concat = [inpainting_concat(model, posterior, repaint, generators)]
            uc = None if batch.uc is None else {"c_concat": c_concat, "c_crossattn": [batch.uc]}
            cond = {"c_concat": c_concat, "c_crossattn": [batch.c]}
            samples = sample_until_stopped(lambda step_x0: sampler.sample(
                conditioning=cond, unconditional_conditioning=uc, img_callback=step_x0, **kwargs
            )[0])  # fmt: skip
        else:
            z0 = encode_image(model, posterior, generators)
            samples = sample_until_stopped(lambda step_x0: sampler.sample(
                conditioning=batch.c, unconditional_conditioning=batch.uc, mask=keep, x0=z0,
                img_callback=step_x0, **kwargs,
            )[0])  # fmt: skip
            samples = keep * z0 + (1.0 - keep) * samples  # the decoder sees the image's own kept latents
        return [resize_image(result, size) for result in to_pil(model.decode_first_stage(samples))]

    return render


def img2img_steps(session: Session, strength: float) -> int:
    """Set the sampler's schedule for --ddim_steps and return t_enc, the steps img2img runs for `strength`:
    int(strength * S) for the DDIM family, as the original; A1111's int(min(strength, 0.999) * S) + 1 for
    the k-diffusion samplers."""
    opt, sampler = session.opt, session.sampler
    if is_k_sampler(sampler):
        sampler.make_schedule(opt.ddim_steps, verbose=False, scheduler=opt.scheduler)
        return sampler.img2img_steps(strength, opt.ddim_steps)
    sampler.make_schedule(ddim_num_steps=opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)
    return strength_steps(strength, opt.ddim_steps)

"""What every sampler shares: conditioning checks, classifier-free guidance, the DDIM step schedule, noise
draws, and the `sample` / `stochastic_encode` / `decode` entry points around each sampler's step loop.

The model a sampler drives needs `num_timesteps`, `alphas_cumprod`, `alphas_cumprod_prev` and `betas`
([T] buffers), `apply_model(x, t, cond)`, `parameterization` ("eps" or "x0") and, for masked sampling,
`q_sample(x_start, t, noise)`. Samplers keep their tensors on the device of `model.betas`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)

Cond = torch.Tensor | list | dict | None
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _tensors(cond: Cond) -> list[torch.Tensor]:
    """Every tensor inside a (possibly nested) list/dict conditioning (a changing one's at step 0)."""
    if isinstance(cond, torch.Tensor):
        return [cond]
    if hasattr(cond, "at"):
        return _tensors(cond.at(0))
    if isinstance(cond, dict):
        return [t for v in cond.values() for t in _tensors(v)]
    if isinstance(cond, list | tuple):
        return [t for v in cond for t in _tensors(v)]
    return []


def check_conditioning(cond: Cond, batch_size: int, name: str = "conditioning") -> None:
    """Raise ValueError unless every tensor in `cond` holds one entry per sample."""
    for tensor in _tensors(cond):
        if tensor.shape[0] != batch_size:
            raise ValueError(
                f"{name} has batch size {tensor.shape[0]} but batch_size is {batch_size}: "
                "pass one conditioning per sample"
            )


def cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """[uncond, cond] concatenated along the batch, per key of a dict and per entry of a list."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError("unconditional_conditioning must be a dict with the same keys as conditioning")
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list | tuple):
        if not isinstance(uncond, list | tuple) or len(uncond) != len(cond):
            raise ValueError("unconditional_conditioning must be a list as long as conditioning")
        return [cat_cond(u, c) for u, c in zip(uncond, cond, strict=True)]
    return torch.cat([uncond, cond])


class StepCounter:
    """The index of the sampler step being computed, for conditionings that change during sampling.

    Used as a run's `options.callback`: every sampler loop reports each finished step n through it, so the
    next model calls belong to step n + 1; n is passed on to the user's callback. Extra model calls within
    a step (PLMS's first step, second-order samplers) see the same index.
    """

    def __init__(self, callback: Callable[[int], None] | None = None):
        self.step = 0
        self.callback = callback

    def __call__(self, n: int) -> None:
        self.step = n + 1
        if self.callback is not None:
            self.callback(n)


def _changes(cond: Cond) -> bool:
    """Whether a conditioning (or a part of a dict/list one, e.g. c_crossattn) changes during sampling."""
    if hasattr(cond, "at"):
        return True
    if isinstance(cond, dict):
        return any(_changes(v) for v in cond.values())
    if isinstance(cond, list | tuple):
        return any(_changes(v) for v in cond)
    return False


def guided_eps_fn(
    model: Any,
    cond: Cond,
    uncond: Cond = None,
    scale: float = 1.0,
    score_corrector: Any = None,
    corrector_kwargs: dict | None = None,
    counter: StepCounter | None = None,
) -> EpsFn:
    """eps(x, t, alpha_cumprod) of `model` under classifier-free guidance.

    x [B, C, H, W]; t a 0-dim timestep tensor (long or float) expanded to the batch; alpha_cumprod the 0-dim
    alpha-bar at t, used to turn an x0-predicting model's output into eps. With `uncond` and scale != 1 the
    model runs once on cat([x, x]) with cat([uncond, cond]) and returns e_u + scale * (e_c - e_u);
    otherwise once on (x, cond). The concatenated conditioning is built here, once per run, unless `cond`
    or `uncond` changes during the run: a conditioning with an `at(step)` method (e.g.
    `ldm.prompts.ScheduledConditioning`) is resolved at `counter.step` on every call.
    """
    guided = uncond is not None and scale != 1.0
    scheduled = _changes(cond) or (guided and _changes(uncond))
    if scheduled and counter is None:
        raise ValueError("a conditioning that changes during sampling needs the run's StepCounter")
    cond_in = cat_cond(uncond, cond) if guided and not scheduled else cond
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in ("eps", "x0"):
        raise ValueError(f"samplers support eps- and x0-prediction models, not '{parameterization}'")
    if score_corrector is not None and parameterization != "eps":
        raise ValueError("score_corrector needs an eps-prediction model")
    corrector_kwargs = corrector_kwargs or {}

    def at_step(c: Cond) -> Cond:
        if hasattr(c, "at"):
            return c.at(counter.step)
        if isinstance(c, dict):
            return {k: at_step(v) for k, v in c.items()}
        if isinstance(c, list | tuple):
            return [at_step(v) for v in c]
        return c

    def eps_fn(x: torch.Tensor, t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        c = at_step(cond)
        if guided:
            c_in = cat_cond(at_step(uncond), c) if scheduled else cond_in
            out_u, out_c = model.apply_model(torch.cat([x, x]), t.expand(2 * x.shape[0]), c_in).chunk(2)
            out = out_u + scale * (out_c - out_u)
        else:
            out = model.apply_model(x, t.expand(x.shape[0]), c)
        # the update runs in x's dtype (fp32 latents even when the UNet returns fp16 under autocast)
        out = out.to(x.dtype)
        if parameterization == "x0":
            out = (x - alpha_cumprod.sqrt() * out) / (1 - alpha_cumprod).sqrt()
        if score_corrector is not None:
            out = score_corrector.modify_score(model, out, x, t.expand(x.shape[0]), c, **corrector_kwargs)
        return out

    return eps_fn


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple, device: torch.device, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`.

    `generator` is one generator (drawn on its own device, so a CPU generator gives the same numbers
    everywhere), or one CPU generator per batch entry (entry i is the next draw of shape[1:] from
    generator[i], so an image's noise does not depend on its batch), or None for torch's global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: pass one per batch entry")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]).to(
        device
    )


class Steps(NamedTuple):
    """Constants of a DDIM-type run, ascending in noise: entry i is the step that takes x from DDPM timestep
    `timesteps[i]` down to alpha-bar `alphas_prev[i]`. All [S] tensors on the model's device."""

    timesteps: torch.Tensor  # long
    alphas: torch.Tensor  # alpha-bar at the step
    alphas_prev: torch.Tensor  # alpha-bar the step lands on
    sqrt_alphas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    sqrt_alphas_prev: torch.Tensor
    dir_coefs: torch.Tensor  # sqrt(1 - alpha_prev - sigma^2), the weight of eps in x_prev
    sigmas: torch.Tensor  # std of the fresh noise in x_prev
    stochastic: bool  # any sigma > 0


def make_steps(
    timesteps: np.ndarray,
    alphas: np.ndarray,
    alphas_prev: np.ndarray,
    sigmas: np.ndarray,
    device: torch.device,
) -> Steps:
    """Steps from float64 host arrays [S]; the derived coefficients are computed in float64, stored in fp32."""

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)

    return Steps(
        timesteps=torch.from_numpy(np.asarray(timesteps, dtype=np.int64)).to(device),
        alphas=dev(alphas),
        alphas_prev=dev(alphas_prev),
        sqrt_alphas=dev(np.sqrt(alphas)),
        sqrt_one_minus_alphas=dev(np.sqrt(1.0 - alphas)),
        sqrt_alphas_prev=dev(np.sqrt(alphas_prev)),
        dir_coefs=dev(np.sqrt(1.0 - alphas_prev - sigmas**2)),
        sigmas=dev(sigmas),
        stochastic=bool(np.any(sigmas > 0)),
    )


@dataclass
class RunOptions:
    """The per-run options of the original `sample()` API that a step loop reads."""

    use_original_steps: bool = False
    mask: torch.Tensor | None = None  # [B, 1 or C, H, W], 1 where x0 is kept
    x0: torch.Tensor | None = None  # [B, C, H, W] known latents blended in under `mask`
    callback: Callable[[int], None] | None = None
    img_callback: Callable[[torch.Tensor, int], None] | None = None
    log_every_t: int = 100
    quantize_denoised: bool = False
    temperature: float = 1.0
    noise_dropout: float = 0.0
    generator: Generators = None
    verbose: bool = True
    desc: str = "Sampling"


class Sampler:
    """Base of DDIMSampler, PLMSSampler and DPMSolverSampler.

    `make_schedule(S)` picks the S steps of a run; `sample()` runs them all from noise. For img2img,
    `stochastic_encode(x0, t)` noises latents to the level of step index t (a [B] long tensor) and
    `decode(x, cond, t_start)` runs the last `t_start` steps of the schedule from there.
    Subclasses implement `_sample_loop`.
    """

    name = "Sampler"
    # Capabilities, read by the scripts and the pipeline instead of the sampler's name:
    supports_mask = True  # sample() takes mask/x0 (inpainting by blending known latents at every step)
    uses_eta = False  # takes an eta > 0 (noise added at each step, drawn from the run's generator)
    stochastic = False  # draws noise at every step whatever eta is (ancestral and SDE samplers)
    integer_timesteps = True  # feeds the model integer DDPM timesteps only
    default_scheduler: str | None = None  # the noise schedule it runs by default; None: it has no schedules

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        return self.model.betas.device

    def _alphas_cumprod(self) -> np.ndarray:
        """The model's alpha-bar [T] as float64 on the host (read once per schedule, never inside a loop)."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("the model must define alphas_cumprod for each of its num_timesteps")
        return alphas_cumprod.detach().cpu().double().numpy()

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """Pick the DDIM timesteps and their constants (kept in fp32 whatever the model's dtype)."""
        self.ddim_timesteps = make_ddim_timesteps(
            ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose=verbose
        )
        self.ddim_eta = ddim_eta
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            self._alphas_cumprod(), self.ddim_timesteps, ddim_eta, verbose=verbose
        )
        self.ddim_steps = make_steps(self.ddim_timesteps, alphas, alphas_prev, sigmas, self.device)
        self.ddim_alphas = self.ddim_steps.alphas
        self.ddim_alphas_prev = self.ddim_steps.alphas_prev
        self.ddim_sigmas = self.ddim_steps.sigmas
        self.ddim_sqrt_one_minus_alphas = self.ddim_steps.sqrt_one_minus_alphas

    def _steps(self, use_original_steps: bool) -> Steps:
        """The DDIM steps of the current schedule, or all T DDPM steps (alpha_prev of step 0 is then 1)."""
        if not use_original_steps:
            return self.ddim_steps
        alphas = self._alphas_cumprod()
        alphas_prev = np.append(1.0, alphas[:-1])
        sigmas = self.ddim_eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return make_steps(np.arange(self.ddpm_num_timesteps), alphas, alphas_prev, sigmas, self.device)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Cond = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run S steps from x_T (or fresh noise from `generator`) to latents [batch_size, *shape].

        Returns (samples, {"x_inter": [...], "pred_x0": [...]}) logged every `log_every_t` steps.
        `normals_sequence` is accepted and ignored, as in the original; an unknown keyword is a TypeError (the
        original dropped it silently).
        """
        size = (batch_size, *shape)
        check_conditioning(conditioning, batch_size)
        if unconditional_conditioning is not None and unconditional_guidance_scale != 1.0:
            check_conditioning(unconditional_conditioning, batch_size, "unconditional_conditioning")
        if mask is not None and x0 is None:
            raise ValueError("a mask needs x0, the latents to keep where the mask is 1")
        if x_T is not None and tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the batch has shape {size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        if verbose:
            print(f"Data shape for {self.name} sampling is {size}, eta {eta}")
        x = x_T if x_T is not None else randn(size, self.device, generator)
        counter = StepCounter(callback)
        eps_fn = guided_eps_fn(
            self.model,
            conditioning,
            unconditional_conditioning,
            unconditional_guidance_scale,
            score_corrector,
            corrector_kwargs,
            counter,
        )
        options = RunOptions(
            mask=mask,
            x0=x0,
            callback=counter,
            img_callback=img_callback,
            log_every_t=log_every_t,
            quantize_denoised=quantize_x0,
            temperature=temperature,
            noise_dropout=noise_dropout,
            generator=generator,
            verbose=verbose,
            desc=f"{self.name} Sampler",
        )
        return self._sample_loop(x, eps_fn, self.num_steps, options)

    @property
    def num_steps(self) -> int:
        """Steps in the current schedule."""
        return len(self.ddim_timesteps)

    @torch.no_grad()
    def level_alphas(self) -> torch.Tensor:
        """Alpha-bar [S or S + 1] of each index of the current schedule: the noise levels `stochastic_encode`
        noises to and `decode` starts from (DDIM-type samplers: the alpha-bar of each step)."""
        return self.ddim_alphas

    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """x0 [B, C, H, W] noised to the level of schedule step index t [B] (DDPM timestep t with
        `use_original_steps`): sqrt(a) * x0 + sqrt(1 - a) * noise. Call make_schedule first."""
        if use_original_steps:
            alphas = torch.from_numpy(self._alphas_cumprod().astype(np.float32)).to(self.device)
        else:
            alphas = self.level_alphas()
        if noise is None:
            noise = randn(tuple(x0.shape), x0.device, generator)
        return (
            extract_into_tensor(alphas.sqrt(), t, x0.shape) * x0
            + extract_into_tensor((1 - alphas).sqrt(), t, x0.shape) * noise
        )

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Cond,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        generator: Generators = None,
        verbose: bool = True,
    ) -> torch.Tensor:
        """Run the last `t_start` steps of the schedule (from step index t_start - 1 down) on x_latent."""
        last = self.ddpm_num_timesteps if use_original_steps else self.num_steps
        if not 0 <= t_start <= last:
            raise ValueError(f"t_start must be in 0..{last} for this schedule, got {t_start}")
        check_conditioning(cond, x_latent.shape[0])
        counter = StepCounter(callback)
        eps_fn = guided_eps_fn(
            self.model, cond, unconditional_conditioning, unconditional_guidance_scale, counter=counter
        )
        options = RunOptions(
            use_original_steps=use_original_steps,
            callback=counter,
            generator=generator,
            verbose=verbose,
            desc="Decoding image",
        )
        return self._sample_loop(x_latent, eps_fn, t_start, options)[0]

    def _sample_loop(
        self, x: torch.Tensor, eps_fn: EpsFn, n_steps: int, options: RunOptions
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the last n_steps steps of the schedule on x; return (x, intermediates)."""
        raise NotImplementedError

    def _progress(self, n_steps: int, options: RunOptions) -> tqdm:
        """Step indices n_steps - 1, ..., 0 (most to least noisy) under a progress bar."""
        if options.verbose:
            print(f"Running {self.name} Sampling with {n_steps} timesteps")
        return tqdm(range(n_steps - 1, -1, -1), desc=options.desc, total=n_steps, disable=not options.verbose)

    def _blend_known(self, x: torch.Tensor, t: torch.Tensor, options: RunOptions) -> torch.Tensor:
        """Inpainting: x with the `mask` region replaced by x0 noised to timestep t."""
        if options.mask is None:
            return x
        noise = randn(tuple(options.x0.shape), x.device, options.generator)
        x_known = self.model.q_sample(options.x0, t.expand(x.shape[0]), noise=noise)
        return x_known * options.mask + (1.0 - options.mask) * x

    def _ddim_update(
        self, x: torch.Tensor, e_t: torch.Tensor, steps: Steps, i: int, options: RunOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step with eps e_t from step index i: (x_prev, pred_x0)."""
        pred_x0 = (x - steps.sqrt_one_minus_alphas[i] * e_t) / steps.sqrt_alphas[i]
        if options.quantize_denoised:
            pred_x0 = self.model.first_stage_model.quantize(pred_x0)[0]
        x_prev = steps.sqrt_alphas_prev[i] * pred_x0 + steps.dir_coefs[i] * e_t
        if steps.stochastic:
            noise = randn(tuple(x.shape), x.device, options.generator) * (
                steps.sigmas[i] * options.temperature
            )
            if options.noise_dropout > 0.0:
                noise = torch.nn.functional.dropout(noise, p=options.noise_dropout)
            x_prev = x_prev + noise
        return x_prev, pred_x0

    @staticmethod
    def _log(
        intermediates: dict,
        index: int,
        n_steps: int,
        options: RunOptions,
        x: torch.Tensor,
        pred_x0: torch.Tensor,
    ) -> None:
        if index % options.log_every_t == 0 or index == n_steps - 1:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)

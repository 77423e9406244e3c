"""The k-diffusion samplers as samplers of this project: the same `sample` / `make_schedule` /
`stochastic_encode` / `decode` entry points as DDIMSampler, run as AUTOMATIC1111 runs them.

txt2img: x = x_T * sigmas[0], then the algorithm over the S-step sigmas of the scheduler.
img2img (AUTOMATIC1111's rule): for strength s and S steps, t_enc = int(min(s, 0.999) * S) and the run is the
last t_enc + 1 steps of the S-step schedule, `sigmas[S - t_enc - 1:]`, from x0 + noise * sigma_start
(s = 0.5, S = 20: sigmas[9:], 11 steps; s = 1: all S): `n = img2img_steps(s, S)`; `make_schedule(S)`; `z = stochastic_encode(x0, n)`; `decode(z, c, n, ...)`.
Inpainting an ordinary checkpoint (mask 1 where x0 is kept): every denoised estimate is x0 under the mask,
and so is the final sample. Noise: image i's ancestral noise is the next draw from `generator[i]`; the SDE
samplers use one Brownian tree per image seeded with `generator[i].initial_seed()`.
"""

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from ldm.models.diffusion.k_diffusion import algorithms
from ldm.models.diffusion.k_diffusion.denoiser import Denoiser
from ldm.models.diffusion.k_diffusion.noise import BrownianNoise, GeneratorNoise, generator_seeds
from ldm.models.diffusion.k_diffusion.schedules import SCHEDULES, get_sigmas, model_sigmas
from ldm.models.diffusion.sampling import (
    Cond,
    EpsFn,
    Generators,
    Sampler,
    StepCounter,
    check_conditioning,
    guided_eps_fn,
    randn,
)


def img2img_steps(strength: float, steps: int) -> int:
    """How many of the last steps of an S-step schedule AUTOMATIC1111's img2img runs at `strength`:
    int(min(strength, 0.999) * S) + 1 (1..S)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(min(strength, 0.999) * steps) + 1


class KDiffusionSampler(Sampler):
    """Base of the k-diffusion samplers: the schedule and the run around one algorithm function.

    Options (constructor defaults, overridable per `sample`/`make_schedule`/`decode` call):
    `scheduler` (a name of schedules.SCHEDULES; None: the sampler's own default, AUTOMATIC1111's
    "Automatic"), `eta` (ancestral/SDE noise amount; None: 1.0), `s_noise` (scale of the drawn noise),
    `quantize_t` (feed the model the nearest integer timestep, as ComfyUI does, instead of the fractional one).
    """

    name = "k-diffusion"
    supports_mask = True
    integer_timesteps = False
    default_scheduler = "normal"
    # compute S + 1 steps' sigmas and drop the next-to-last (AUTOMATIC1111's DPM2, DPM2 a, DPM++ 3M SDE)
    discard_next_to_last_sigma = False
    brownian = False  # noise from Brownian trees (the SDE samplers)
    # img2img: how many of the last steps to run at a strength (A1111's rule; DDIM's is int(strength * S))
    img2img_steps = staticmethod(img2img_steps)

    def __init__(
        self,
        model: Any,
        scheduler: str | None = None,
        eta: float | None = None,
        s_noise: float = 1.0,
        quantize_t: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model)
        self.model_sigmas = model_sigmas(model.alphas_cumprod)
        self.scheduler, self.eta, self.s_noise, self.quantize_t = scheduler, eta, s_noise, quantize_t

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
        scheduler: str | None = None,
    ) -> None:
        """The sigmas [~S + 1] of an S-step run (`self.sigmas`, descending, ending in 0)."""
        scheduler = scheduler or self.scheduler or self.default_scheduler
        if scheduler not in SCHEDULES:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULES)}")
        if ddim_num_steps < 1:
            raise ValueError(f"number of sampling steps must be at least 1, got {ddim_num_steps}")
        extra = 1 if self.discard_next_to_last_sigma else 0
        sigmas = get_sigmas(scheduler, ddim_num_steps + extra, self.model_sigmas)
        if self.discard_next_to_last_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        self.sigmas = sigmas
        self.requested_steps = ddim_num_steps
        self.scheduler_used = scheduler
        if verbose:
            print(f"{self.name} with the {scheduler} schedule: sigmas {sigmas.numpy().round(4)}")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Cond = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        generator: Generators = None,
        scheduler: str | None = None,
        s_noise: float | None = None,
        quantize_t: bool | None = None,
        normals_sequence: Any = None,
        quantize_x0: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """S steps from x_T (or noise from `generator`) [batch_size, *shape] to latents; returns (samples,
        {"x_inter": [...], "pred_x0": [...]}), logged every `log_every_t` steps. eta None means 1.0;
        the original API's `normals_sequence`, `quantize_x0`, `temperature` and `noise_dropout` are accepted
        and ignored; an unknown keyword is a TypeError."""
        size = (batch_size, *shape)
        check_conditioning(conditioning, batch_size)
        if unconditional_conditioning is not None and unconditional_guidance_scale != 1.0:
            check_conditioning(unconditional_conditioning, batch_size, "unconditional_conditioning")
        if mask is not None and x0 is None:
            raise ValueError("a mask needs x0, the latents to keep where the mask is 1")
        if x_T is not None and tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the batch has shape {size}")
        self.make_schedule(S, verbose=verbose, scheduler=scheduler)
        x = x_T if x_T is not None else randn(size, self.device, generator)
        counter = StepCounter(callback)  # the step a changing conditioning (prompt editing) is at
        eps_fn = guided_eps_fn(
            self.model,
            conditioning,
            unconditional_conditioning,
            unconditional_guidance_scale,
            score_corrector,
            corrector_kwargs,
            counter,
        )
        full_range = (self.model_sigmas[0], self.model_sigmas[-1])  # DPM fast/adaptive: the model's range
        return self._run(
            x * self.sigmas[0].to(x.device),
            eps_fn,
            self.sigmas,
            full_range,
            generator,
            dict(eta=eta, s_noise=s_noise, quantize_t=quantize_t),
            mask,
            x0,
            counter,
            img_callback,
            log_every_t,
            verbose,
        )

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | int,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """x0 [B, C, H, W] + noise * sigma_start, where sigma_start starts the last t steps of the schedule
        (t an int or a [B] tensor of equal entries: the `t_start` of the decode that follows). Call
        make_schedule first."""
        if use_original_steps:
            raise ValueError(f"{self.name} has no use_original_steps")
        if noise is None:
            noise = randn(tuple(x0.shape), x0.device, generator)
        return x0 + noise * self.sigmas[self._start_index(t)].to(x0.device)

    def _start_index(self, t: torch.Tensor | int) -> int:
        """Index into `sigmas` where a run of the last t steps starts: S - t, S the requested steps (as
        AUTOMATIC1111 indexes; ddim_uniform can hold more than S + 1 sigmas, and then runs more steps)."""
        t = torch.as_tensor(t)
        if t.numel() > 1 and not torch.all(t == t.flatten()[0]):
            raise ValueError("every image of a batch must start at the same step")
        t_start = int(t.flatten()[0])
        if not 1 <= t_start <= self.requested_steps:
            raise ValueError(f"t_start must be in 1..{self.requested_steps} for this schedule, got {t_start}")
        return self.requested_steps - t_start

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
        eta: float | None = None,
        s_noise: float | None = None,
        quantize_t: bool | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the last `t_start` steps of the S-step schedule, `sigmas[S - t_start:]`, on x_latent (the output
        of `stochastic_encode`); with mask and x0 the masked region stays x0 (0 steps return x_latent)."""
        if use_original_steps:
            raise ValueError(f"{self.name} has no use_original_steps")
        if t_start == 0:
            return x_latent
        sigmas = self.sigmas[self._start_index(t_start) :]
        check_conditioning(cond, x_latent.shape[0])
        counter = StepCounter(callback)
        eps_fn = guided_eps_fn(
            self.model, cond, unconditional_conditioning, unconditional_guidance_scale, counter=counter
        )
        # DPM fast/adaptive solve from the first sigma to the last positive one, as AUTOMATIC1111 passes them
        sigma_range = (sigmas[-2], sigmas[0])
        options = dict(eta=eta, s_noise=s_noise, quantize_t=quantize_t)
        return self._run(
            x_latent, eps_fn, sigmas, sigma_range, generator, options, mask, x0, counter, None, 100, verbose
        )[0]

    def _run(
        self,
        x: torch.Tensor,
        eps_fn: EpsFn,
        sigmas: torch.Tensor,
        sigma_range: tuple[torch.Tensor, torch.Tensor],
        generator: Generators,
        options: dict,
        mask: torch.Tensor | None,
        x0: torch.Tensor | None,
        callback: Callable[[int], None] | None,
        img_callback: Callable[[torch.Tensor, int], None] | None,
        log_every_t: int,
        verbose: bool,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The algorithm over `sigmas` from x (already at sigmas[0]); returns (x, intermediates)."""
        eta = self._pick(options["eta"], self.eta, 1.0)
        s_noise = self._pick(options["s_noise"], self.s_noise, 1.0)
        quantize = self._pick(options["quantize_t"], self.quantize_t, False)
        denoiser = Denoiser(eps_fn, self.model_sigmas, quantize, mask, x0)
        if self.brownian:
            positive = self.sigmas[self.sigmas > 0]  # the whole schedule's range, for img2img too
            seeds = generator_seeds(generator, x.shape[0])
            noise = BrownianNoise(x, positive.min(), positive.max(), seeds)
        else:
            noise = GeneratorNoise(tuple(x.shape), x.device, generator)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        n_steps = len(sigmas) - 1
        progress = tqdm(total=n_steps, desc=f"{self.name} Sampler", disable=not verbose)

        def on_step(i: int, x_i: torch.Tensor, denoised: torch.Tensor) -> None:
            progress.update(1)
            if callback:
                callback(i)
            if img_callback:
                img_callback(denoised, i)
            if i % log_every_t == 0 or i == n_steps - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(denoised)

        x = self._algorithm(denoiser, x, sigmas, sigma_range, noise, eta, s_noise, on_step)
        progress.close()
        if mask is not None:
            x = x0 * mask + (1 - mask) * x
        return x, intermediates

    @staticmethod
    def _pick(value: Any, default: Any, fallback: Any) -> Any:
        return value if value is not None else default if default is not None else fallback

    def _algorithm(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        sigma_range: tuple[torch.Tensor, torch.Tensor],
        noise: Callable,
        eta: float,
        s_noise: float,
        callback: Callable,
    ) -> torch.Tensor:
        """Call this sampler's algorithm function."""
        raise NotImplementedError


class EulerSampler(KDiffusionSampler):
    name = "Euler"

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.euler(denoiser, x, sigmas, callback=callback)


class EulerAncestralSampler(KDiffusionSampler):
    name = "Euler a"
    uses_eta = stochastic = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.euler_ancestral(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class HeunSampler(KDiffusionSampler):
    name = "Heun"

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.heun(denoiser, x, sigmas, callback=callback)


class DPM2Sampler(KDiffusionSampler):
    name = "DPM2"
    default_scheduler = "karras"
    discard_next_to_last_sigma = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpm2(denoiser, x, sigmas, callback=callback)


class DPM2AncestralSampler(KDiffusionSampler):
    name = "DPM2 a"
    default_scheduler = "karras"
    discard_next_to_last_sigma = True
    uses_eta = stochastic = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpm2_ancestral(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class LMSSampler(KDiffusionSampler):
    name = "LMS"

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.lms(denoiser, x, sigmas, callback=callback)


class DPMFastSampler(KDiffusionSampler):
    """DPM-Solver-Fast: S model calls from the model's sigma_max to its sigma_min (the schedule only scales
    x_T); ends at sigma_min, as in AUTOMATIC1111."""

    name = "DPM fast"
    uses_eta = stochastic = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        sigma_min, sigma_max = sigma_range
        n = len(sigmas) - 1
        return algorithms.dpm_fast(
            denoiser, x, sigma_min, sigma_max, n, noise, eta, s_noise, callback=callback
        )


class DPMAdaptiveSampler(KDiffusionSampler):
    """DPM-Solver-23 with adaptive steps from sigma_max to sigma_min: the number of steps S only picks the
    starting sigma of img2img; the model calls are what the error control needs."""

    name = "DPM adaptive"
    uses_eta = stochastic = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        sigma_min, sigma_max = sigma_range
        return algorithms.dpm_adaptive(
            denoiser, x, sigma_min, sigma_max, noise, eta=eta, s_noise=s_noise, callback=callback
        )


class DPMPP2SAncestralSampler(KDiffusionSampler):
    name = "DPM++ 2S a"
    default_scheduler = "karras"
    uses_eta = stochastic = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_2s_ancestral(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class DPMPP2MSampler(KDiffusionSampler):
    name = "DPM++ 2M"
    default_scheduler = "karras"

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_2m(denoiser, x, sigmas, callback=callback)


class DPMPPSDESampler(KDiffusionSampler):
    name = "DPM++ SDE"
    default_scheduler = "karras"
    uses_eta = stochastic = brownian = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_sde(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class DPMPP2MSDESampler(KDiffusionSampler):
    name = "DPM++ 2M SDE"
    default_scheduler = "exponential"
    uses_eta = stochastic = brownian = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_2m_sde(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class DPMPP2MSDEHeunSampler(KDiffusionSampler):
    """DPM++ 2M SDE with the Heun-type second-order correction instead of the midpoint one."""

    name = "DPM++ 2M SDE Heun"
    default_scheduler = "exponential"
    uses_eta = stochastic = brownian = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_2m_sde(denoiser, x, sigmas, noise, eta, s_noise, "heun", callback=callback)


class DPMPP3MSDESampler(KDiffusionSampler):
    name = "DPM++ 3M SDE"
    default_scheduler = "exponential"
    discard_next_to_last_sigma = True
    uses_eta = stochastic = brownian = True

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.dpmpp_3m_sde(denoiser, x, sigmas, noise, eta, s_noise, callback=callback)


class UniPCSampler(KDiffusionSampler):
    """UniPC-bh2, order 2 (diffusers' defaults), over the scheduler's sigmas."""

    name = "UniPC"

    def _algorithm(self, denoiser, x, sigmas, sigma_range, noise, eta, s_noise, callback):
        return algorithms.unipc(denoiser, x, sigmas, callback=callback)

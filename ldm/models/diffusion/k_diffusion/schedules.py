"""Noise levels (sigmas) of a k-diffusion run, from the model's own discrete schedule.

A DDPM timestep t has sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t): x_t / sqrt(alpha-bar_t) = x0 + sigma_t *
noise. For SD v1 (scaled-linear betas 0.00085..0.012, 1000 steps) sigma runs from 0.0292 (t = 0) to 14.61
(t = 999). Every scheduler returns the sigmas of an S-step run, descending, float32 on the CPU, ending in 0:
S + 1 values, except `ddim_uniform`, which keeps every DDIM timestep 1, 1 + T//S, ... below T as ComfyUI
and AUTOMATIC1111 do, and so runs more steps when S does not divide T (8 for S = 7; the project's DDIM
sampler keeps the lowest S of them).
The names are ComfyUI's; each function does what ComfyUI's and AUTOMATIC1111's scheduler of that name does.
"""

import math
from collections.abc import Callable

import torch


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma of each DDPM timestep [T], ascending, float32 on the CPU (computed as k-diffusion does, in fp32)."""
    alphas_cumprod = alphas_cumprod.detach().float().cpu()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """The (fractional) DDPM timestep of noise level `sigma` (any shape), interpolated linearly in log-sigma
    between the neighbouring steps of the model's `sigmas` [T] and clamped to [0, T-1]; with `quantize` the
    nearest step in log-sigma (a long tensor)."""
    log_sigmas = sigmas.double().log()  # float64: t(sigma(t)) == t to ~1e-9 instead of fp32's ~1e-4
    log_sigma = sigma.double().log()
    if quantize:
        return (log_sigma[..., None] - log_sigmas).abs().argmin(dim=-1)
    low = (torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1).clamp(0, len(sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).float()


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps t, interpolated linearly in log-sigma between the model's `sigmas`."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = sigmas.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def normal(steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 down to 0 (k-diffusion's `get_sigmas`, AUTOMATIC1111's "Uniform" and
    the "Automatic" of Euler, Euler a, Heun, LMS)."""
    return _append_zero(t_to_sigma(torch.linspace(len(sigmas) - 1, 0, steps), sigmas))


def sgm_uniform(steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """S + 1 timesteps evenly spaced from T-1 down to 0 with the last dropped (as SGM/SDXL space them)."""
    return _append_zero(t_to_sigma(torch.linspace(len(sigmas) - 1, 0, steps + 1)[:-1], sigmas))


def karras(steps: int, sigmas: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigma_max^(1/rho) to sigma_min^(1/rho) evenly, raised to rho."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigmas[0].item() ** (1 / rho), sigmas[-1].item() ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Evenly spaced in log-sigma from sigma_max down to sigma_min."""
    return _append_zero(torch.linspace(math.log(sigmas[-1].item()), math.log(sigmas[0].item()), steps).exp())


def simple(steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Every (T/S)-th model sigma from the top, rounding the stride down (ComfyUI's "simple")."""
    stride = len(sigmas) / steps
    return _append_zero(torch.stack([sigmas[-(1 + int(i * stride))] for i in range(steps)]))


def ddim_uniform(steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The sigmas of DDIM's "uniform" timesteps 1, 1 + T//S, 1 + 2*(T//S), ... below T, descending."""
    stride = max(len(sigmas) // steps, 1)
    return _append_zero(sigmas[1::stride].flip(0))


SCHEDULES: dict[str, Callable[[int, torch.Tensor], torch.Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
}


def get_sigmas(scheduler: str, steps: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The sigmas [~S + 1] of an S-step run under `scheduler`, from the model's sigmas [T]."""
    if steps < 1:
        raise ValueError(f"number of sampling steps must be at least 1, got {steps}")
    if scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[scheduler](steps, sigmas)

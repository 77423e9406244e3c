"""Diffusion math shared by the model and every sampler, plus the UNet's small building blocks."""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas [n_timestep] (float64) of the named schedule, as the original computes them.

    Computed on the CPU whatever the default device, so a model built on the meta device gets real values.
    """
    if schedule == "linear":
        betas = (
            torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu")
            ** 2
        )
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown: use linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """The DDPM timesteps [S] a DDIM run visits, ascending.

    "uniform" is the original's `range(0, T, T // S) + 1` ([1, 101, ..., 901] for S=10), cut to S entries
    so that S not dividing T cannot run past the schedule, and without the + 1 for S = T (every timestep,
    where the original indexed past the schedule's end); "quad" spaces them quadratically.
    """
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(
            f"number of sampling steps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}"
        )
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.arange(num_ddim_timesteps) * stride
    elif ddim_discr_method == "quad":
        ddim_timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(
            int
        )
    else:
        raise ValueError(f"DDIM discretization '{ddim_discr_method}' unknown: use uniform or quad")
    steps_out = ddim_timesteps + 1 if ddim_timesteps[-1] + 1 < num_ddpm_timesteps else ddim_timesteps
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float, verbose: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, alphas, alphas_prev), each [S], for DDIM with stochasticity `eta`.

    The first step's previous alpha is alphas_cumprod[0], not 1, as in the original.
    """
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(
            f"For the chosen value of eta, which is {eta}, this results in sigma_t schedule for ddim sampler {sigmas}"
        )
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather `a[t]` for a batch of timesteps t [B] and shape it [B, 1, ..., 1] to broadcast over x."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape: tuple, device: torch.device, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of `shape`; with `repeat` one draw shared across the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (fp32) of timesteps [B] (int or float, fractional allowed).

    The first half is cos, the second sin, of t * max_period^(-i / half); an odd dim gets a zero column.
    Computed in fp32 whatever the autocast dtype: fp16 cannot resolve t * freq for t near 1000.
    `repeat_only` just repeats t along the feature dimension.
    """
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func: Callable, inputs: Sequence, params: Iterable[torch.Tensor], flag: bool) -> Any:
    """`func(*inputs)`, recomputed in the backward pass instead of storing activations when `flag` is set.

    Recomputation only happens while gradients are being recorded, so inference pays nothing.
    `params` is kept for the original's signature; non-reentrant checkpointing finds them itself.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale a module's parameters in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input's dtype (fp16/bf16 statistics overflow). torch's CPU
    kernel does that itself for bf16 activations with fp32 parameters, without the two fp32 copies of the map
    (4-15x faster on the VAE decoder's large maps; the same numbers up to the order of its sums)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard norm layer: 32-group GroupNorm in fp32."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """A linear layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")

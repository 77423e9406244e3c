"""The denoiser D(x, sigma) the k-diffusion algorithms integrate: a discrete-time eps model seen as a
continuous-sigma one (k-diffusion's CompVisDenoiser, as AUTOMATIC1111 runs it)."""

import torch

from ldm.models.diffusion.k_diffusion.schedules import sigma_to_t
from ldm.models.diffusion.sampling import EpsFn


class Denoiser:
    """denoised x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)), with classifier-free guidance inside
    `eps_fn` (one batched model call per evaluation).

    x is in k-diffusion's scale (x0 + sigma * noise, [B, C, H, W]); the model sees the DDPM-scaled
    x * c_in, c_in = 1 / sqrt(sigma^2 + 1), at timestep t(sigma): the fractional timestep interpolated in
    log-sigma between the model's discrete steps, or with `quantize` the nearest step. With `mask` and `x0`
    (inpainting an ordinary checkpoint) the denoised output is x0 where mask is 1, as AUTOMATIC1111's
    CFGDenoiser blends it after guidance.
    """

    def __init__(
        self,
        eps_fn: EpsFn,
        model_sigmas: torch.Tensor,
        quantize: bool = False,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
    ) -> None:
        self.eps_fn = eps_fn
        self.sigmas = model_sigmas
        self.quantize = quantize
        self.mask = mask
        self.x0 = x0
        self.calls = 0  # model evaluations so far

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] at noise level sigma (0-dim) -> the model's estimate of x0 [B, C, H, W]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).cpu()
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = sigma_to_t(sigma, self.sigmas, self.quantize).to(x.device)
        eps = self.eps_fn(x * c_in.to(x.device), t, (c_in**2).to(x.device))
        self.calls += 1
        denoised = x - sigma.to(x.device) * eps
        if self.mask is not None:
            denoised = self.x0 * self.mask + (1 - self.mask) * denoised
        return denoised

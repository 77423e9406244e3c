"""Latent-space steps of generation: the img2img and inpainting latents (seeded noise: ldm.noise)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ldm.errors import UserError


def encode_image(model, posterior, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Scaled latents [len(generators), C, h, w] (fp32) of one image: entry i is a draw from the first stage's
    `posterior` (of a [1, 3, H, W] image) made with generators[i]."""
    return torch.cat([model.get_first_stage_encoding(posterior, generator=g).float() for g in generators])


def strength_steps(strength: float, steps: int) -> int:
    """t_enc, the number of the schedule's last steps that img2img runs: int(strength * steps), as the original."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(strength * steps)


def noised_latents(sampler, z0: torch.Tensor, noise: torch.Tensor, t_enc: int) -> torch.Tensor:
    """Where `sampler.decode(x, c, t_enc)` starts img2img: z0 [B, C, h, w] noised with `noise` to schedule step
    t_enc (`sampler.stochastic_encode`, as the original); z0 itself for t_enc = 0, and the pure noise for
    t_enc = all steps, so strength 1 is txt2img from the same noise. Call `sampler.make_schedule` first."""
    if t_enc == 0:
        return z0
    if t_enc == sampler.num_steps:
        return noise
    t = torch.full((z0.shape[0],), t_enc, dtype=torch.long, device=z0.device)
    return sampler.stochastic_encode(z0, t, noise=noise)


def is_inpainting_model(model) -> bool:
    """Whether the UNet takes the inpainting inputs [z, mask, masked-image latent] (hybrid conditioning,
    2C + 1 input channels, as the SD inpainting checkpoints); False for an ordinary C-channel model."""
    unet = model.model.diffusion_model
    if model.model.conditioning_key == "hybrid" and unet.in_channels == 2 * model.channels + 1:
        return True
    if unet.in_channels == model.channels:
        return False
    raise UserError(
        f"this model's UNet takes {unet.in_channels} input channels with conditioning '{model.model.conditioning_key}': "
        f"inpainting needs an ordinary model ({model.channels} channels) or an SD inpainting model (hybrid, "
        f"{2 * model.channels + 1} channels)"
    )


def latent_keep_mask(repaint: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """The samplers' `mask` [1, 1, h, w] (1 = keep x0) from the pixel mask `repaint` [1, 1, H, W] (1 = repaint):
    a latent cell is repainted when any of its pixels is."""
    return 1.0 - F.adaptive_max_pool2d(repaint, tuple(latent_size))


def masked_image(image: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """What the inpainting UNet sees of the image: image [1, 3, H, W] in [-1, 1] with the repaint region
    (repaint [1, 1, H, W] >= 0.5) set to 0, as the SD inpainting models were trained."""
    return image * (repaint < 0.5)


def inpainting_concat(
    model, masked_posterior, repaint: torch.Tensor, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """The inpainting UNet's extra input `c_concat` [len(generators), 1 + C, h, w]: the repaint mask
    [1, 1, H, W] on the latent grid (nearest, as in training) and the masked image's latent, drawn from its
    first-stage posterior `masked_posterior` with each generator."""
    masked_latent = encode_image(model, masked_posterior, generators)
    mask = F.interpolate(repaint, size=masked_latent.shape[-2:]).expand(len(generators), -1, -1, -1)
    return torch.cat([mask.to(masked_latent.dtype), masked_latent], dim=1)

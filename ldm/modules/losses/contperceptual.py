"""Training loss of the KL autoencoder: L1 + LPIPS reconstruction as a Laplace-like NLL with a learned
log-variance, a KL term on the posterior, and a PatchGAN hinge loss switched on at `disc_start`."""

from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm.modules.losses.lpips import LPIPS
from ldm.modules.losses.vqperceptual import (
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)

if TYPE_CHECKING:
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class LPIPSWithDiscriminator(nn.Module):
    """Autoencoder loss with two optimizer passes: `optimizer_idx` 0 (encoder/decoder) and 1 (discriminator).

    Generator pass: `nll = sum(|x - x_rec| + perceptual_weight * lpips(x, x_rec)) / exp(logvar) + logvar`
    (summed over pixels, averaged over the batch), plus `kl_weight * mean(posterior.kl())`, plus
    `d_weight * disc_factor * -mean(D(x_rec))`, where `d_weight` balances the GAN gradient against the NLL
    gradient at the decoder's last layer and `disc_factor` is 0 before step `disc_start`.
    With `perceptual_weight: 0.0` the LPIPS network (and its pretrained weights) is not needed at all.
    `pixelloss_weight` is stored but, as in the original, not applied.
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
    ):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}.")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            self.perceptual_loss = LPIPS().eval()
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """`disc_weight * |grad nll| / (|grad g| + 1e-4)` at `last_layer` (the decoder's output conv weight),
        clamped to [0, 1e4] and detached."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            return self.discriminator(x.contiguous())
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: "DiagonalGaussianDistribution",
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs, reconstructions: [B, C, H, W] in [-1, 1]. Returns (loss, logs keyed `{split}/...`)."""
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 1:
            logits_real = self._discriminate(inputs.detach(), cond)
            logits_fake = self._discriminate(reconstructions.detach(), cond)
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            log = {
                f"{split}/disc_loss": d_loss.clone().detach().mean(),
                f"{split}/logits_real": logits_real.detach().mean(),
                f"{split}/logits_fake": logits_fake.detach().mean(),
            }
            return d_loss, log
        if optimizer_idx != 0:
            raise ValueError(
                f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}."
            )

        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        if (cond is not None) != self.disc_conditional:
            raise ValueError(
                "`cond` must be given exactly when the discriminator is conditional (disc_conditional: true)."
            )
        logits_fake = self._discriminate(reconstructions, cond)
        g_loss = -torch.mean(logits_fake)
        # Outside training (no graph to differentiate, e.g. validation under no_grad) the adaptive weight
        # cannot be computed; the GAN term then does not count, as in the original.
        if self.disc_factor > 0.0 and nll_loss.requires_grad and g_loss.requires_grad:
            if last_layer is None:
                raise ValueError("The adaptive GAN weight needs `last_layer` (the decoder's last weight).")
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
        else:
            d_weight = torch.zeros((), device=g_loss.device)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log

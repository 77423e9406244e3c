"""The GAN half of the autoencoder losses: a PatchGAN discriminator and its losses.

They live at the import path the original took them from (`taming.modules.losses.vqperceptual` re-exported
by `ldm.modules.losses.vqperceptual`); state_dict keys match the original (`discriminator.main.<i>.*`).
"""

import torch
import torch.nn.functional as F
from torch import nn


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before `threshold` steps, `weight` from then on (switches the GAN loss on at `disc_start`)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean(relu(1 - real)) and mean(relu(1 + fake)), averaged."""
    loss_real = torch.mean(F.relu(1.0 - logits_real))
    loss_fake = torch.mean(F.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator: mean(softplus(-real)) and mean(softplus(fake)), averaged."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def weights_init(m: nn.Module) -> None:
    """DCGAN initialisation, applied with `module.apply`: conv weights ~ N(0, 0.02), batch-norm scales
    ~ N(1, 0.02) with zero shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


class ActNorm(nn.Module):
    """Per-channel affine `scale * (x + loc)`, initialised from the first training batch so that its
    output has zero mean and unit variance per channel."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set loc and scale from a batch x [B, C, H, W]."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): images [B, input_nc, H, W] -> logits [B, 1, h, w], one per patch.

    `n_layers` stride-2 convs (4x4) widen ndf -> up to 8*ndf channels, then a stride-1 conv and a 1-channel
    output conv; batch norm (or ActNorm) and LeakyReLU(0.2) between them.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # batch norm has its own shift
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        # n_layers - 1 stride-2 blocks, then one stride-1 block at width min(2**n_layers, 8) * ndf.
        for n in (*range(1, n_layers), n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            sequence += [
                nn.Conv2d(
                    ndf * nf_mult_prev,
                    ndf * nf_mult,
                    kernel_size=kw,
                    stride=stride,
                    padding=padw,
                    bias=use_bias,
                ),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*sequence)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)

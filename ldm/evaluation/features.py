"""Image feature extractors for FID: uint8 images [B, 3, H, W] -> float features [B, D].

An extractor is an nn.Module with a `name` (which identifies its weights, for caching statistics) and
`num_features` (D, as torchmetrics' FrechetInceptionDistance reads it for a custom feature network).
"""

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError

INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"


def inception_weights_path() -> Path:
    """Where torchvision keeps the Inception-v3 weights it downloads: <torch hub dir>/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name


class InceptionV3Features(nn.Module):
    """The 2048 pool features of torchvision's Inception-v3 (ImageNet weights, the network FID is defined on),
    on images resized to 299x299 (bilinear, antialiased when shrinking) and scaled to [-1, 1].

    Note: the published FIDs use the TensorFlow graph's weights (pytorch-fid / torch-fidelity ports); torchvision's
    weights give numbers of the same kind that are comparable with each other, not with published tables."""

    num_features = 2048

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights) if weights else inception_weights_path()
        if not path.is_file():
            raise UserError(
                f"Inception-v3 weights not found at {path}: download {INCEPTION_URL} there, or pass --inception PATH"
            )
        # transform_input=False: we scale to [-1, 1] ourselves, which is what those weights expect
        self.net = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.AuxLogits = None
        self.net.aux_logits = False
        self.net.fc = nn.Identity()
        self.name = f"inception_v3-{path.stem}"
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(next(self.parameters()).device, torch.float32) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.net(2.0 * x - 1.0)


class RandomConvFeatures(nn.Module):
    """A small convolutional network with fixed random weights (from `seed`): features of the same kind as
    Inception's for tests and for offline runs, `num_features` of them, from images resized to 64x64.
    Its distances rank image sets, but they are not FIDs in the published sense."""

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        widths = (3, 32, 64, num_features)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(widths)
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        self.num_features = num_features
        self.name = f"random_conv-{num_features}-seed{seed}"
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.convs[0].weight.device, torch.float32) / 127.5 - 1.0
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))

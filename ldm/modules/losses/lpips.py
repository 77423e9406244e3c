"""LPIPS perceptual distance (Zhang et al., 2018) on VGG16 features, as the original autoencoders train with.

It needs two sets of pretrained weights, which are looked for and never downloaded:
- torchvision's VGG16 ImageNet weights, in the torch hub cache where `torchvision.models.vgg16(weights=
  "IMAGENET1K_V1")` stores them (`<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`), or `vgg_path`;
- the LPIPS linear layers `lin0..lin4` (`vgg.pth`), shipped inside the `lpips` package
  (`lpips/weights/v0.1/vgg.pth`), or `lin_path`.
State_dict keys match the original (`net.slice1.0.weight`, ..., `lin0.model.1.weight`, ...).
"""

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

# torchvision's VGG16 `features`: conv widths, "M" = 2x2 max-pool. Layer indices match torchvision's.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Feature indices [start, end) ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
CHANNELS = [64, 128, 256, 512, 512]


def vgg16_weights_path() -> Path:
    """Where torchvision caches its VGG16 ImageNet weights."""
    from torchvision.models import VGG16_Weights

    filename = os.path.basename(urlparse(VGG16_Weights.IMAGENET1K_V1.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def lpips_lin_weights_path() -> Path | None:
    """The linear-layer weights shipped by the `lpips` package, or None if it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


def _missing_weights_error(vgg_path: Path, lin_path: Path | None) -> FileNotFoundError | None:
    missing = []
    if not vgg_path.is_file():
        missing.append(f"VGG16 ImageNet weights (expected at {vgg_path})")
    if lin_path is None:
        missing.append("LPIPS linear weights (the `lpips` package, which ships them, is not installed)")
    elif not lin_path.is_file():
        missing.append(f"LPIPS linear weights (expected at {lin_path})")
    if not missing:
        return None
    return FileNotFoundError(
        f"LPIPS perceptual loss needs pretrained weights that are not here: {'; '.join(missing)}. "
        "Set `perceptual_weight: 0.0` in the loss config to train without LPIPS."
    )


def vgg16_features() -> nn.Sequential:
    """Untrained VGG16 convolutional trunk [B, 3, H, W] -> [B, 512, H/32, W/32], laid out like torchvision's."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class ScalingLayer(nn.Module):
    """Maps images in [-1, 1] to the input statistics LPIPS was trained with."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Learned per-channel weighting of squared feature differences: a 1x1 conv to one channel."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)


class vgg16(nn.Module):
    """VGG16 trunk (lower-case name as in the original) returning the five relu feature maps LPIPS compares."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        for k, (start, end) in enumerate(VGG16_SLICES, start=1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), features[i])
            setattr(self, f"slice{k}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, len(VGG16_SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise feature maps [B, C, H, W] along channels."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]: (input, target) [B, 3, H, W] -> [B, 1, 1, 1].

    Raises FileNotFoundError (one line) when the pretrained weights are not on this machine.
    """

    def __init__(
        self,
        use_dropout: bool = True,
        vgg_path: str | os.PathLike | None = None,
        lin_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        vgg_file = Path(vgg_path) if vgg_path is not None else vgg16_weights_path()
        lin_file = Path(lin_path) if lin_path is not None else lpips_lin_weights_path()
        error = _missing_weights_error(vgg_file, lin_file)
        if error is not None:
            raise error

        self.scaling_layer = ScalingLayer()
        self.chns = CHANNELS
        features = vgg16_features()
        vgg_state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
        )
        self.net = vgg16(features)
        for k, chn in enumerate(self.chns):
            setattr(self, f"lin{k}", NetLinLayer(chn, use_dropout=use_dropout))
        self._load_lin(lin_file)
        for param in self.parameters():
            param.requires_grad = False

    def _load_lin(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = [f"lin{k}.model.1.weight" for k in range(len(self.chns))]
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"{path} is not an LPIPS VGG weight file: it lacks {', '.join(missing)}.")
        with torch.no_grad():
            for k, key in enumerate(keys):
                getattr(self, f"lin{k}").model[-1].weight.copy_(state[key])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outs0 = self.net(self.scaling_layer(input))
        outs1 = self.net(self.scaling_layer(target))
        val = 0
        for k, (f0, f1) in enumerate(zip(outs0, outs1, strict=True)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + getattr(self, f"lin{k}").model(diff).mean([2, 3], keepdim=True)
        return val

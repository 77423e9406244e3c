"""External autoencoders (`--vae`): a VAE file's weights replace the model's first stage, undoably.

Accepted files (read without running code): a whole SD checkpoint (`first_stage_model.*` keys), a bare
autoencoder checkpoint such as `vae-ft-mse-840000-ema-pruned` (`encoder.*`, `decoder.*`, `quant_conv.*`, with or
without its `loss.*` training weights and `model_ema` counters), or a diffusers `vae/` weights file.
"""

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.adapters.diffusers_layout import PREFIXES, KeyMap, Structure, from_diffusers_tensor
from ldm.adapters.tensor_files import TensorFile
from ldm.checkpoint import CheckpointError
from ldm.errors import UserError

VAE_DIR = Path("models") / "VAE"  # A1111's folder for VAE files
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
PREFIX = PREFIXES["vae"]
_TRAINING_ONLY = ("loss.", "model_ema.")  # the discriminator / LPIPS of VAE training, EMA counters


def find_vae(name: str | Path, vae_dir: str | Path = VAE_DIR) -> Path:
    """A VAE file by path, or by file name (with or without suffix) in `vae_dir`."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in [Path(vae_dir) / path, *(Path(vae_dir) / f"{path}{suffix}" for suffix in VAE_SUFFIXES)]:
        if candidate.is_file():
            return candidate
    raise UserError(f"VAE '{name}' not found (neither a file nor in {vae_dir}/): check the path")


def _first_stage_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Our `first_stage_model.*` key -> the file's key for each autoencoder tensor the file holds."""
    keys = list(tensors)
    if any(k.startswith(PREFIX) for k in keys):
        return {
            k: k for k in keys if k.startswith(PREFIX) and not k[len(PREFIX) :].startswith(_TRAINING_ONLY)
        }
    if any(".down_blocks." in k or ".mid_block." in k for k in keys):  # diffusers layout
        structure = Structure.from_diffusers([], keys)
        key_map = KeyMap(structure)
        mapped = {key_map.from_diffusers("vae", k): k for k in keys}
        return {ours: theirs for ours, theirs in mapped.items() if ours is not None}
    return {PREFIX + k: k for k in keys if not k.startswith(_TRAINING_ONLY)}


def read_vae(path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The autoencoder weights of the file at `path`, under our `first_stage_model.*` keys; they must cover
    exactly the first-stage tensors among `shapes` (our keys -> shapes), with the same shapes."""
    path = Path(path)
    try:
        tensors = TensorFile(path)
    except CheckpointError as error:
        raise UserError(f"VAE {error}") from None
    keys = _first_stage_keys(tensors)
    wanted = [k for k in shapes if k.startswith(PREFIX)]
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise UserError(
            f"{path} is not an autoencoder for this model: it lacks {len(missing)} of its {len(wanted)} "
            f"first-stage weights (e.g. {missing[0]})"
        )
    weights = {}
    for ours in wanted:
        theirs = keys[ours]
        value = from_diffusers_tensor(
            "vae", theirs, tensors[theirs]
        )  # 2-d attention weights of diffusers files
        if tuple(value.shape) != tuple(shapes[ours]):
            raise UserError(
                f"{path} does not fit this model: {theirs} has shape {tuple(value.shape)}, the model's {ours} "
                f"is {tuple(shapes[ours])}"
            )
        weights[ours] = value
    return weights


class AppliedVae:
    """An external VAE in place of the model's own first stage; `remove()` puts the original tensors back."""

    def __init__(self, model: nn.Module, path: Path, originals: dict[str, torch.Tensor]):
        self.model, self.path, self._originals = model, path, originals

    def remove(self) -> None:
        """Put the replaced tensors back (moved to where the model's weights are now). Idempotent."""
        tensors = _tensors(self.model)
        with torch.no_grad():
            for key, original in self._originals.items():
                tensors[key].data = original.to(device=tensors[key].device, dtype=tensors[key].dtype)
        self._originals = {}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def load_vae(model: nn.Module, path: str | Path) -> AppliedVae:
    """Replace the first-stage weights of `model` (a LatentDiffusion) by those of the VAE file at `path`, each cast
    to the dtype and device of the tensor it replaces; nothing else changes. Returns the handle that undoes it."""
    tensors = _tensors(model)
    weights = read_vae(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    originals = {}
    with torch.no_grad():
        for key, value in weights.items():
            original = tensors[key].data
            replacement = torch.empty_like(original)
            replacement.copy_(value)
            tensors[key].data = replacement
            originals[key] = original
    return AppliedVae(model, Path(path), originals)

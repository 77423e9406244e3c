"""Checkpoint conversion: single file <-> diffusers folder, `.ckpt` -> `.safetensors`, fp16, EMA extraction,
pruning of training state, LoRAs baked in. Tensors are produced one at a time on their way to the output.

EMA extraction does what the community "prune" scripts and A1111 do: each UNet weight `model.X.Y` takes the
value of its EMA copy `model_ema.XY` (LitEma's names: the key after `model.` without dots). Pruning drops what
only training uses: `model_ema.*` and the autoencoder's loss networks (`first_stage_model.loss.*`); optimizer and
scheduler states of Lightning checkpoints are never read (they sit beside `state_dict`).
"""

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.adapters.diffusers_layout import is_diffusers_folder, read_diffusers_folder, write_diffusers_folder
from ldm.adapters.lora import lora_deltas
from ldm.adapters.tensor_files import TensorFile, TensorSpec, spec_of, write_safetensors
from ldm.checkpoint import CheckpointError, save_checkpoint
from ldm.errors import UserError

NETWORKS = (
    "model.",
    "first_stage_model.",
    "cond_stage_model.",
)  # cast by fp16; the noise schedule stays fp32
TRAINING_ONLY = ("model_ema.", "first_stage_model.loss.")
UNET = "model.diffusion_model."


def ema_key(key: str) -> str:
    """LitEma's name for the EMA copy of the UNet weight `key` (`model.a.b` -> `model_ema.ab`)."""
    return "model_ema." + key[len("model.") :].replace(".", "")


class Weights(Mapping):
    """A checkpoint as it will be written: key -> tensor, each computed when asked for (renamed from its source
    key, LoRA delta added in float32, cast to `dtype`); `specs` says every tensor's dtype and shape up front."""

    def __init__(
        self,
        source: Mapping[str, torch.Tensor],
        names: dict[str, str],
        dtype: torch.dtype | None = None,
        deltas: Mapping[str, torch.Tensor] | None = None,
    ):
        self.source, self.names, self.deltas = source, names, deltas or {}
        self.specs = {}
        for key, source_key in names.items():
            spec = spec_of(source, source_key)
            cast = dtype is not None and spec.dtype.is_floating_point and key.startswith(NETWORKS)
            self.specs[key] = TensorSpec(dtype if cast else spec.dtype, spec.shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.source[self.names[key]]
        if key in self.deltas:
            value = value.float() + self.deltas[key]
        return value.to(self.specs[key].dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def open_checkpoint(path: str | Path) -> tuple[Mapping[str, torch.Tensor], Any]:
    """A checkpoint file as a lazy mapping (None for its config), or a diffusers folder read into our layout
    (with the config built from the folder). Unreadable or unsafe files raise UserError."""
    path = Path(path)
    try:
        if is_diffusers_folder(path):
            return read_diffusers_folder(path)
        if path.is_dir():
            raise UserError(f"{path} is a folder without model_index.json: not a diffusers pipeline")
        return TensorFile(path), None
    except CheckpointError as error:
        raise UserError(str(error)) from None


def prepare(
    source: Mapping[str, torch.Tensor],
    ema: bool = False,
    prune: bool = True,
    dtype: torch.dtype | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> Weights:
    """`source` (our layout) as it should be written: EMA weights in place of the UNet's when `ema`, training
    state dropped when `prune`, network weights cast to `dtype`, `loras` ((path, weight) pairs) added in."""
    keys = list(source)
    if not any(k.startswith(UNET) for k in keys):
        raise UserError(
            f"not a Stable Diffusion checkpoint: no UNet weights ({UNET}*) among its {len(keys)} tensors"
        )
    names = {k: k for k in keys if not (prune and k.startswith(TRAINING_ONLY))}
    if ema:
        unet = [k for k in names if k.startswith(UNET)]
        found = {k: ema_key(k) for k in unet if ema_key(k) in source}
        if not found:
            raise UserError(
                "--ema: the checkpoint holds no EMA weights (model_ema.*); it is EMA-only already"
            )
        if len(found) < len(unet):
            missing = next(k for k in unet if k not in found)
            raise UserError(f"--ema: {len(unet) - len(found)} UNet weights have no EMA copy (e.g. {missing})")
        names.update(found)
    shapes = {k: spec_of(source, s).shape for k, s in names.items()}
    return Weights(source, names, dtype, lora_deltas(loras, shapes) if loras else {})


def check_matches_config(weights: Mapping[str, torch.Tensor], config: Any) -> None:
    """UserError unless the networks' tensors of `weights` have the keys and shapes of the model `config` builds."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(NETWORKS)}
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    got = {k: spec_of(weights, k).shape for k in weights if k.startswith(NETWORKS)}
    missing = [k for k in expected if k not in got]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    if missing or wrong:
        key = (missing or wrong)[0]
        detail = "missing" if missing else f"{got[key]} instead of {expected[key]}"
        raise UserError(
            f"the checkpoint does not match the config ({len(missing)} tensors missing, {len(wrong)} of other "
            f"shapes; e.g. {key}: {detail}): pass --config with the model's config"
        )


def output_format(path: Path) -> str:
    """`safetensors`, `ckpt` or `diffusers` (a folder), from the output path's suffix."""
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return "ckpt"
    return "diffusers"


def convert(
    source_path: str | Path,
    output: str | Path,
    config: Any = None,
    ema: bool = False,
    prune: bool = True,
    dtype: torch.dtype | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    overwrite: bool = False,
) -> str:
    """Convert the checkpoint (file or diffusers folder) at `source_path` into `output`, whose suffix picks the
    format (`.safetensors`, `.ckpt`, else a diffusers folder). `config` (our YAML config) describes the model for
    a diffusers output from a single file. Returns the format written; nothing is written on error."""
    source_path, output = Path(source_path), Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists: pass --overwrite to replace it, or choose another output")
    if output.resolve() == source_path.resolve():
        raise UserError("the output is the input: write to another path")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent} is not a folder: create it first")
    source, folder_config = open_checkpoint(source_path)
    weights = prepare(source, ema=ema, prune=prune, dtype=dtype, loras=loras)
    kind = output_format(output)
    if kind == "diffusers":
        config = folder_config or config
        if config is None:
            raise UserError("a diffusers folder needs the model's config: pass --config")
        check_matches_config(weights, config)
        write_diffusers_folder(output, weights, config, overwrite=overwrite)
    elif kind == "safetensors":
        write_safetensors(output, weights.specs, weights.__getitem__, {"format": "pt"})
    else:
        save_checkpoint(output, {k: weights[k] for k in weights})
    return kind

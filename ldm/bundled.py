"""Models that ship with the project, by name: `--ckpt shapes` stands for a config and checkpoint pair.

`shapes` is a small text-to-image LDM trained by the project on the synthetic images of ldm.data.shapes
("a red circle on a white background", 64x64): it runs anywhere, offline, in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scripts resolve bundled names before importing torch
    import torch

ROOT = Path(__file__).resolve().parent.parent
_NETWORKS = ("model.", "first_stage_model.", "cond_stage_model.")  # LatentDiffusion's three networks
# AutoencoderKL params of training runs only
_FIRST_STAGE_TRAINING_PARAMS = ("ckpt_path", "train_decoder_only")


@dataclass(frozen=True)
class BundledModel:
    """A bundled model: its files and the sampling settings it was evaluated with."""

    name: str
    config: Path  # model config (inference form: no training-only paths)
    ckpt: Path  # self-contained weights (UNet, autoencoder, text encoder)
    height: int  # image size in pixels
    width: int
    scale: float  # default classifier-free guidance scale
    steps: int  # default sampling steps (PLMS or DDIM)
    example_prompt: str


BUNDLED = {
    "shapes": BundledModel(
        name="shapes",
        config=ROOT / "models" / "ldm" / "shapes" / "config.yaml",
        ckpt=ROOT / "models" / "ldm" / "shapes" / "model.safetensors",
        height=64,
        width=64,
        scale=3.0,
        steps=50,
        example_prompt="a red circle on a white background",
    ),
}


def bundled_model(name: str) -> BundledModel | None:
    """The bundled model called `name` (case-insensitive), or None when there is none by that name."""
    return BUNDLED.get(name.strip().lower())


def resolve_model(ckpt: str, config: str | None = None) -> tuple[str, str]:
    """(config path, checkpoint path) for a `--ckpt` value: a bundled model's name, or a checkpoint path.

    A bundled name gives its own config unless `config` is given; an existing file always wins over a name,
    and for a path `config` is passed through. Raises ValueError when `ckpt` names a bundled model whose
    weights are missing (e.g. a checkout without them) or `config` is needed but None.
    """
    model = None if Path(ckpt).is_file() else bundled_model(ckpt)
    if model is None:
        if config is None:
            raise ValueError(f"checkpoint {ckpt} needs a config: pass --config with its model config")
        return config, ckpt
    if not model.ckpt.is_file():
        raise ValueError(
            f"the bundled model '{model.name}' has no weights at {model.ckpt}: restore them from the "
            "repository (git checkout -- models/) or pass --ckpt with another checkpoint"
        )
    return str(config or model.config), str(model.ckpt)


def inference_state_dict(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A training checkpoint's weights as an inference model's: the EMA weights in place of the UNet's
    (`model.*` <- `model_ema.*`, as `ema_scope` swaps them), without `model_ema.*`, the autoencoder's
    training loss (`first_stage_model.loss.*`) or the `scale_factor` buffer (it goes into the config);
    the networks' floating-point weights cast to `dtype` when given (the noise schedule stays float32)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("model_ema.", "first_stage_model.loss.")) or key == "scale_factor":
            continue
        if key.startswith("model."):
            value = state_dict.get("model_ema." + key[len("model.") :].replace(".", ""), value)
        if dtype is not None and value.is_floating_point() and key.startswith(_NETWORKS):
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def export_bundled(
    training_config: str | Path,
    training_ckpt: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str | None = "float16",
    first_stage_ckpt: str | Path | None = None,
) -> None:
    """Write `out_dir/config.yaml` and `out_dir/model.safetensors` from a LatentDiffusion training run:
    EMA weights, the measured `scale_factor` in the config, no EMA copies, no first-stage `ckpt_path`.

    `first_stage_ckpt`: an AutoencoderKL checkpoint whose weights replace the run's autoencoder, e.g. one
    whose decoder was fine-tuned afterwards with `train_decoder_only` (the same latent space). `dtype` may be
    named ("float16").
    """
    import torch
    from omegaconf import OmegaConf

    from ldm.checkpoint import read_state_dict, save_checkpoint

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = OmegaConf.load(training_config)
    state_dict, metadata = read_state_dict(training_ckpt)
    if first_stage_ckpt is not None:
        autoencoder, _ = read_state_dict(first_stage_ckpt)  # its `loss.*` go with inference_state_dict
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("first_stage_model.")}
        state_dict |= {"first_stage_model." + k: v for k, v in autoencoder.items()}
    params = config.model.params
    if "scale_factor" in state_dict:
        params.scale_factor = round(float(state_dict["scale_factor"]), 5)
    params.scale_by_std = False
    params.use_ema = False
    for key in _FIRST_STAGE_TRAINING_PARAMS:
        params.first_stage_config.params.pop(key, None)
    for key in ("ckpt_path", "scheduler_config", "ucg_training"):
        params.pop(key, None)
    config = OmegaConf.create({"model": config.model})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, out_dir / "config.yaml")
    save_checkpoint(
        out_dir / "model.safetensors",
        inference_state_dict(state_dict, dtype),
        global_step=metadata.get("global_step"),
    )


def export_first_stage(
    training_config: str | Path,
    training_ckpt: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `out_dir/config.yaml` and `out_dir/model.safetensors` from an AutoencoderKL training run: the
    autoencoder's weights without its training loss (`loss.*`), and a config whose loss is torch.nn.Identity."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import read_state_dict, save_checkpoint

    config = OmegaConf.load(training_config)
    state_dict, metadata = read_state_dict(training_ckpt)
    config.model.params.lossconfig = {"target": "torch.nn.Identity"}
    for key in _FIRST_STAGE_TRAINING_PARAMS:
        config.model.params.pop(key, None)
    weights = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in state_dict.items()
        if not k.startswith("loss.")
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"model": config.model}), out_dir / "config.yaml")
    save_checkpoint(out_dir / "model.safetensors", weights, global_step=metadata.get("global_step"))

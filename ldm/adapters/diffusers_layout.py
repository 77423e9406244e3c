"""This project's checkpoint layout (CompVis: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`) <-> a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), both ways, key by key.

The two layouts hold the same tensors under other names; the one change of shape is the autoencoder's
mid-block attention, whose q/k/v/out projections are 1x1 convs here ([C, C, 1, 1]) and linears in diffusers
([C, C]). Block indices depend on the network's structure (levels, residual blocks per level, which levels
have attention), which is read off the keys themselves, so one mapping serves SD v1 and the tiny test models.
"""

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.adapters.tensor_files import TensorFile, TensorSpec, spec_of, write_safetensors
from ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
DIFFUSERS_VERSION = "0.20.0"  # written into the configs: the oldest diffusers that reads what we write

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_VAE_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}  # diffusers < 0.14
_VAE_ATTENTION_CONV = re.compile(r"^(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_VAE_ATTENTION_LINEAR = re.compile(
    r"^(en|de)coder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)


def _indices(keys: Iterable[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m[1]) for k in keys if (m := regex.match(k))}


@dataclass(frozen=True)
class Structure:
    """What the block indices depend on: levels, residual blocks per level (UNet and autoencoder), and which
    UNet levels have cross-attention."""

    unet_levels: int
    unet_res_blocks: int
    unet_attention: tuple[bool, ...]
    vae_levels: int
    vae_res_blocks: int

    @classmethod
    def from_ours(cls, keys: Iterable[str]) -> "Structure":
        """Read off checkpoint keys (component prefixes included)."""
        unet = [k[len(PREFIXES["unet"]) :] for k in keys if k.startswith(PREFIXES["unet"])]
        vae = [k[len(PREFIXES["vae"]) :] for k in keys if k.startswith(PREFIXES["vae"])]
        blocks = _indices(unet, r"input_blocks\.(\d+)\.")
        downsamplers = _indices(unet, r"input_blocks\.(\d+)\.0\.op\.")
        levels = len(downsamplers) + 1
        res_blocks = (len(blocks) - 1 - len(downsamplers)) // levels
        with_attention = _indices(unet, r"input_blocks\.(\d+)\.1\.")
        attention = tuple(1 + level * (res_blocks + 1) in with_attention for level in range(levels))
        vae_levels = len(_indices(vae, r"encoder\.down\.(\d+)\."))
        vae_res_blocks = len(_indices(vae, r"encoder\.down\.0\.block\.(\d+)\."))
        return cls(levels, res_blocks, attention, vae_levels, vae_res_blocks)

    @classmethod
    def from_diffusers(cls, unet_keys: Iterable[str], vae_keys: Iterable[str]) -> "Structure":
        unet_keys, vae_keys = list(unet_keys), list(vae_keys)
        levels = len(_indices(unet_keys, r"down_blocks\.(\d+)\."))
        with_attention = _indices(unet_keys, r"down_blocks\.(\d+)\.attentions\.")
        res_blocks = len(_indices(unet_keys, r"down_blocks\.0\.resnets\.(\d+)\."))
        attention = tuple(level in with_attention for level in range(levels))
        vae_levels = len(_indices(vae_keys, r"encoder\.down_blocks\.(\d+)\."))
        vae_res_blocks = len(_indices(vae_keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
        return cls(levels, res_blocks, attention, vae_levels, vae_res_blocks)


def _unet_modules(s: Structure) -> dict[str, str]:
    """Our UNet module names -> diffusers'; submodules not listed keep their names below the listed parent."""
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}  # fmt: skip

    def resnet(ours: str, theirs: str) -> None:
        names[ours] = theirs
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _UNET_RESNET.items()})

    block = 1
    for level in range(s.unet_levels):
        for j in range(s.unet_res_blocks):
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if s.unet_attention[level]:
                names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level < s.unet_levels - 1:
            names[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    names["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    block = 0
    for up in range(s.unet_levels):
        level = s.unet_levels - 1 - up
        for j in range(s.unet_res_blocks + 1):
            resnet(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}")
            if s.unet_attention[level]:
                names[f"output_blocks.{block}.1"] = f"up_blocks.{up}.attentions.{j}"
            if j == s.unet_res_blocks and level > 0:
                upsampler = 2 if s.unet_attention[level] else 1
                names[f"output_blocks.{block}.{upsampler}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            block += 1
    return names


def _vae_modules(s: Structure) -> dict[str, str]:
    """Our autoencoder module names -> diffusers' (the decoder's levels run in the opposite order there)."""
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out"})
        names[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        names[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        names[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
        names.update(
            {
                f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}"
                for a, b in _VAE_ATTENTION.items()
            }
        )

    def resnet(ours: str, theirs: str) -> None:
        names[ours] = theirs
        names[f"{ours}.nin_shortcut"] = f"{theirs}.conv_shortcut"

    last = s.vae_levels - 1
    for level in range(s.vae_levels):
        for j in range(s.vae_res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        if level < last:
            names[f"encoder.down.{level}.downsample.conv"] = (
                f"encoder.down_blocks.{level}.downsamplers.0.conv"
            )
        for j in range(s.vae_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{last - level}.resnets.{j}")
        if level > 0:
            names[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{last - level}.upsamplers.0.conv"
    return names


def _rename(key: str, modules: Mapping[str, str]) -> str | None:
    """`key` with its longest module prefix found in `modules` replaced; None when no prefix is known."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        theirs = modules.get(".".join(parts[:n]))
        if theirs is not None:
            return ".".join([theirs, *parts[n:]])
    return None


class KeyMap:
    """Our checkpoint keys <-> (component, diffusers key) for one network structure."""

    def __init__(self, structure: Structure):
        self.structure = structure
        self._to = {"unet": _unet_modules(structure), "vae": _vae_modules(structure)}
        self._from = {c: {b: a for a, b in names.items()} for c, names in self._to.items()}

    def to_diffusers(self, key: str) -> tuple[str, str] | None:
        """Our key -> (component, diffusers key); None for keys diffusers has no place for (the noise schedule,
        training state, the CLIP position ids)."""
        for component, prefix in PREFIXES.items():
            if not key.startswith(prefix):
                continue
            inner = key[len(prefix) :]
            if component == "text_encoder":
                if inner.endswith("embeddings.position_ids"):
                    return None
                return component, inner if inner.startswith("text_model.") else f"text_model.{inner}"
            renamed = _rename(inner, self._to[component])
            return None if renamed is None else (component, renamed)
        return None

    def from_diffusers(self, component: str, key: str) -> str | None:
        """(component, diffusers key) -> our key; None for keys this layout has no place for."""
        if component == "text_encoder":
            if key.endswith("embeddings.position_ids"):
                return None
            return PREFIXES[component] + (key if key.startswith("text_model.") else f"text_model.{key}")
        renamed = _rename(_new_vae_name(key) if component == "vae" else key, self._from[component])
        return None if renamed is None else PREFIXES[component] + renamed


def to_diffusers_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    """Our tensor under our `key` as diffusers holds it: the autoencoder attention's 1x1 convs become linears."""
    if value.ndim == 4 and _VAE_ATTENTION_CONV.match(key.removeprefix(PREFIXES["vae"])):
        return value[:, :, 0, 0]
    return value


def from_diffusers_tensor(component: str, key: str, value: torch.Tensor) -> torch.Tensor:
    """A diffusers tensor (under its diffusers `key`) as our layout holds it."""
    if component == "vae" and value.ndim == 2 and _VAE_ATTENTION_LINEAR.match(_new_vae_name(key)):
        return value[:, :, None, None]
    return value


def _new_vae_name(key: str) -> str:
    """A diffusers autoencoder key with the attention names of diffusers < 0.14 updated."""
    for old, new in _OLD_VAE_ATTENTION.items():
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return key


# ------------------------------------------------------------------------------------------------ configs


def _model_params(config: Any) -> Any:
    return (config.model if "model" in config else config).params


def diffusers_configs(config: Any) -> dict[str, dict[str, Any]]:
    """The JSON configs of a diffusers folder (model_index, unet, vae, text_encoder, scheduler, tokenizer) for
    a model built from our YAML `config`. Raises UserError for what diffusers' SD pipeline cannot express."""
    from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG

    p = _model_params(config)
    u, first = p.unet_config.params, p.first_stage_config.params
    d = first.ddconfig
    if not u.get("use_spatial_transformer", False) or u.get("context_dim") is None:
        raise UserError("only text-conditioned UNets (use_spatial_transformer: True) have a diffusers layout")
    if list(d.get("attn_resolutions", [])) or d.z_channels != first.embed_dim or not d.double_z:
        raise UserError("this autoencoder config has no diffusers AutoencoderKL equivalent")
    if "FrozenCLIPEmbedder" not in p.cond_stage_config.target:
        raise UserError(f"a diffusers folder needs the CLIP text encoder, not {p.cond_stage_config.target}")
    if p.get("beta_schedule", "linear") != "linear" or p.get("parameterization", "eps") != "eps":
        raise UserError("only the linear beta schedule with eps prediction (SD v1) is supported")
    mult, width = list(u.channel_mult), u.model_channels
    attention = [2**level in list(u.attention_resolutions) for level in range(len(mult))]
    if u.get("num_heads", -1) != -1:
        heads: int | list[int] = u.num_heads
    else:
        heads = [width * m // u.num_head_channels for m in mult]
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": p.image_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "block_out_channels": [width * m for m in mult],
        "layers_per_block": u.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": u.context_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": u.get("transformer_depth", 1),
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
        "use_linear_projection": False,
    }
    levels = len(d.ch_mult)
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": d.in_channels,
        "out_channels": d.out_ch,
        "block_out_channels": [d.ch * m for m in d.ch_mult],
        "layers_per_block": d.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "latent_channels": d.z_channels,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "sample_size": p.image_size * 2 ** (levels - 1),
        "scaling_factor": p.get("scale_factor", 1.0),
    }
    text = {**VIT_L14_TEXT_CONFIG, **(p.cond_stage_config.get("params", {}).get("text_model_config") or {})}
    text_encoder = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    text_encoder.update(OmegaConf.to_container(OmegaConf.create(text)))
    scheduler = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": p.linear_start,
        "beta_end": p.linear_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": p.get("timesteps", 1000),
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }
    pipeline = "StableDiffusionInpaintPipeline" if u.in_channels == 9 else "StableDiffusionPipeline"
    model_index = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    tokenizer = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": p.cond_stage_config.get("params", {}).get("max_length", 77),
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    return dict(
        model_index=model_index,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=scheduler,
        tokenizer=tokenizer,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path.parent.parent}: not a complete diffusers folder ({path.relative_to(path.parent.parent)} missing)"
        ) from None
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None


def config_from_diffusers(folder: str | Path) -> Any:
    """Our model config (OmegaConf, the v1-inference.yaml schema) for the diffusers pipeline in `folder`."""
    from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG

    folder = Path(folder)
    unet, vae = _read_json(folder / "unet" / "config.json"), _read_json(folder / "vae" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UserError(
            f"{folder}: beta_schedule {scheduler['beta_schedule']!r} is not SD v1's (scaled_linear)"
        )
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(
            f"{folder}: a {scheduler['prediction_type']} model (SD 2.x); only eps prediction is supported"
        )
    if unet.get("use_linear_projection") or not isinstance(unet.get("cross_attention_dim"), int):
        raise UserError(f"{folder}: not an SD v1 UNet (linear projections or several context widths)")
    base = "v1-inpainting-inference.yaml" if unet["in_channels"] == 9 else "v1-inference.yaml"
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / base)
    p = config.model.params
    widths = unet["block_out_channels"]
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    head_params: dict[str, Any] = {"num_heads": heads}
    if isinstance(heads, list):
        if len(set(heads)) == 1:
            head_params = {"num_heads": heads[0]}
        elif len({w // h for w, h in zip(widths, heads, strict=True)}) == 1:
            head_params = {"num_heads": -1, "num_head_channels": widths[0] // heads[0]}
        else:
            raise UserError(f"{folder}: attention heads {heads} are neither constant nor of constant width")
    depth = unet.get("transformer_layers_per_block", 1)
    attention = [2**i for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")]
    p.unet_config.params.update(
        {
            "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"],
            "model_channels": widths[0],
            "channel_mult": [w // widths[0] for w in widths],
            "num_res_blocks": unet.get("layers_per_block", 2),
            "attention_resolutions": attention[::-1],  # deepest first, as the original configs list them
            "context_dim": unet["cross_attention_dim"],
            "transformer_depth": depth if isinstance(depth, int) else depth[0],
            "use_checkpoint": False,
            **head_params,
        }
    )
    vae_widths = vae["block_out_channels"]
    p.first_stage_config.params.embed_dim = vae.get("latent_channels", 4)
    p.first_stage_config.params.ddconfig.update(
        {
            "z_channels": vae.get("latent_channels", 4),
            "in_channels": vae.get("in_channels", 3),
            "out_ch": vae.get("out_channels", 3),
            "ch": vae_widths[0],
            "ch_mult": [w // vae_widths[0] for w in vae_widths],
            "num_res_blocks": vae.get("layers_per_block", 2),
        }
    )
    p.update(
        {
            "image_size": unet.get("sample_size", 64),
            "scale_factor": vae.get("scaling_factor", 0.18215),
            "linear_start": scheduler.get("beta_start", 0.00085),
            "linear_end": scheduler.get("beta_end", 0.012),
            "timesteps": scheduler.get("num_train_timesteps", 1000),
        }
    )
    overrides = {k: text[k] for k in VIT_L14_TEXT_CONFIG if k in text and text[k] != VIT_L14_TEXT_CONFIG[k]}
    overrides = {
        k: v for k, v in overrides.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")
    }
    if overrides:
        p.cond_stage_config.params = {
            **(p.cond_stage_config.get("params") or {}),
            "text_model_config": overrides,
        }
    return config


# ------------------------------------------------------------------------------------------------ folders


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _weights_file(folder: Path, component: str) -> Path:
    stems = (
        (WEIGHT_STEMS[component], "pytorch_model")
        if component == "text_encoder"
        else (WEIGHT_STEMS[component],)
    )
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            if (folder / component / f"{stem}{suffix}").is_file():
                return folder / component / f"{stem}{suffix}"
    if any((folder / component).glob("*.index.json")):
        raise UserError(f"{folder / component}: sharded weights are not supported; merge the shards first")
    raise UserError(f"{folder / component}: no weights ({stems[0]}.safetensors or .bin) found")


def schedule_buffers(config: Any) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers a checkpoint holds beside the networks' weights (`betas`, `alphas_cumprod`,
    ...), computed by the model class itself: built on the meta device, only they are real tensors."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    return {k: v for k, v in model.state_dict().items() if not v.is_meta and "." not in k}


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The weights of a diffusers pipeline folder in our layout (noise schedule included), and our config for it.

    Weights come from each component's `.safetensors` (or `.bin`, unpickled with the allow-list); tensors of a
    `.safetensors` file are read one at a time. Keys this layout has no place for are reported and skipped.
    """
    folder = Path(folder)
    config = config_from_diffusers(folder)
    files = {c: TensorFile(_weights_file(folder, c)) for c in PREFIXES}
    key_map = KeyMap(Structure.from_diffusers(files["unet"], files["vae"]))
    state, skipped = {}, []
    for component, tensors in files.items():
        for key in tensors:
            ours = key_map.from_diffusers(component, key)
            if ours is None:
                skipped.append(f"{component}/{key}")
                continue
            state[ours] = from_diffusers_tensor(component, key, tensors[key])
    if skipped:
        print(f"{folder}: skipped {len(skipped)} tensors with no place in this layout, e.g. {skipped[0]}")
    return {**state, **schedule_buffers(config)}, config


def write_diffusers_folder(
    folder: str | Path,
    weights: Mapping[str, torch.Tensor],
    config: Any,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """Write `weights` (our layout; tensors may be lazy, e.g. a TensorFile) as a diffusers pipeline folder that
    `StableDiffusionPipeline.from_pretrained(folder)` loads offline: configs from our `config`, `.safetensors`
    weights (floating-point ones cast to `dtype` when given), CLIP tokenizer files. Written to a temporary
    folder beside `folder`, which replaces it at the end, so a failure leaves nothing half-written."""
    from ldm.modules.encoders.modules import clip_vocab_and_merges

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UserError(f"{folder} exists: pass --overwrite to replace it, or choose another output")
    configs = diffusers_configs(config)
    key_map = KeyMap(Structure.from_ours(weights.keys()))
    routed: dict[str, dict[str, str]] = {c: {} for c in PREFIXES}
    for key in weights:
        target = key_map.to_diffusers(key)
        if target is not None:
            routed[target[0]][target[1]] = key
    for component, keys in routed.items():
        if not keys:
            raise UserError(
                f"the checkpoint has no {component} weights (keys starting {PREFIXES[component]})"
            )

    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    try:
        for name in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
            (tmp / name).mkdir(parents=True)
        for component, keys in routed.items():
            specs = {}
            for theirs, ours in keys.items():
                spec = spec_of(weights, ours)
                shape = tuple(to_diffusers_tensor(ours, torch.empty(spec.shape, device="meta")).shape)
                cast = dtype is not None and spec.dtype.is_floating_point
                specs[theirs] = TensorSpec(dtype if cast else spec.dtype, shape)

            def tensor(
                theirs: str, keys: dict[str, str] = keys, specs: dict[str, TensorSpec] = specs
            ) -> torch.Tensor:
                return to_diffusers_tensor(keys[theirs], weights[keys[theirs]]).to(specs[theirs].dtype)

            path = tmp / component / f"{WEIGHT_STEMS[component]}.safetensors"
            write_safetensors(path, specs, tensor, {"format": "pt"})
        _write_json(tmp / "model_index.json", configs["model_index"])
        for component in ("unet", "vae", "text_encoder"):
            _write_json(tmp / component / "config.json", configs[component])
        _write_json(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
        vocab, merges = clip_vocab_and_merges()
        _write_json(tmp / "tokenizer" / "vocab.json", vocab)
        lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
        (tmp / "tokenizer" / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _write_json(tmp / "tokenizer" / "tokenizer_config.json", configs["tokenizer"])
        special = {k: configs["tokenizer"][k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        _write_json(tmp / "tokenizer" / "special_tokens_map.json", special)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing what was there only once `new` is in place."""
    old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)

"""LoRA files merged into the model's weights: `W += weight * alpha / rank * up @ down`, no per-step cost.

Formats: kohya / A1111 (`lora_unet_*`, `lora_te_*` with `lora_down`/`lora_up`/`alpha`; layer names in the
diffusers or the CompVis spelling; linear, 1x1 and 3x3 ("LoCon") conv layers) and diffusers / PEFT
(`unet.*` / `text_encoder.*` with `lora_A`/`lora_B`, or the older `lora.down`/`lora.up`; alphas from `.alpha`
keys or the file's `lora_adapter_metadata`). Files are read without running code (`.safetensors`, or the
allow-listed unpickler for `.ckpt`/`.pt`).

`apply_loras(model, [(path, weight), ...])` adds every LoRA's delta into the weights it touches and returns a
handle whose `remove()` puts the original tensors back, bit for bit: the model's tensors are swapped for new ones
rather than changed in place, and the handle keeps the originals (only those of the touched layers).
"""

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.adapters.diffusers_layout import PREFIXES, KeyMap, Structure
from ldm.adapters.tensor_files import TensorFile
from ldm.checkpoint import CheckpointError
from ldm.errors import UserError

LORA_DIR = Path("models") / "lora"
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

# (pattern, role): what a key of a LoRA file holds, and for which layer (group 1, or groups 1-2 joined).
_KEY_FORMS = [
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(.+?)(?:\.processor)?\.(to_[qkv]|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(.+?)(?:\.processor)?\.(to_[qkv]|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
# the older diffusers attention-processor names, per component
_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


def lora_targets(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Every name a LoRA file may give a layer -> our weight key, for the linear and conv layers of the UNet
    and the text encoder among `shapes` (our checkpoint keys -> shapes).

    kohya writes SD v1 UNet layers in diffusers' spelling with `_` for `.` (`lora_unet_down_blocks_0_...`),
    some converters in CompVis' (`lora_unet_input_blocks_1_1_proj_in`); text layers are `lora_te_text_model_...`;
    diffusers files use dotted names under `unet.` / `text_encoder.`.
    """
    key_map = KeyMap(Structure.from_ours(shapes))
    targets = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        mapped = key_map.to_diffusers(key)
        if mapped is None or mapped[0] == "vae":
            continue
        component, theirs = mapped[0], mapped[1].removesuffix(".weight")
        ours = key[len(PREFIXES[component]) :].removesuffix(".weight")
        if component == "unet":
            names = [
                "lora_unet_" + theirs.replace(".", "_"),
                "lora_unet_" + ours.replace(".", "_"),
                "unet." + theirs,
            ]
        else:
            # transformers >= 5.6 has no `text_model.` level, so diffusers saves text layers without it
            names = ["lora_te_" + theirs.replace(".", "_"), "text_encoder." + theirs]
            names.append("text_encoder." + theirs.removeprefix("text_model."))
        targets.update(dict.fromkeys(names, key))
    return targets


@dataclass
class LoraLayer:
    """One layer's low-rank pair: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)], alpha (None: = rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def kernel(self) -> tuple[int, ...]:
        """The down projection's spatial kernel: () for linear and 1x1 layers, (kh, kw) for LoCon convs."""
        return tuple(self.down.shape[2:]) if self.down.ndim == 4 and self.down.shape[2:] != (1, 1) else ()

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the delta has the shape of a weight of `shape` ([out, in] or [out, in, kh, kw])."""
        out, rank, inputs = self.up.shape[0], self.down.shape[0], self.down.shape[1]
        kernel_ok = tuple(shape[2:]) == self.kernel if self.kernel else all(k == 1 for k in shape[2:])
        return self.up.shape[1] == rank and (out, inputs) == tuple(shape[:2]) and kernel_ok

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        """`alpha / rank * up @ down` in float32, shaped as the weight it adds to (see `fits`)."""
        down, up = self.down.float(), self.up.float()
        rank = down.shape[0]
        scale = (self.alpha if self.alpha is not None else rank) / rank
        if self.kernel:  # LoCon: a kxk down conv, then a 1x1 up conv
            product = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            product = up.flatten(1) @ down.flatten(1)
        return (product * scale).reshape(shape)


def _component_alphas(metadata: Mapping[str, str]) -> dict[str, tuple[float, dict[str, float]]]:
    """diffusers' `lora_adapter_metadata` (PEFT configs per component) -> component -> (lora_alpha, pattern)."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    alphas = {}
    for component in PREFIXES:
        if f"{component}.lora_alpha" in packed:
            pattern = packed.get(f"{component}.alpha_pattern") or {}
            alphas[component] = (
                float(packed[f"{component}.lora_alpha"]),
                {k: float(v) for k, v in pattern.items()},
            )
    return alphas


def _layer_name(key: str) -> tuple[str, str] | None:
    """A LoRA file key -> (layer name as the file spells it, role), or None for keys that are no LoRA part."""
    for pattern, role in _KEY_FORMS:
        match = pattern.match(key)
        if match is None:
            continue
        if match.re.groups == 2:
            component = "text_encoder" if match[1].startswith(("text_encoder.", "lora_te")) else "unet"
            return f"{match[1]}.{_PROCESSOR_NAMES[component][match[2]]}", role
        return match[1], role
    return None


def read_lora(
    path: str | Path, targets: Mapping[str, str], shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, LoraLayer], int]:
    """The layers of the LoRA file at `path` keyed by our weight keys, and how many of its tensors were skipped
    (unknown layer names or parts, e.g. LyCORIS LoHa). Raises UserError for an unreadable file, a file with no
    layer of this model, or a layer whose shape does not fit (a LoRA for another architecture)."""
    path = Path(path)
    try:
        tensors = TensorFile(path)
    except CheckpointError as error:
        raise UserError(f"LoRA {error}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    skipped = 0
    for key in tensors:
        named = _layer_name(key)
        if named is None or named[0] not in targets:
            skipped += 1
            continue
        parts.setdefault(named[0], {})[named[1]] = tensors[key]
    alphas = _component_alphas(tensors.metadata)
    layers = {}
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            skipped += len(found)
            continue
        key = targets[name]
        alpha = found["alpha"].item() if "alpha" in found else None
        component = "text_encoder" if key.startswith(PREFIXES["text_encoder"]) else "unet"
        if alpha is None and component in alphas:
            alpha, pattern = alphas[component]
            alpha = next((v for p, v in pattern.items() if name.endswith(p)), alpha)
        layer = LoraLayer(found["down"], found["up"], alpha)
        if not layer.fits(shapes[key]):
            raise UserError(
                f"LoRA {path.name} does not fit this model: its layer {name} (down {tuple(layer.down.shape)}, "
                f"up {tuple(layer.up.shape)}) cannot add to {key} {tuple(shapes[key])} (a LoRA for another "
                "architecture?)"
            )
        layers[key] = layer
    if not layers:
        raise UserError(
            f"LoRA {path} has no layer of this model (0 of {len(tensors)} tensors matched): "
            "a LoRA for another architecture (e.g. SDXL or SD 2.x), or not a LoRA file"
        )
    return layers, skipped


class LoraDeltas(Mapping):
    """The sum of `weight * alpha / rank * up @ down` over several LoRA files, per weight key it touches: a
    float32 tensor of that weight's shape, computed when asked for (only the small factors are kept)."""

    def __init__(self, layers: dict[str, list[tuple[LoraLayer, float]]], shapes: Mapping[str, Sequence[int]]):
        self.layers, self.shapes = layers, shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        return sum(layer.delta(self.shapes[key]) * weight for layer, weight in self.layers[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def lora_deltas(
    loras: Iterable[tuple[str | Path, float]], shapes: Mapping[str, Sequence[int]], verbose: bool = True
) -> LoraDeltas:
    """The deltas of the LoRA files `loras` ((path, weight) pairs; several add up) for a model whose checkpoint
    keys and shapes are `shapes`. Every file is read and checked here; warns once per file about skipped tensors."""
    targets = lora_targets(shapes)
    layers: dict[str, list[tuple[LoraLayer, float]]] = {}
    for path, weight in loras:
        found, skipped = read_lora(path, targets, shapes)
        if skipped:
            warnings.warn(
                f"LoRA {Path(path).name}: skipped {skipped} tensors this model has no layer for", stacklevel=2
            )
        if verbose:
            print(f"LoRA {Path(path).name} (weight {weight:g}): {len(found)} layers")
        for key, layer in found.items():
            layers.setdefault(key, []).append((layer, float(weight)))
    return LoraDeltas(layers, shapes)


class AppliedLoras:
    """LoRAs merged into a model's weights; `remove()` restores the original tensors exactly."""

    def __init__(self, model: nn.Module, loras: list[tuple[str, float]], originals: dict[str, torch.Tensor]):
        self.model = model
        self.loras = loras
        self._originals = originals

    def remove(self) -> None:
        """Put back the tensors the LoRAs replaced (the same tensor objects, so bit for bit; moved to where the
        model's weights are now, should the model have moved since). Idempotent."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, original in self._originals.items():
                params[key].data = original.to(device=params[key].device, dtype=params[key].dtype)
        self._originals = {}

    @property
    def active(self) -> bool:
        return bool(self._originals)


def apply_loras(
    model: nn.Module, loras: Sequence[tuple[str | Path, float]], verbose: bool = True
) -> AppliedLoras:
    """Merge the LoRA files `loras` ((path, weight) pairs; several add up) into `model` (a LatentDiffusion, or
    any module with our checkpoint keys). Each touched weight becomes a new tensor (same dtype, device and memory
    layout) holding `W + sum of deltas`, computed in float32; the handle keeps the original for `remove()`."""
    params = dict(model.named_parameters())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    deltas = lora_deltas(loras, shapes, verbose=verbose)
    originals = {}
    with torch.no_grad():
        for key in deltas:
            original = params[key].data
            merged = torch.empty_like(original)
            merged.copy_(original.float() + deltas[key].to(original.device))
            params[key].data = merged
            originals[key] = original
    return AppliedLoras(model, [(str(p), float(w)) for p, w in loras], originals)


class LoraSet:
    """The LoRAs currently merged into one model: `use([(path, weight), ...])` makes exactly those active,
    undoing the previous set first (nothing is done when the set is unchanged)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._applied: AppliedLoras | None = None

    @property
    def loras(self) -> list[tuple[str, float]]:
        return list(self._applied.loras) if self._applied else []

    def use(self, loras: Sequence[tuple[str | Path, float]], verbose: bool = True) -> None:
        wanted = [(str(p), float(w)) for p, w in loras]
        if wanted == self.loras:
            return
        self.clear()
        if wanted:
            self._applied = apply_loras(self.model, wanted, verbose=verbose)

    def clear(self) -> None:
        if self._applied is not None:
            self._applied.remove()
            self._applied = None


def find_lora(name: str, lora_dir: str | Path = LORA_DIR) -> Path:
    """A LoRA by path, or by name (with or without suffix) in `lora_dir`, as `<lora:name:0.8>` names it."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [Path(lora_dir) / name] + [Path(lora_dir) / f"{name}{suffix}" for suffix in LORA_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"LoRA '{name}' not found (looked for {path} and {name}.safetensors in {lora_dir}): check the name"
    )


def parse_lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` (the `--lora` flag) -> (path, weight); the weight defaults to 1.0."""
    path, sep, weight = value.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


def lora_hash(path: str | Path) -> str:
    """The short hash A1111 writes for a LoRA in `Lora hashes:`: the first 12 hex digits of the sha256 of a
    `.safetensors` file's tensor data (the "addnet" hash: everything after the JSON header, so editing the
    metadata keeps the hash), or of the whole file for other formats."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def lora_hashes(loras: Iterable[str | Path]) -> str:
    """A1111's `Lora hashes` infotext value for the LoRA files `loras`: `name: hash` pairs (name = file stem,
    hash = lora_hash) joined by ", ", e.g. `add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f`."""
    return ", ".join(f"{Path(path).stem}: {lora_hash(path)}" for path in loras)

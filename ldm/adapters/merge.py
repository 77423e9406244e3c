"""A1111's checkpoint merger, streamed: weighted sum `A * (1 - m) + B * m` and add difference `A + (B - C) * m`,
computed tensor by tensor (in float32) while the output `.safetensors` is written, so merging three 4 GB models
holds a few tensors in memory, not three models.

A1111's rules: only tensors whose key contains "model" are merged (the noise schedule comes from A), the CLIP
`position_ids` are copied from A; a tensor A has and B lacks is copied from A; in add-difference mode a tensor C
lacks leaves A's unchanged; tensors only B or C have are dropped. An inpainting (9 input channels) or
instruct-pix2pix (8) UNet as A merges with a normal one (4) as B on their 4 shared input channels; the other way
round is an error, as is any other shape mismatch.
"""

import warnings
from pathlib import Path

import torch

from ldm.adapters.convert import NETWORKS, open_checkpoint
from ldm.adapters.tensor_files import TensorSpec, spec_of, write_safetensors
from ldm.errors import UserError

MODES = ("weighted-sum", "add-difference")
SKIP = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)


def _merged_channels(key: str, a: TensorSpec, b: TensorSpec) -> int | None:
    """For tensors of other shapes: how many leading input channels to merge (A's extra channels are kept), or
    None when the shapes agree. UserError when they cannot be merged."""
    if a.shape == b.shape:
        return None
    same_but_inputs = (
        len(a.shape) == len(b.shape) >= 2 and a.shape[:1] + a.shape[2:] == b.shape[:1] + b.shape[2:]
    )
    if same_but_inputs and a.shape[1] in (8, 9) and b.shape[1] == 4:
        return 4
    if same_but_inputs and a.shape[1] == 4 and b.shape[1] in (8, 9):
        kind = "inpainting" if b.shape[1] == 9 else "instruct-pix2pix"
        raise UserError(
            f"when merging an {kind} model with a normal one, A must be the {kind} model: swap A and B"
        )
    raise UserError(
        f"cannot merge {key}: A has shape {a.shape}, the other model {b.shape} (different architectures)"
    )


def merge_checkpoints(
    a_path: str | Path,
    b_path: str | Path,
    output: str | Path,
    multiplier: float,
    mode: str = "weighted-sum",
    c_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Merge checkpoints A, B (and C for add-difference) into the `.safetensors` file `output`; network weights
    are cast to `dtype` when given, else keep A's dtype. Returns counts: merged, copied from A, dropped."""
    output = Path(output)
    if mode not in MODES:
        raise UserError(f"unknown merge mode {mode!r}: use one of {', '.join(MODES)}")
    if (mode == "add-difference") != (c_path is not None):
        raise UserError("add-difference needs a third model C (--c); weighted-sum takes only A and B")
    if output.suffix != ".safetensors":
        raise UserError(
            f"{output}: the merged model is written as .safetensors; name the output *.safetensors"
        )
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists: pass --overwrite to replace it, or choose another output")
    inputs = [Path(p) for p in (a_path, b_path, c_path) if p is not None]
    if output.resolve() in [p.resolve() for p in inputs]:
        raise UserError("the output is one of the inputs: write to another path")
    models = [open_checkpoint(p)[0] for p in inputs]
    a, b = models[0], models[1]
    c = models[2] if len(models) == 3 else None

    specs, plans = {}, {}
    for key in a:
        spec = spec_of(a, key)
        cast = dtype is not None and spec.dtype.is_floating_point and key.startswith(NETWORKS)
        specs[key] = TensorSpec(dtype if cast else spec.dtype, spec.shape)
        if "model" not in key or key in SKIP or not spec.dtype.is_floating_point or key not in b:
            plans[key] = "copy"
            continue
        channels = _merged_channels(key, spec, spec_of(b, key))
        if c is not None and key in c and spec_of(c, key).shape != spec_of(b, key).shape:
            raise UserError(
                f"cannot subtract C from B at {key}: shapes {spec_of(b, key).shape} and {spec_of(c, key).shape}"
            )
        plans[key] = ("merge", channels)
    only_a = [k for k in a if "model" in k and k not in b and k not in SKIP]
    dropped = [k for k in b if k not in a] + (
        [k for k in c if k not in a and k not in b] if c is not None else []
    )
    if only_a:
        warnings.warn(f"{len(only_a)} tensors are only in A (e.g. {only_a[0]}): copied from A", stacklevel=2)
    if dropped:
        warnings.warn(
            f"{len(dropped)} tensors are missing from A (e.g. {dropped[0]}): left out", stacklevel=2
        )

    def tensor(key: str) -> torch.Tensor:
        plan, value = plans[key], a[key]
        if plan != "copy":
            channels = plan[1]
            first = value[:, :channels] if channels else value
            merged = _merge_values(
                first.float(),
                b[key].float(),
                None if c is None or key not in c else c[key].float(),
                multiplier,
                mode,
            )
            if channels:
                value = value.float().clone()
                value[:, :channels] = merged
            else:
                value = merged
        return value.to(specs[key].dtype)

    write_safetensors(output, specs, tensor, {"format": "pt"})
    merged = sum(plan != "copy" for plan in plans.values())
    return {"merged": merged, "copied": len(plans) - merged, "dropped": len(dropped)}


def _merge_values(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, m: float, mode: str
) -> torch.Tensor:
    """A1111's formulas: `a * (1 - m) + b * m`, or `a + (b - c) * m` (c missing from C: no difference)."""
    if mode == "weighted-sum":
        return a * (1 - m) + b * m
    return a if c is None else a + (b - c) * m

"""Textual-inversion embeddings from a folder: the file name (without extension) is the trigger word.

Layouts read, as AUTOMATIC1111 reads them: A1111's `.pt` (`{"string_to_param": {"*": [n, width]}, ...}`),
diffusers' `.bin` (`{token: [width] or [n, width]}`) and `.safetensors` (`{"emb_params": [n, width]}`, or
any file holding a single tensor). Pickled files are read with `torch.load(weights_only=True)`: nothing in a
file can run code. Every problem with a file is a one-line UserError naming it.
"""

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ldm.errors import UserError

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # one prompt chunk


@dataclass(frozen=True)
class Embedding:
    """A trigger word and the token embeddings it stands for."""

    name: str
    vectors: torch.Tensor  # [n, width] float32, one per token slot it takes
    path: Path

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


def _read(path: Path) -> Any:
    """The object stored in `path`, read without running code from it."""
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe is None:
            raise UserError(
                f"embedding {path}: not a readable embedding file (not a torch save file)"
            ) from None
        raise UserError(
            f"embedding {path}: refused for safety: unpickling it would load `{unsafe[1]}`, which could run "
            "code; convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as e:  # a truncated, corrupt or foreign file: torch/safetensors raise many kinds
        raise UserError(
            f"embedding {path}: not a readable embedding file ({type(e).__name__}: {e})"
        ) from None


def _vectors(data: Any, path: Path) -> torch.Tensor:
    """The [n, width] tensor of an embedding file's content."""
    if isinstance(data, Mapping) and "string_to_param" in data:
        data = data["string_to_param"]
        if not isinstance(data, Mapping) or len(data) != 1:
            raise UserError(f"embedding {path}: string_to_param must hold exactly one entry")
    elif isinstance(data, Mapping) and {"clip_l", "clip_g"} <= set(data):
        raise UserError(f"embedding {path}: an SDXL embedding (clip_l/clip_g); this model is SD v1")
    if not isinstance(data, Mapping) or len(data) != 1:
        raise UserError(
            f"embedding {path}: expected A1111's string_to_param, a diffusers {{token: tensor}} or a "
            "single-tensor safetensors file"
        )
    vectors = next(iter(data.values()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise UserError(f"embedding {path}: its entry is not a [vectors, width] tensor")
    if not vectors.is_floating_point():
        raise UserError(f"embedding {path}: its vectors are {vectors.dtype}, not floating point")
    return vectors.detach().reshape(-1, vectors.shape[-1]).float()


def load_embedding(path: str | Path, width: int | None = None) -> Embedding:
    """The embedding in `path`; with `width`, checked to fit a text encoder of that hidden size."""
    path = Path(path)
    vectors = _vectors(_read(path), path)
    if width is not None and vectors.shape[1] != width:
        raise UserError(
            f"embedding {path}: its vectors are {vectors.shape[1]} wide but this model's text encoder takes "
            f"{width} (an embedding made for another model family): remove it from the embeddings folder"
        )
    if vectors.shape[0] > MAX_VECTORS:
        raise UserError(
            f"embedding {path}: {vectors.shape[0]} vectors, more than the {MAX_VECTORS} a prompt chunk holds"
        )
    return Embedding(path.stem, vectors, path)


def load_embeddings(folder: str | Path, width: int | None = None) -> dict[str, Embedding]:
    """Every embedding file (`.pt`, `.bin`, `.safetensors`) directly in `folder`, by trigger word; empty
    files are skipped. UserError when the folder is missing or two files share a trigger word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"embeddings folder not found: {folder}")
    found: dict[str, Embedding] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES or not path.is_file() or path.stat().st_size == 0:
            continue
        embedding = load_embedding(path, width)
        if embedding.name in found:
            raise UserError(
                f"embeddings {found[embedding.name].path.name} and {path.name} share the trigger word "
                f"'{embedding.name}': rename or remove one"
            )
        found[embedding.name] = embedding
    return found

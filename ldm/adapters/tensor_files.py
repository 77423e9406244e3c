"""Weight files read and written one tensor at a time, so that converting or merging multi-GB checkpoints holds
only a few tensors in memory.

`.safetensors` are read with plain positioned reads rather than a memory map: pages of a mapped file
count in the process's resident set once touched, so mapping three 2 GB inputs would show as 6 GB. `.ckpt` files
go through ldm.checkpoint's allow-listed unpickler (memory-mapped when zip-based). Output `.safetensors` are
written header first, then tensor after tensor, to a temporary name that replaces the target at the end.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ldm.checkpoint import CheckpointError, read_state_dict, replaced_atomically

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class TensorSpec(NamedTuple):
    """What a tensor will be, known before its values: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorFile(Mapping):
    """A weight file as a read-only mapping key -> tensor; each lookup reads that tensor alone.

    `.safetensors` are parsed here (header checked against the file size, so a truncated file fails at open);
    other suffixes are read by `ldm.checkpoint.read_state_dict` (allow-listed unpickling, memory-mapped).
    `specs` gives every tensor's dtype and shape without reading it; `metadata` the file's string metadata.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._state: dict[str, torch.Tensor] | None = None
        self._offsets: dict[str, tuple[int, int]] = {}
        if self.path.suffix == ".safetensors":
            self.specs = self._read_header()
        else:
            self._state, _ = read_state_dict(self.path)
            self.specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in self._state.items()}

    def _read_header(self) -> dict[str, TensorSpec]:
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        size = self.path.stat().st_size
        broken = f"{self.path}: not a complete .safetensors file"
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{broken} (only {size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{broken} (header of {length} bytes in a file of {size}): truncated?")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{broken} (its header is not JSON)") from None
        self._data_start = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        specs, end = {}, 0
        for key, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                begin, stop = (int(x) for x in entry["data_offsets"])
                spec = TensorSpec(dtype, tuple(int(s) for s in entry["shape"]))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{broken} (bad header entry for {key!r})") from None
            if stop - begin != spec.nbytes:
                raise CheckpointError(f"{broken} ({key!r}: {stop - begin} bytes for shape {spec.shape})")
            specs[key], self._offsets[key], end = spec, (begin, stop), max(end, stop)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{broken}: it ends at byte {size}, its tensors need {self._data_start + end} (truncated download?)"
            )
        return specs

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        spec, (begin, stop) = self.specs[key], self._offsets[key]
        buffer = bytearray(stop - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: file ended while reading {key!r} (truncated?)")
                done += got
        if not buffer:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(buffer, dtype=spec.dtype).reshape(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def spec_of(tensors: Mapping[str, torch.Tensor], key: str) -> TensorSpec:
    """dtype and shape of `tensors[key]`, without reading it when `tensors` announces them (a `specs` mapping, as
    TensorFile and ldm.adapters.convert.Weights have)."""
    specs = getattr(tensors, "specs", None)
    if specs is not None:
        return specs[key]
    return TensorSpec(tensors[key].dtype, tuple(tensors[key].shape))


def write_safetensors(
    path: str | Path,
    specs: Mapping[str, TensorSpec],
    tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a `.safetensors` file whose tensors are `specs` (in that order), asking `tensor(key)` for each one
    only when its turn comes. Atomic: `path` holds its old content until the whole new file is written."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, spec in specs.items():
        header[key] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, spec in specs.items():
            value = tensor(key)
            if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"{key}: got {value.dtype} {tuple(value.shape)}, announced {spec.dtype} {spec.shape}"
                )
            f.write(memoryview(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())

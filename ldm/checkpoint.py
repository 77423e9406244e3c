"""Weights in and out: safe `.ckpt` unpickling, `.safetensors`, key fix-ups, loading into meta-built models."""

import contextlib
import hashlib
import json
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from ldm.files import file_mode, remove_stale_temporaries, temporary_path
from ldm.util import instantiate_from_config

_METADATA_KEYS = ("global_step", "epoch")
_NO_TEXT_MODEL_LEVEL = re.compile(r"^(.*transformer\.)(embeddings|encoder|final_layer_norm)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unsafe to unpickle, or not matching the model."""


class _LightningCallbackRef:
    """Stand-in for `pytorch_lightning...ModelCheckpoint`, which Lightning 1.x pickles by reference (as a dict
    key) in SD v1 `.ckpt` files. Allow-listing that one name under this inert class lets those files load with
    `weights_only=True`, without importing Lightning or running anything from the file."""


_numpy_core = getattr(np, "_core", None) or np.core
# Lightning checkpoints also pickle the LR scheduler's state, which holds numpy scalars: rebuilding one from
# its dtype and bytes runs no code, so those three names are allowed too.
SAFE_GLOBALS = [
    (_LightningCallbackRef, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    np.dtype,
    type(np.dtype(np.float64)),
    _numpy_core.multiarray.scalar,
]


def read_state_dict(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights from `.ckpt`/`.pt`/`.pth` (allow-listed unpickling, memory-mapped) or `.safetensors`
    (diffusers pipeline folders: ldm.adapters.diffusers_layout.read_diffusers_folder).

    Returns (state_dict, metadata) where metadata holds `global_step`/`epoch` when the file records them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty: the download or copy did not finish; fetch the file again")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
            state_dict = safetensors.torch.load_file(path, device=str(device))
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            raise _damaged(path, error) from None
        metadata = {k: int(header[k]) for k in _METADATA_KEYS if header.get(k, "").isdigit()}
        return state_dict, metadata
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location=device, mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        if opcode and not unsafe:
            raise CheckpointError(
                f"{path} is not a checkpoint that can be read safely (pickle opcode {opcode[1]} is not allowed): "
                "it is damaged or was not written by torch.save; refused without running it"
            ) from None
        needs = f"`{unsafe[1]}`" if unsafe else "objects beyond tensors and plain containers"
        raise CheckpointError(
            f"{path}: refused for safety: unpickling it would load {needs}, which could run code; "
            "convert it to .safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise _damaged(path, error) from None
    metadata = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        metadata = {k: obj[k] for k in _METADATA_KEYS if k in obj}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict of tensors (e.g. key {bad[0]!r})")
    return dict(obj), metadata


def _damaged(path: Path, error: Exception) -> CheckpointError:
    reason = " ".join(str(error).split())[:200]
    return CheckpointError(
        f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}): the file is damaged or "
        "incomplete; fetch it again"
    )


def _fix_key(key: str, own: Mapping[str, torch.Tensor]) -> str:
    """Map CLIP text-model keys saved without the `text_model.` level to the checkpoint layout."""
    match = _NO_TEXT_MODEL_LEVEL.match(key)
    if key in own or not match:
        return key
    mapped = f"{match[1]}text_model.{key[len(match[1]) :]}"
    return mapped if mapped in own or mapped.endswith("embeddings.position_ids") else key


def _is_stray(key: str, own: Mapping[str, torch.Tensor], has_ema: bool) -> bool:
    """Keys real checkpoints hold that are not weights of this model: CLIP position ids (non-persistent
    buffers in current transformers) and `model_ema.*` when the model keeps no EMA."""
    if key in own:
        return False
    return key.endswith("embeddings.position_ids") or (key.startswith("model_ema.") and not has_ema)


def _first_lines(keys: list[str], limit: int = 10) -> str:
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "".join(f"\n  {k}" for k in keys[:limit]) + more


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore_keys: Iterable[str] = (),
    strict: bool = False,
    verbose: bool = True,
) -> tuple[list[str], list[str]]:
    """Load `state_dict` into `model` in place; returns (missing, unexpected) keys.

    Keys starting with one of `ignore_keys` are dropped; known layout differences are fixed up. Each tensor
    takes the dtype of the model's tensor. A model built on the meta device takes the checkpoint tensors
    themselves (`assign`), so a memory-mapped file is used in place; it must then get every weight.
    """
    own = model.state_dict(keep_vars=True)
    ignore_keys = tuple(ignore_keys)
    has_ema = any(k.startswith("model_ema.") for k in own)
    ignored = [k for k in state_dict if k.startswith(ignore_keys)]
    if verbose and ignored:
        print(f"Ignoring {len(ignored)} checkpoint keys starting with {', '.join(ignore_keys)}")
    sd = {}
    for key, value in state_dict.items():
        if key.startswith(ignore_keys):
            continue
        key = _fix_key(key, own)
        if _is_stray(key, own, has_ema):
            continue
        if key in own and value.shape != own[key].shape:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not match model shape {tuple(own[key].shape)}"
            )
        sd[key] = value

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not match the model: {len(missing)} missing keys:{_first_lines(missing)}\n"
            f"{len(unexpected)} unexpected keys:{_first_lines(unexpected)}"
        )
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:
        # Assigned tensors become the model's own, so cast them here, one at a time; in-place loading
        # (`copy_`) casts by itself without holding a converted copy.
        sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    del own
    model.load_state_dict(sd, strict=False, assign=on_meta)
    if on_meta:
        _finish_meta_model(model, missing)
    if verbose:
        print(
            f"Loaded {len(sd) - len(unexpected)} tensors: {len(missing)} missing, {len(unexpected)} unexpected keys"
        )
        if missing:
            print(f"Missing keys:{_first_lines(missing)}")
        if unexpected:
            print(f"Unexpected keys:{_first_lines(unexpected)}")
    return missing, unexpected


def _finish_meta_model(model: nn.Module, missing: list[str]) -> None:
    """After loading into a meta-built model: every weight must have come from the checkpoint; the CLIP
    `position_ids` (non-persistent, so not loaded) are recomputed; nothing may be left on the meta device."""
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} weights the model needs (it was built on the meta device, "
            f"so they cannot keep their initial values):{_first_lines(missing)}"
        )
    device = next(t.device for t in chain(model.parameters(), model.buffers()) if not t.is_meta)
    for module in model.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module.position_ids = torch.arange(ids.shape[-1], device=device).expand(ids.shape)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(
            f"still on the meta device after loading (create them on a real device):{_first_lines(left)}"
        )


def load_model_from_config(
    config: Any,
    ckpt: str | Path | Mapping[str, torch.Tensor] | None,
    device: str | torch.device = "cpu",
    verbose: bool = True,
) -> nn.Module:
    """Build `config.model` and load `ckpt` (a checkpoint file, or a state dict already read) into it (random
    weights when `ckpt` is None); eval mode on `device`.

    The model is built on the meta device, so the only weights ever in memory are the checkpoint's.
    """
    if ckpt is None:
        with torch.device(device):
            model = instantiate_from_config(config.model)
        return model.to(device).eval()
    if isinstance(ckpt, Mapping):
        state_dict, metadata = ckpt, {}
    else:
        if verbose:
            print(f"Loading model from {ckpt}")
        state_dict, metadata = read_state_dict(ckpt)
    if verbose and "global_step" in metadata:
        print(f"Global step: {metadata['global_step']}")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    load_weights(model, state_dict, verbose=verbose)
    return model.to(device).eval()


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to: renamed onto `path` when the block succeeds, removed when it
    fails, so `path` only ever holds its old content or the whole new one."""
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def save_checkpoint(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], global_step: int | None = None, **extra: Any
) -> None:
    """Write `state_dict` atomically: `.safetensors` (extras as string metadata), else a Lightning-style dict
    `{"state_dict", "global_step", **extra}` with `torch.save`. A crash never leaves a partial file at `path`."""
    path = Path(path)
    fields = {k: v for k, v in {"global_step": global_step, **extra}.items() if v is not None}
    with replaced_atomically(path) as tmp:
        if path.suffix == ".safetensors":
            tensors = {k: v.contiguous() for k, v in state_dict.items()}
            safetensors.torch.save_file(tensors, tmp, metadata={k: str(v) for k, v in fields.items()})
        else:
            torch.save({"state_dict": dict(state_dict), **fields}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def model_hash(path: str | Path) -> str:
    """First 10 hex digits of the file's sha256 (the short hash A1111 writes into image metadata).

    Read in 16 MiB chunks: reads and hashing release the GIL, and so few chunks that a thread doing this rarely
    waits to get the GIL back (hashlib.file_digest's small chunks were much slower beside the model load; see
    BENCHMARKS.md)."""
    digest = hashlib.sha256()
    chunk = memoryview(bytearray(16 << 20))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(chunk):
            digest.update(chunk[:size])
    return digest.hexdigest()[:10]


def hash_cache_path() -> Path | None:
    """The JSON file that remembers checkpoint hashes: $LDM_HASH_CACHE, else ldm/model-hashes.json in the user's
    cache folder ($XDG_CACHE_HOME or ~/.cache); None without either (no home directory)."""
    if os.environ.get("LDM_HASH_CACHE"):
        return Path(os.environ["LDM_HASH_CACHE"])
    try:
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:
        return None
    return Path(root) / "ldm" / "model-hashes.json"


def cached_model_hash(path: str | Path, cache: Path | None = None) -> str:
    """model_hash(path), remembered in `cache` (default hash_cache_path()) under the file's absolute path with its
    size and modification time, so a multi-GB checkpoint is read once rather than at every run (as A1111 does).
    A cache file that can't be read or written is ignored; it is replaced atomically."""
    path, cache = Path(path).resolve(), cache or hash_cache_path()
    if cache is None:
        return model_hash(path)
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("hash"), str):
        return entry["hash"]
    digest = model_hash(path)
    entries[str(path)] = {"stamp": stamp, "hash": digest}
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(cache) as tmp:
            tmp.write_text(json.dumps(entries, indent=1))
    return digest


def model_hash_in_background(path: str | Path) -> Future:
    """cached_model_hash(path) computed on a daemon thread: hashlib and file reads release the GIL, so a
    multi-GB file is hashed on another core while this one imports and builds the model. Result or error via
    `.result()`; a daemon thread never holds up the exit of a run that fails first."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(cached_model_hash(path))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=work, name="model_hash", daemon=True).start()
    return future

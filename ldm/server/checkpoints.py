"""The models a client may choose: checkpoint files under the models folder (`models/ldm/**`), named as A1111
names them. A request names a listed model; it never gives a path, so nothing outside the folder is loaded.
"""

import os
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".ckpt", ".safetensors")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and the config it is loaded with."""

    name: str  # its path under the folder ("shapes/model.safetensors"), A1111's checkpoint name
    path: Path  # resolved
    config: Path | None  # `<stem>.yaml` or `config.yaml` beside it; None: the server's --config

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_"))[0]

    def title(self, short_hash: str | None = None) -> str:
        """A1111's title: the name, and the short hash once known."""
        return f"{self.name} [{short_hash}]" if short_hash else self.name

    def answers_to(self, value: str) -> bool:
        """Whether a client's `sd_model_checkpoint` means this one: its title (with or without hash), name
        or model_name."""
        value = value.strip()
        without_hash = value.rsplit(" [", 1)[0] if value.endswith("]") else value
        return without_hash in (self.name, self.model_name)


def beside_config(path: Path) -> Path | None:
    """The config that goes with a checkpoint: `<stem>.yaml` next to it (A1111's convention), else the folder's
    `config.yaml` (the bundled models' layout)."""
    for candidate in (path.with_suffix(".yaml"), path.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """Every checkpoint file under `folder`, by name; files (or links) that resolve outside it are left out."""
    root = folder.resolve()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        real = path.resolve()
        if path.suffix in SUFFIXES and real.is_file() and real.is_relative_to(root):
            found.append(Checkpoint(path.relative_to(root).as_posix(), real, beside_config(real)))
    return found


def lora_files(folder: Path) -> list[Path]:
    """LoRA files in `folder` (models/lora), resolved inside it."""
    root = folder.resolve()
    if not root.is_dir():
        return []
    return sorted(
        p.resolve()
        for p in root.iterdir()
        if p.suffix in LORA_SUFFIXES and p.resolve().is_file() and p.resolve().is_relative_to(root)
    )

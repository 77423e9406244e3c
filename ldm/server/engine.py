"""The model in memory: the loaded session, the checkpoint it came from, and switching to another listed
checkpoint. Only the worker thread calls `load` after start-up."""

import gc
from collections.abc import Sequence
from pathlib import Path

from ldm.bundled import BUNDLED
from ldm.cli import parse_args
from ldm.loading import check_latent_flags, load_config, resolve_path, size_multiple
from ldm.server.checkpoints import Checkpoint, list_checkpoints


def bundled_name(path: Path) -> str | None:
    """The bundled model's name whose weights are at `path` (its config and sizes then apply)."""
    return next((name for name, model in BUNDLED.items() if model.ckpt.resolve() == path.resolve()), None)


class Engine:
    """One loaded model and the options it was opened with.

    `model_flags` are the generation scripts' flags that choose and run the model (`--device cpu`,
    `--no-safety-checker`, ...); `--ckpt`/`--config` pick the model at start-up; later switches choose among
    `list_checkpoints(models_dir / "ldm")` only."""

    def __init__(self, models_dir: Path, model_flags: Sequence[str], ckpt: str, config: str | None):
        self.models_dir = Path(models_dir)
        self.model_flags = list(model_flags)
        self.config = config
        self.session = None
        self.checkpoint: Checkpoint | None = None
        self.size_multiple = 8
        self._open(["--ckpt", ckpt] + (["--config", config] if config else []))
        self.first = self.checkpoint  # the operator's choice: selectable wherever it lies

    def checkpoints(self) -> list[Checkpoint]:
        """The listed checkpoints, and the one the operator started with wherever it lies."""
        listed = list_checkpoints(self.models_dir / "ldm")
        if all(c.path != self.first.path for c in listed):
            listed.append(self.first)
        return listed

    def find(self, value: str) -> Checkpoint | None:
        """The checkpoint a client's `sd_model_checkpoint` names, or None: only listed ones can be found."""
        return next((c for c in self.checkpoints() if c.answers_to(value)), None)

    def title(self) -> str:
        return self.checkpoint.title(self.session.model_hash)

    def load(self, checkpoint: Checkpoint) -> None:
        """Replace the model with `checkpoint`'s (the previous one is released first, and loaded again if the
        new one fails to load)."""
        previous = self.checkpoint
        self.session = None
        gc.collect()
        try:
            self._open(self._flags(checkpoint))
        except Exception:
            self._open(self._flags(previous))
            raise

    def _flags(self, checkpoint: Checkpoint) -> list[str]:
        """--ckpt and --config of a checkpoint: a bundled model by its name (its sizes and scale then apply)."""
        name = bundled_name(checkpoint.path)
        if name is not None:
            return ["--ckpt", name]
        config = checkpoint.config or (Path(self.config) if self.config else None)
        return ["--ckpt", str(checkpoint.path)] + (["--config", str(config)] if config else [])

    def _open(self, args: list[str]) -> None:
        from ldm.pipeline import open_session

        opt = parse_args("txt2img", None, self.model_flags + args)
        config = load_config(opt.config)
        check_latent_flags(opt.C, opt.f, config)
        self.session = open_session(opt, config)
        path = resolve_path(opt.ckpt).resolve()
        root = (self.models_dir / "ldm").resolve()
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        self.checkpoint = Checkpoint(name, path, resolve_path(opt.config).resolve())
        self.size_multiple = size_multiple(config)

"""The Lightning glue of main.py: config checks, trainer settings, callbacks, atomic checkpoints."""

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid

from ldm.checkpoint import SAFE_GLOBALS, replaced_atomically
from ldm.errors import ConfigError
from ldm.util import check_targets, instantiate_from_config

# Lightning 1.x trainer settings that 2.x renamed, and those it dropped (they are ignored with a note).
RENAMED_TRAINER_KEYS = {
    "replace_sampler_ddp": "use_distributed_sampler",
    "checkpoint_callback": "enable_checkpointing",
}
DROPPED_TRAINER_KEYS = {
    "weights_summary", "progress_bar_refresh_rate", "flush_logs_every_n_steps", "terminate_on_nan",
    "prepare_data_per_node", "auto_select_gpus", "track_grad_norm", "move_metrics_to_cpu", "amp_backend",
    "amp_level", "log_gpu_memory", "truncated_bptt_steps", "resume_from_checkpoint",
}  # fmt: skip
LEGACY_STRATEGIES = {"ddp", "ddp_spawn", "dp", "ddp2", "ddp_sharded", "deepspeed", "fsdp"}


def instantiate_checked(config: Any, what: str) -> Any:
    """instantiate_from_config after `check_targets`, so a config mistake is one ConfigError line."""
    if "target" not in config:
        raise ConfigError(f"{what}: no `target:` in its config")
    check_targets(config, what)
    return instantiate_from_config(config)


def _parse_device_ids(value: Any) -> tuple[Any, int]:
    """The 1.x `gpus`/`devices` forms ("0,", "0,1", 2, "2") -> (Lightning 2.x devices, device count)."""
    if isinstance(value, int):
        return value, max(value, 1)
    text = str(value).strip()
    if "," in text:
        ids = [int(part) for part in text.split(",") if part.strip()]
        return ids, len(ids)
    if text in ("-1", "auto"):
        return "auto", 1
    return int(text), max(int(text), 1)


# Trainer settings that must be numbers (Lightning itself would fail on a string only mid-training).
INT_TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "min_steps",
    "min_epochs",
    "log_every_n_steps",
    "accumulate_grad_batches",
    "check_val_every_n_epoch",
    "num_nodes",
    "num_sanity_val_steps",
)
NUMBER_TRAINER_KEYS = ("gradient_clip_val", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                       "val_check_interval")  # fmt: skip


def _check_trainer_types(config: dict) -> None:
    for key in INT_TRAINER_KEYS + NUMBER_TRAINER_KEYS:
        value = config.get(key)
        kinds = (int,) if key in INT_TRAINER_KEYS else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = "a whole number" if key in INT_TRAINER_KEYS else "a number"
            raise ConfigError(f"lightning.trainer.{key} must be {kind}, got {value!r}")


def trainer_kwargs(trainer_config: Any, opt: Any, flags: tuple[str, ...]) -> dict:
    """Trainer(**kwargs) from the config's `lightning.trainer` block and command-line flags, with the
    Lightning 1.4 names translated. `_n_devices` (for learning-rate scaling) is added."""
    config = OmegaConf.to_container(trainer_config, resolve=True) if trainer_config else {}
    config.update({flag: getattr(opt, flag) for flag in flags if getattr(opt, flag, None) is not None})
    for old, new in RENAMED_TRAINER_KEYS.items():
        if old in config:
            config[new] = config.pop(old)
    for key in DROPPED_TRAINER_KEYS & config.keys():
        rank_zero_info(f"note: trainer setting `{key}` is not used by Lightning 2.x and is ignored")
        config.pop(key)
    if config.get("accelerator") in LEGACY_STRATEGIES:  # 1.x spelled the strategy as the accelerator
        config.setdefault("strategy", config.pop("accelerator"))
    gpus = config.pop("gpus", None)
    if gpus not in (None, "", 0, "0") and str(gpus).strip() != "":
        config["devices"], n_devices = _parse_device_ids(gpus)
        config.setdefault("accelerator", "gpu")
    elif "devices" in config:
        config["devices"], n_devices = _parse_device_ids(config["devices"])
        config.setdefault("accelerator", "auto")
    else:
        config.setdefault("accelerator", "cpu")
        config["devices"], n_devices = 1, 1
    config["_n_devices"] = n_devices
    _check_trainer_types(config)
    return config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so that an interrupted save
    never destroys the previous checkpoint of the same name. Reads (for `-r`) with the same allow-list as
    ldm.checkpoint, which admits the numpy scalars of the LR scheduler's state."""

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            torch.save(checkpoint, tmp)


class SaveOnSignal(Callback):
    """Saves `last.ckpt` on SIGUSR1 (training goes on) and when Ctrl-C or SIGTERM stops training."""

    requested = False

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def request(cls, signum: int, frame: Any) -> None:
        cls.requested = True

    def save(self, trainer: pl.Trainer) -> None:
        # rank 0 writes alone (no barrier), since the other ranks may not be at the same point
        if trainer.global_rank != 0:
            return
        path = self.path
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath is not None:
            # ModelCheckpoint must own this last.ckpt, or after a resume it writes last-v1.ckpt beside it
            path = Path(callback.dirpath) / "last.ckpt"
            callback.last_model_path = str(path)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        print(f"Saved {path} at global step {trainer.global_step}")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if SaveOnSignal.requested:
            SaveOnSignal.requested = False
            self.save(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            print("Summoning checkpoint.")
            self.save(trainer)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint that writes `last.ckpt` at every validation, as Lightning 1.x did and `-r`
    relies on. Lightning 2.x writes it only when a top-k checkpoint is saved in the same step, so once the
    monitored metric stops improving last.ckpt falls behind and a resume would go back in time."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # skipped too when this step was saved already: last.ckpt is then current
        skip = self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer)
        if self.save_last and not skip:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SetupCallback(Callback):
    """Creates the run's folders and saves the merged project and lightning configs into configs/."""

    def __init__(
        self,
        resume: str | None,
        now: str,
        logdir: Path,
        ckptdir: Path,
        cfgdir: Path,
        config,
        lightning_config,
    ):
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            folder.mkdir(parents=True, exist_ok=True)
        print("Project config")
        print(OmegaConf.to_yaml(self.config))
        OmegaConf.save(self.config, self.cfgdir / f"{self.now}-project.yaml")
        print("Lightning config")
        print(OmegaConf.to_yaml(self.lightning_config))
        OmegaConf.save(
            OmegaConf.create({"lightning": self.lightning_config}), self.cfgdir / f"{self.now}-lightning.yaml"
        )


class ImageLogger(Callback):
    """Every `batch_frequency` steps, writes the model's `log_images` as grids to <logdir>/images/<split>/."""

    def __init__(
        self,
        batch_frequency: int,
        max_images: int,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: dict | None = None,
    ):
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_steps = (
            [2**n for n in range(int(np.log2(batch_frequency)) + 1)] if increase_log_steps else []
        )

    @rank_zero_only
    def log_local(
        self, save_dir: str, split: str, images: dict, global_step: int, epoch: int, batch_idx: int
    ) -> None:
        root = Path(save_dir) / "images" / split
        root.mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            grid = make_grid(image, nrow=4) if image.ndim == 4 else image
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            filename = f"{name}_gs-{global_step:06}_e-{epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(array).save(root / filename)

    def check_frequency(self, check_idx: int) -> bool:
        due = check_idx % self.batch_freq == 0 or check_idx in self.log_steps
        if due and (check_idx > 0 or self.log_first_step):
            if check_idx in self.log_steps:
                self.log_steps.remove(check_idx)
            return True
        return False

    def log_img(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int, split: str
    ) -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.max_images <= 0 or not callable(getattr(pl_module, "log_images", None)):
            return
        if not self.check_frequency(check_idx):
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        for name in list(images):
            image = images[name].detach().float().cpu()
            if image.ndim == 4:
                image = image[: self.max_images]
            images[name] = image.clamp(-1.0, 1.0) if self.clamp else image
        self.log_local(
            trainer.logger.save_dir, split, images, pl_module.global_step, pl_module.current_epoch, batch_idx
        )
        if was_training:
            pl_module.train()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.disabled and pl_module.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with a total that holds after a resume: an epoch resumed after b of its batches, with
    max_steps and no max_epochs, has b + (max_steps - global_step) batches left to show, not max_steps -
    global_step (Lightning's bar then counted "54/40"); the epoch is shown without Lightning's rich bar's
    "/-2" for an unbounded max_epochs."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            done = max(trainer.fit_loop.epoch_loop.batch_progress.current.ready, 0)
            return min(trainer.num_training_batches, done + trainer.max_steps - trainer.global_step)
        return trainer.num_training_batches

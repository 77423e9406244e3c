"""A test-only Lightning callback that main.py loads by config: sends a signal to its own process at a
given step, and records the optimizer state it starts training with."""

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch


class Probe(pl.Callback):
    def __init__(self, signal_name: str | None = None, at_step: int = -1, record: str | None = None):
        self.signal = getattr(signal, signal_name) if signal_name else None
        self.at_step = at_step
        self.record = Path(record) if record else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.record is not None:
            state = {"global_step": trainer.global_step, "optimizer": trainer.optimizers[0].state_dict()}
            torch.save(state, self.record)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.signal is not None and trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signal)

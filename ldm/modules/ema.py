"""Exponential moving average of a model's trainable parameters, kept as buffers so that it is saved in
and restored from checkpoints (`model_ema.decay`, `model_ema.num_updates`, `model_ema.<name without dots>`)."""

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copy of `model`'s trainable parameters.

    Each `forward(model)` moves the shadow towards the current weights:
    `shadow -= (1 - d) * (shadow - param)`, where `d = min(decay, (1 + n) / (10 + n))` after the `n`-th
    update, so early averages warm up quickly. With `use_num_upates=False` (spelled as in the original
    config schema) `d = decay` from the start.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}.")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                # Buffer names may not contain '.'.
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow buffers, parameters) for each trainable parameter of `model`, in matching order."""
        shadow = dict(self.named_buffers())
        buffers, params = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffers.append(shadow[self.m_name2s_name[name]])
                params.append(p)
        return buffers, params

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        buffers, params = self._pairs(model)
        # shadow + (1 - d) * (param - shadow) == shadow - (1 - d) * (shadow - param)
        torch._foreach_lerp_(buffers, [p.detach() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s tracked parameters with the averages."""
        buffers, params = self._pairs(model)
        torch._foreach_copy_(params, buffers)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of `parameters` so that `restore` can bring them back after `copy_to`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the parameters saved by `store` back into `parameters` (same order)."""
        for c_param, param in zip(self.collected_params, parameters, strict=True):
            param.copy_(c_param)

"""Conditioning that changes during sampling (prompt editing, alternation), resolved per sampler step."""

from typing import Any

import torch


class ScheduledConditioning:
    """The cross-attention conditioning of a batch over a run: for each batch entry, [(end_step, [T, width])]
    in ascending end_step, all entries the same length T.

    `at(step)` is the [B, T, width] tensor for the sampler step with index `step` (0-based, counted over the
    steps the sampler runs): entry i's text whose end_step is the first >= step, the comparison A1111's
    `reconstruct_cond_batch` makes. The samplers call it when a conditioning has an `at` method.
    """

    def __init__(self, entries: list[list[tuple[int, torch.Tensor]]]):
        if not entries or not all(entries):
            raise ValueError("a scheduled conditioning needs at least one (end_step, tensor) per batch entry")
        shapes = {tuple(z.shape) for schedule in entries for _, z in schedule}
        if len(shapes) != 1:
            raise ValueError(f"scheduled conditioning tensors differ in shape: {sorted(shapes)}")
        self.entries = entries
        self._last: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.entries)

    @property
    def shape(self) -> torch.Size:
        """[B, T, width], as a tensor's shape."""
        return torch.Size((self.batch_size, *self.entries[0][0][1].shape))

    @property
    def is_constant(self) -> bool:
        """True when no entry changes during the run (then `at(0)` is the whole conditioning)."""
        return all(len(schedule) == 1 for schedule in self.entries)

    def end_steps(self) -> list[list[int]]:
        """Each entry's end steps."""
        return [[end for end, _ in schedule] for schedule in self.entries]

    def at(self, step: int) -> torch.Tensor:
        """The conditioning [B, T, width] at sampler step index `step`."""
        chosen = tuple(
            next((i for i, (end, _) in enumerate(schedule) if step <= end), len(schedule) - 1)
            for schedule in self.entries
        )
        if self._last is None or self._last[0] != chosen:
            tensor = torch.stack([schedule[i][1] for schedule, i in zip(self.entries, chosen, strict=True)])
            self._last = (chosen, tensor)
        return self._last[1]

    def padded(self, length: int, empty: torch.Tensor) -> "ScheduledConditioning":
        """Extended to `length` tokens with copies of `empty` [77, width] (the empty prompt's encoding)."""
        missing = length - self.shape[1]
        if missing == 0:
            return self
        if missing < 0 or missing % empty.shape[0]:
            raise ValueError(f"cannot pad {self.shape[1]} tokens to {length} with chunks of {empty.shape[0]}")
        filler = empty.repeat(missing // empty.shape[0], 1)
        return self._map(lambda z: torch.cat([z, filler.to(z)]))

    def to(self, *args: Any, **kwargs: Any) -> "ScheduledConditioning":
        """Every tensor moved/cast as `torch.Tensor.to(*args, **kwargs)`."""
        return self._map(lambda z: z.to(*args, **kwargs))

    def _map(self, fn: Any) -> "ScheduledConditioning":
        return ScheduledConditioning([[(end, fn(z)) for end, z in schedule] for schedule in self.entries])

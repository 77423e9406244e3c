"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR` (use them with a base lr of 1.0
times the configured rate): `LambdaLR(opt, lr_lambda=scheduler.schedule)`."""

from collections.abc import Sequence

import numpy as np


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max` over `warm_up_steps`, then a cosine decay to `lr_min`
    reached at step `max_decay_steps` and held after it."""

    def __init__(
        self,
        warm_up_steps: int,
        lr_min: float,
        lr_max: float,
        lr_start: float,
        max_decay_steps: int,
        verbosity_interval: int = 0,
    ):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.last_lr}")
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, one list entry per cycle: each cycle warms up linearly from `f_start` to `f_max`
    over `warm_up_steps`, then follows a cosine down to `f_min` at the cycle's end.

    Step `n` belongs to the first cycle whose cumulative end `sum(cycle_lengths[:k+1])` is >= n.
    """

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
        verbosity_interval: int = 0,
    ):
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError(
                "warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle each."
            )
        self.lr_warm_up_steps = warm_up_steps
        self.f_start = f_start
        self.f_min = f_min
        self.f_max = f_max
        self.cycle_lengths = cycle_lengths
        self.cum_cycles = np.cumsum([0] + list(self.cycle_lengths))
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step `n` falls in."""
        for interval, cycle_end in enumerate(self.cum_cycles[1:]):
            if n <= cycle_end:
                return interval
        raise ValueError(f"Step {n} is past the last cycle, which ends at step {self.cum_cycles[-1]}.")

    def _cycle_step(self, n: int) -> tuple[int, int]:
        """(cycle, step within that cycle), printing progress every `verbosity_interval` steps."""
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.last_f}, current cycle {cycle}")
        return cycle, n

    def _warm_up(self, cycle: int, n: int) -> float:
        return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[
            cycle
        ]

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self._cycle_step(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            t = (n - self.lr_warm_up_steps[cycle]) / (
                self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]
            )
            t = min(t, 1.0)
            f = self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + np.cos(t * np.pi))
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like `LambdaWarmUpCosineScheduler2` but after the warm-up each cycle falls linearly, reaching
    `f_min` at the cycle's end: `f_min + (f_max - f_min) * (cycle_length - n) / cycle_length`."""

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self._cycle_step(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            f = (
                self.f_min[cycle]
                + (self.f_max[cycle] - self.f_min[cycle])
                * (self.cycle_lengths[cycle] - n)
                / (self.cycle_lengths[cycle])
            )
        self.last_f = f
        return f

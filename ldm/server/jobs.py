"""One worker thread owns the model: jobs run on it one at a time, in arrival order, and report their progress
for `/progress`; `interrupt` and `skip` take effect between sampler steps.
"""

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ldm.pipeline import StopSampling


class Interrupted(StopSampling):
    """Raised from a sampler step callback: stop the job; the running batch is decoded from the sampler's last
    estimate (as A1111 returns it) and kept with the images finished before."""


class Skipped(Exception):
    """Raised from a sampler step callback: drop the current batch, go on with the next."""


@dataclass(eq=False)  # a job is itself, whatever its fields
class Job:
    """A unit of work for the model's thread: `run(job)` returns the result that `future` delivers."""

    kind: str  # "txt2img", "img2img", "load"
    run: Callable[["Job"], Any]
    id: str
    future: Future = field(default_factory=Future)
    batches: int = 1  # A1111's job_count
    batch: int = 0  # A1111's job_no: batches finished
    step: int = 0
    steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    latest_image: Any = None  # the last image this job finished (PIL), for /progress's current_image

    def on_step(self, step: int) -> None:
        """The samplers' per-step callback: count the step, then stop here if asked to."""
        self.step = step + 1
        if self.interrupted:
            raise Interrupted
        if self.skipped:
            self.skipped = False
            raise Skipped

    def start_batch(self, steps: int) -> None:
        self.step, self.steps = 0, steps

    @property
    def progress(self) -> float:
        """Fraction of the job done: finished batches plus the running batch's steps."""
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.batch + within) / max(1, self.batches))


class Worker:
    """The model's thread and its queue (FIFO, unbounded: no request is dropped)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # in arrival order, for queue positions
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit(
        self, kind: str, run: Callable[[Job], Any], job_id: str | None = None, batches: int = 1
    ) -> Job:
        job = Job(kind, run, job_id or f"task({next(self._ids)})", batches=batches)
        with self._lock:
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._waiting.remove(job)
                self.current = job
            job.started = time.time()
            try:
                job.future.set_result(job.run(job))
            except BaseException as error:  # delivered to the waiting request
                job.future.set_exception(error)
            finally:
                with self._lock:
                    self.current = None

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)

    def position(self, job_id: str) -> int | None:
        """0 for the running job, n for the n-th waiting one, None for an id not (or no longer) here."""
        with self._lock:
            if self.current is not None and self.current.id == job_id:
                return 0
            ids = [job.id for job in self._waiting]
        return ids.index(job_id) + 1 if job_id in ids else None

    def interrupt(self) -> None:
        if (job := self.current) is not None:
            job.interrupted = True

    def skip(self) -> None:
        if (job := self.current) is not None:
            job.skipped = True

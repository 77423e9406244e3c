"""How the CPU's intra-op threads run the fast paths' ops: sections on fewer threads, and many small independent
products spread over Python threads that each run their ops on their share of the intra-op threads.

torch splits every CPU op over all its threads, which then wait for each other at the end of it. A blocked
attention or a Winograd convolution is a few hundred or a few dozen small products in a row, so its threads meet
that often; given a part of the products each, they meet once (`split_over_threads`). The model's calls run on
one thread at a time (the server's model worker), so the thread count is the caller's again afterwards."""

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

_pools: dict[int, ThreadPoolExecutor] = {}  # by worker count; a forked child starts without them
os.register_at_fork(after_in_child=_pools.clear)


@contextmanager
def intra_op_threads(count: int) -> Iterator[int]:
    """torch's CPU ops on this thread run on `count` threads inside; yields the count before, which comes back
    afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def split_over_threads(work: Callable[[range], None], count: int) -> None:
    """work(part) for contiguous parts of range(count) at once, as many parts as there are intra-op threads
    (`torch.get_num_threads()`, at most `count`): the first on this thread, the others on Python threads of a
    pool, each running its ops on its share of the intra-op threads (one where there are no more threads than
    items). The parts must be independent, and `work` must use only ops autocast leaves alone (grad and
    inference mode carry over to the pool's threads, autocast does not). Inline on one thread."""
    threads = torch.get_num_threads()
    parts = min(threads, count)
    if parts <= 1:
        work(range(count))
        return
    share = threads // parts  # intra-op threads a part
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(part: range) -> None:
        torch.set_num_threads(share)  # a pool thread's OpenMP thread count is its own
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(part)

    pool = _pools.get(parts - 1) or _pools.setdefault(
        parts - 1, ThreadPoolExecutor(parts - 1, thread_name_prefix="ldm-ops")
    )
    with intra_op_threads(share):
        others = [
            pool.submit(run, range(count * i // parts, count * (i + 1) // parts)) for i in range(1, parts)
        ]
        try:
            run(range(count // parts))
        finally:
            wait(others)  # no pool thread still writes when this returns or raises
        for other in others:
            other.result()

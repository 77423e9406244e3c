"""How the CPU's intra-op threads run the fast paths' ops: one-thread sections, and many small independent
products spread over Python threads that each run their ops on one intra-op thread.

torch splits every CPU op over all its threads, which then wait for each other at the end of it. A blocked
attention or a Winograd convolution is a few hundred or a few dozen small products in a row, so its threads meet
that often; given one part of the products each, they meet once (`split_over_threads`). The model's calls run on
one thread at a time (the server's model worker), so the thread count is the caller's again afterwards."""

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

_pools: dict[int, ThreadPoolExecutor] = {}  # by worker count; a forked child starts without them
os.register_at_fork(after_in_child=_pools.clear)


@contextmanager
def one_intra_op_thread() -> Iterator[int]:
    """torch's CPU ops run on one thread inside; yields the thread count before, which comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def split_over_threads(work: Callable[[range], None], count: int) -> None:
    """work(part) for contiguous parts of range(count), one per intra-op thread (`torch.get_num_threads()`) at
    once: the first on this thread, the others on Python threads of a pool, all running their ops on one
    intra-op thread. The parts must be independent, and `work` must use only ops autocast leaves alone (grad
    and inference mode carry over to the pool's threads, autocast does not). Inline on one thread."""
    threads = min(torch.get_num_threads(), count)
    if threads <= 1:
        work(range(count))
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(part: range) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(part)

    parts = [range(count * i // threads, count * (i + 1) // threads) for i in range(threads)]
    pool = _pools.get(threads - 1) or _pools.setdefault(
        threads - 1, ThreadPoolExecutor(threads - 1, thread_name_prefix="ldm-ops")
    )
    with one_intra_op_thread():
        others = [pool.submit(run, part) for part in parts[1:]]
        try:
            run(parts[0])
        finally:
            wait(others)  # no worker still writes when this returns or raises
        for other in others:
            other.result()

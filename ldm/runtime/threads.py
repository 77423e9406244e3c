"""How the CPU's intra-op threads run the fast paths' ops: sections on fewer threads (`intra_op_threads`).

Independent products (Winograd's, the blocked attention's) run one after another, each over all the threads:
split over Python threads, one intra-op thread each, they measured faster in one process alternating both forms
but slower in fresh processes, which is how the scripts run (0.90-0.93x the bf16 512² step without the split,
0.80-0.89x the fp32 256² one; BENCHMARKS.md, session 21). The model's calls run on one thread at a time (the
server's model worker), so the thread count is the caller's again afterwards."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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

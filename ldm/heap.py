"""glibc malloc's heap, as the CPU runtime tunes it: keep what is freed for reuse, hand it back between the
models, and fault fresh memory in ahead of time on an idle core. Linux/glibc only (elsewhere every function is a
no-op, and those that answer say False). Imports no torch, so a script can start `warm_heap` before its heavy
imports."""

import ctypes
import mmap
import sys
import threading
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in writable, as writing it would, in one call
WARM_CHUNK_BYTES = 2**26  # `warm_heap` faults this much at a time, and stops between two chunks when released


def libc_function(name: str) -> Callable | None:
    """The C library's function `name` on Linux (glibc's mallopt, malloc_trim, madvise); None elsewhere.
    ctypes releases the GIL while it runs."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), name, None)


def _mallopt(parameter: int, value: int) -> bool:
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(parameter, value))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of returning them to the OS.

    glibc serves every block over 32 MB with its own mmap and unmaps it when freed, so each large activation of a
    UNet step is page-faulted in afresh at every step (BENCHMARKS.md has the cost). With this, they come from the
    heap, which keeps what is freed; peak RSS grows by the heap's spare room."""
    return _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def trim_heap() -> bool:
    """Return the heap's free memory to the OS (glibc's malloc_trim)."""
    malloc_trim = libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


class _WarmBlock:
    """A block of the heap being faulted in by a daemon thread, `WARM_CHUNK_BYTES` at a time."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.address, self.nbytes = address, nbytes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fault_in, name="warm_heap", daemon=True)
        self.thread.start()

    def _fault_in(self) -> None:
        madvise, memset = libc_function("madvise"), libc_function("memset")
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        memset.argtypes, memset.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], ctypes.c_void_p
        page = mmap.PAGESIZE
        start = -(-self.address // page) * page  # whole pages inside the block
        end = (self.address + self.nbytes) // page * page
        for begin in range(start, end, WARM_CHUNK_BYTES):
            if self.stop.is_set():
                return
            size = min(WARM_CHUNK_BYTES, end - begin)
            if madvise(begin, size, _MADV_POPULATE_WRITE) != 0:  # before Linux 5.14: write it
                memset(begin, 0, size)


_warm_block: _WarmBlock | None = None


def warm_heap(nbytes: int) -> bool:
    """Fault `nbytes` of fresh heap memory in on a background thread, while this one goes on (imports, loading),
    until `release_warm_heap` hands the block to malloc for what comes next. Each fresh page costs a fault and
    the kernel's zeroing of it (in a VM often a fault on the host too: 0.3-2.5 GB/s here, BENCHMARKS.md); warmed
    ahead on a core the imports leave idle, the first UNet step's packed weights find their pages there.

    Also makes freed memory stay in the heap (`keep_freed_memory`) and every thread allocate from the one heap
    (one malloc arena), so a model run on another thread reuses the block too. False where nothing was started:
    not glibc, nothing asked, or the heap cannot grow by `nbytes`."""
    global _warm_block
    malloc = libc_function("malloc")
    if malloc is None or nbytes <= 0 or _warm_block is not None or not keep_freed_memory():
        return False
    _mallopt(_M_ARENA_MAX, 1)
    malloc.argtypes, malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    address = malloc(nbytes)
    if not address:
        return False
    _warm_block = _WarmBlock(address, nbytes)
    return True


def release_warm_heap(*hook_args: object) -> None:
    """Stop `warm_heap`'s thread after its current chunk and free its block into the heap, where the next
    allocations take it; a no-op without one. Also a forward pre-hook (its arguments are ignored)."""
    global _warm_block
    block, _warm_block = _warm_block, None
    if block is None:
        return
    block.stop.set()
    block.thread.join()
    free = libc_function("free")
    free.argtypes = [ctypes.c_void_p]
    free(block.address)

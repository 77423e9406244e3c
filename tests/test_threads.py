"""ldm/runtime/threads.py: one-thread sections and independent products split over Python threads."""

import threading
import time

import pytest
import torch

from ldm.runtime import convolution, fast_paths
from ldm.runtime.threads import intra_op_threads, split_over_threads


@pytest.fixture
def two_threads():
    with intra_op_threads(2):
        yield


def test_intra_op_threads_give_the_count_back_after_an_error(two_threads):
    with pytest.raises(RuntimeError), intra_op_threads(1) as before:
        assert before == 2 and torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "threads, count, parts, share", [(2, 1, 1, 2), (2, 2, 2, 1), (2, 7, 2, 1), (4, 2, 2, 2), (4, 3, 3, 1)]
)
def test_split_covers_every_item_once_in_parts_on_their_share_of_the_threads(threads, count, parts, share):
    seen: list[tuple[str, list[int], int]] = []
    lock = threading.Lock()
    all_started = threading.Barrier(parts, timeout=10)  # breaks unless the parts run at once

    def work(part: range) -> None:
        with lock:
            seen.append((threading.current_thread().name, list(part), torch.get_num_threads()))
        all_started.wait()

    with intra_op_threads(threads):
        split_over_threads(work, count)
        assert torch.get_num_threads() == threads
    assert sorted(item for _, part, _ in seen for item in part) == list(range(count))
    assert len({name for name, _, _ in seen}) == len(seen) == parts
    assert all(part == list(range(part[0], part[0] + len(part))) for _, part, _ in seen)  # contiguous
    assert all(threads_seen == share for _, _, threads_seen in seen)


def test_split_carries_grad_and_inference_mode_and_waits_for_every_part_before_raising(two_threads):
    done = []

    def work(part: range) -> None:
        if part.start == 0:
            raise ValueError("first part")
        time.sleep(0.1)  # still running when the first part has failed
        out[part.start : part.stop] = 1.0  # an in-place write to an inference tensor needs inference mode
        done.append(part)

    with torch.inference_mode():
        out = torch.zeros(8)
        with pytest.raises(ValueError, match="first part"):
            split_over_threads(work, 8)
    assert done == [range(4, 8)] and out.tolist() == [0.0] * 4 + [1.0] * 4
    grads = []
    with torch.no_grad():
        split_over_threads(lambda part: grads.append(torch.is_grad_enabled()), 2)
    assert grads == [False, False]
    assert torch.get_num_threads() == 2


def inline(work, count):
    work(range(count))


def test_winograd_and_blocked_attention_split_equal_them_inline(two_threads, monkeypatch):
    """The products split over the threads give the numbers of the same products made one after another."""
    torch.manual_seed(0)
    conv = fast_paths.WinogradConv2d(640, 640, 3, padding=1)
    conv.packed_dtypes = frozenset({torch.float32})
    x = torch.randn(2, 640, 16, 16)
    q, k, v = (torch.randn(2, 3, 600, 40) for _ in range(3))
    monkeypatch.setattr(fast_paths, "winograd_tiles", lambda *args: convolution.F2X2)
    with torch.inference_mode():
        split = conv(x), fast_paths.blocked_attention(q, k, v, 40**-0.5)
        monkeypatch.setattr(fast_paths, "split_over_threads", inline)
        plain = conv(x), fast_paths.blocked_attention(q, k, v, 40**-0.5)
    for a, b in zip(split, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

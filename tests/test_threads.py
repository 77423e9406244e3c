"""ldm/runtime/threads.py: sections of ops on fewer intra-op threads."""

import pytest
import torch

from ldm.runtime.threads import intra_op_threads


@pytest.fixture
def two_threads():
    with intra_op_threads(2):
        yield


def test_intra_op_threads_give_the_count_back_after_an_error(two_threads):
    with pytest.raises(RuntimeError), intra_op_threads(1) as before:
        assert before == 2 and torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2

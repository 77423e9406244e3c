"""The memory budget's refusals name sizes a user can read: MiB under 1 GiB, GiB from there."""

import pytest

from ldm.errors import UserError
from ldm.runtime.budget import GIB, check_fits, estimate, size


def test_sizes_read_in_mib_under_one_gib_and_gib_from_there():
    assert size(212 * 2**20) == "212 MiB" and size(GIB - 1) == "1024 MiB"
    assert size(GIB) == "1.0 GiB" and size(3.25 * GIB) == "3.2 GiB"


def test_a_run_over_the_limit_is_refused_with_its_need_in_readable_units():
    need = estimate(64, 64, 1, True, False, 0).total
    assert need < GIB  # a tiny run: its need in MiB, not "0.0 GiB"
    with pytest.raises(UserError) as refused:
        check_fits(64, 64, 1, True, False, 0, "cpu", limit_gib=need / GIB / 2)
    assert f"needs about {size(need)} at least" in str(refused.value) and "0.0 GiB" not in str(refused.value)
    check_fits(64, 64, 1, True, False, 0, "cpu", limit_gib=need / GIB * 2)  # fits: no error

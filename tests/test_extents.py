"""merge_runs: neighbours merge only when one run can describe both.

``map`` prints one line per run with its host offset, so a merge across a
jump in host offsets reports data at the wrong place in the file.
"""

from __future__ import annotations

import pytest

from corefmt.extents import ChainExtent, Extent, merge_runs

BLOCK = 4096


def _data(offset: int, host: int | None, length: int = BLOCK, **fields) -> Extent:
    return Extent(offset, length, data=True, zero=False, host_offset=host, **fields)


def _chain(offset: int, host: int | None, length: int = BLOCK, **fields) -> ChainExtent:
    return ChainExtent(offset, length, data=True, zero=False, depth=0, node=None,
                       host_offset=host, **fields)


@pytest.mark.parametrize("make", [_data, _chain])
def test_runs_with_contiguous_host_offsets_merge(make):
    merged = merge_runs([make(0, 8 * BLOCK), make(BLOCK, 9 * BLOCK),
                         make(2 * BLOCK, 10 * BLOCK, length=2 * BLOCK)])
    assert merged == [make(0, 8 * BLOCK, length=4 * BLOCK)]


@pytest.mark.parametrize("make", [_data, _chain])
@pytest.mark.parametrize("second_host", [5 * BLOCK, 9 * BLOCK, 7 * BLOCK, None])
def test_a_jump_in_host_offsets_keeps_runs_apart(make, second_host):
    first = make(0, 6 * BLOCK)  # contiguous would be 7 * BLOCK
    second = make(BLOCK, second_host)
    merged = merge_runs([first, second])
    if second_host == 7 * BLOCK:
        assert merged == [make(0, 6 * BLOCK, length=2 * BLOCK)]
    else:
        assert merged == [first, second]


@pytest.mark.parametrize("make", [_data, _chain])
def test_the_merged_run_keeps_checking_contiguity(make):
    """The third run continues the second's host range, not the first's."""
    runs = [make(0, 0), make(BLOCK, BLOCK), make(2 * BLOCK, 3 * BLOCK)]
    assert merge_runs(runs) == [make(0, 0, length=2 * BLOCK), runs[2]]


@pytest.mark.parametrize("make", [_data, _chain])
def test_runs_without_host_offsets_merge_and_mixed_ones_do_not(make):
    assert merge_runs([make(0, None), make(BLOCK, None)]) == [make(0, None, length=2 * BLOCK)]
    assert merge_runs([make(0, None), make(BLOCK, 0)]) == [make(0, None), make(BLOCK, 0)]


@pytest.mark.parametrize("make", [_data, _chain])
@pytest.mark.parametrize("field", [{"compressed": True}, {"host_child": "data_file"}])
def test_other_kinds_stay_apart_even_when_contiguous(make, field):
    runs = [make(0, 0), make(BLOCK, BLOCK, **field)]
    assert merge_runs(runs) == runs


def test_gaps_and_empty_runs():
    gap = [_data(0, None), _data(2 * BLOCK, None)]
    assert merge_runs(gap) == gap  # not neighbours: a hole between them
    assert merge_runs([_data(0, None), _data(BLOCK, None, length=0),
                       _data(BLOCK, None)]) == [_data(0, None, length=2 * BLOCK)]
    zero = Extent(BLOCK, BLOCK, data=False, zero=True)
    assert merge_runs([_data(0, None), zero]) == [_data(0, None), zero]
    assert merge_runs([]) == []

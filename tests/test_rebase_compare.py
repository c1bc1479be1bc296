"""The rebase's comparison: the runs where two buffers differ, widened to
whole allocation units counted from the image's start, against a
sector-by-sector reference (qemu's compare_buffers)."""

from __future__ import annotations

import random

import pytest

from corefmt.limits import Limits
from corefmt.ops.rebase import COMPARE_BLOCK, SECTOR, compare_unit, differing_runs


def _reference(old: bytes, new: bytes, unit: int, origin: int) -> list[tuple[int, int]]:
    """Units (cut at the buffer's ends) holding a differing sector, merged."""
    runs: list[tuple[int, int]] = []
    position = 0
    while position < len(old):
        end = min(len(old), position + unit - (origin + position) % unit)
        if old[position:end] != new[position:end]:
            if runs and runs[-1][1] == position:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((position, end))
        position = end
    return runs


def _pair(rng: random.Random, length: int) -> tuple[bytes, bytes]:
    """Two buffers equal but for sector-sized runs of differences."""
    old = bytearray(rng.randbytes(length))
    new = bytearray(old)
    for _ in range(rng.randrange(0, 12)):
        start = rng.randrange(0, length // SECTOR) * SECTOR
        count = rng.choice((1, 1, 2, 5, 40, 300))
        end = min(length, start + count * SECTOR)
        new[start:end] = rng.randbytes(end - start)
    return bytes(old), bytes(new)


@pytest.mark.parametrize("unit", [SECTOR, 2048, 7680, COMPARE_BLOCK, 2 * 1024 * 1024])
def test_runs_are_whole_units_counted_from_the_image_start(unit):
    rng = random.Random(unit)
    for _ in range(40):
        length = rng.choice((SECTOR, 2 * SECTOR, 3 * SECTOR, 64 * 1024, 300 * 1024,
                             3 * 1024 * 1024))
        origin = rng.randrange(0, 8 * 1024 * 1024 // SECTOR) * SECTOR
        old, new = _pair(rng, length)
        assert list(differing_runs(old, new, unit, origin)) == _reference(old, new, unit,
                                                                           origin)


def test_a_short_buffer_across_a_unit_edge_differs_only_in_the_unit_that_differs():
    old, new = bytes(1024), bytes(512) + b"x" * 512
    assert list(differing_runs(old, new, 2048, 1536)) == [(512, 1024)]  # 2048 starts a unit
    assert list(differing_runs(new, old, 2048, 1536)) == [(512, 1024)]


def test_equal_buffers_have_no_runs():
    data = random.Random(1).randbytes(1024 * 1024)
    assert list(differing_runs(data, bytearray(data), 7680, 4096)) == []


def test_the_unit_is_the_allocation_unit_in_whole_sectors():
    assert compare_unit(Limits(copy_granularity=65536, allocation_granularity=65536)) == 65536
    assert compare_unit(Limits(copy_granularity=65536, allocation_granularity=2048)) == 2048
    assert compare_unit(Limits(allocation_granularity=1000)) == SECTOR
    # A driver that declares no allocation unit (every plugin written before
    # there was one) gets qemu's sectors, whatever its copy granularity.
    assert compare_unit(Limits(copy_granularity=65536)) == SECTOR
    # -c writes whole clusters, which can be stored compressed.
    assert compare_unit(Limits(copy_granularity=65536, allocation_granularity=2048),
                        compress=True) == 65536

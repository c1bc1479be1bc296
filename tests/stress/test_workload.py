"""The workload sizes requests from the driver's copy granularity."""

from __future__ import annotations

import random

from corefmt.stress.workload import FLUSH, generate

MiB = 1024 * 1024


def _partial_unit_writes(granularity: int, size: int) -> float:
    """Share of requests that leave a partial copy unit at both ends."""
    ops = [op for batch in generate(random.Random(3), size, 2000, granularity)
           for op in batch if op.kind != FLUSH]
    straddling = [op for op in ops
                  if op.offset // granularity != (op.end - 1) // granularity
                  and op.offset % granularity and op.end % granularity]
    return len(straddling) / len(ops)


def test_requests_straddle_copy_units_whatever_their_size():
    # 2 MiB units (qcow2's largest clusters) in a 32 MiB image: random requests
    # of at most 128 KiB would almost never cross a unit boundary.
    assert _partial_unit_writes(2 * MiB, 32 * MiB) > 0.2
    assert _partial_unit_writes(64 * 1024, 4 * MiB) > 0.2


def test_sector_granularity_keeps_the_old_mix():
    ops = [op for batch in generate(random.Random(5), 4 * MiB, 500) for op in batch]
    assert len(ops) == 500

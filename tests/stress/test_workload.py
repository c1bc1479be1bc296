"""The workload sizes requests from the driver's copy granularity, and
mixes prefetch in over a base."""

from __future__ import annotations

import random

from corefmt.storage.simulated import SimRequest
from corefmt.stress.faults import COMPLETION_STARTS, FaultPlan
from corefmt.stress.report import replay_command
from corefmt.stress.runner import StressConfig
from corefmt.stress.workload import (
    FLUSH,
    PREFETCH,
    PREFETCH_ALL,
    PREFETCH_KINDS,
    SMALL_MAX,
    generate,
)

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


def test_prefetch_joins_only_when_asked_and_completes_alone_near_the_end():
    runs = [generate(random.Random(seed), 4 * MiB, 40, 64 * 1024, prefetch=True)
            for seed in range(90)]
    whole = [batches for batches in runs
             if any(op.kind == PREFETCH_ALL for batch in batches for op in batch)]
    assert 20 <= len(whole) <= 40  # about a third
    for batches in whole:
        index = next(i for i, batch in enumerate(batches) if batch[0].kind == PREFETCH_ALL)
        assert len(batches[index]) == 1 and batches[index + 1:]  # alone, then more batches
        assert batches[index][0].tag >= 40 - 17
    ranges = [op for batches in runs for batch in batches for op in batch if op.kind == PREFETCH]
    assert ranges and any(op.length > SMALL_MAX * 16 for op in ranges)
    plain = [op for batch in generate(random.Random(5), 4 * MiB, 500) for op in batch]
    assert not any(op.kind in PREFETCH_KINDS for op in plain)


def test_a_prefetch_fault_counts_from_the_first_flush():
    """A fault planned in a whole-image prefetch's completion: its index counts
    from the op's first flush, so the fills before it never take it."""
    plan = FaultPlan(0, crash_tag=7, crash_disk="d", crash_index=1,
                     anchors={7: COMPLETION_STARTS})
    kinds = ["write", "write", "flush", "write", "flush"]
    faults = [plan(SimRequest("d", kind, 0, 0, 7, index)) for index, kind in enumerate(kinds)]
    assert [fault is not None for fault in faults] == [False, False, False, True, False]


def test_the_replay_command_keeps_prefetch_off():
    assert "--no-prefetch" in replay_command(StressConfig(base="raw", prefetch=False), 3)
    assert "--no-prefetch" not in replay_command(StressConfig(base="raw"), 3)

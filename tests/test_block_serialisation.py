"""Tracked requests serialise overlapping read-modify-writes.

Free-running threads almost never interleave a read-modify-write with
another write to the same block, so a test with plain threads passes with
request tracking switched off. Here the stress tester's scheduler runs the
writers on simulated storage: every storage request yields, so one
writer's RMW read and write straddle the others' (as on a slow disk), and
the stress model says which contents the racing writes may leave.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import corefmt
from corefmt import plugins
from corefmt.block.tracked import RequestTracker
from corefmt.storage.simulated import SimStorageDriver, request_tag
from corefmt.stress.model import ImageModel, Outcome
from corefmt.stress.scheduler import BatchScheduler
from corefmt.stress.workload import WRITE, Op

KiB = 1024
IMAGE_SIZE = 64 * KiB
#: The storage's alignment: raw read-modify-writes whole 4 KiB blocks.
STORAGE_ALIGNMENT = 4096
#: Writers per race, each unaligned and overlapping its neighbours' blocks.
WRITERS = 6
#: Scheduler seeds per format: each interleaves the writers differently.
SCHEDULES = 12
#: The ranges race around these two blocks: writes of 300..1500 bytes.
RACE_START, RACE_SPAN = 3 * KiB, 6 * KiB


def _writes(seed: int) -> list[Op]:
    rng = random.Random(seed)
    ops = []
    for tag in range(WRITERS):
        length = rng.randint(300, 1500)
        offset = RACE_START + rng.randrange(RACE_SPAN - length)
        ops.append(Op(tag, WRITE, offset, length, bytes([tag + 1]) * length))
    return ops


def race_unaligned_writes(format: str, seed: int) -> list[str]:
    """Race ``WRITERS`` overlapping unaligned writes under a seed's schedule;
    returns the model's complaints about what the image then holds."""
    sim = plugins.registry().storages["sim"]
    assert isinstance(sim, SimStorageDriver)
    path = f"sim:serialisation-{format}-{seed}"
    corefmt.create(path, format, IMAGE_SIZE)
    disk = sim.disk(path)
    disk.alignment = STORAGE_ALIGNMENT
    scheduler = BatchScheduler(random.Random(seed))
    ops = _writes(seed)
    try:
        with corefmt.open(path, format) as node:
            disk.gate = scheduler.hold
            scheduler.begin(op.tag for op in ops)

            def write(op: Op) -> Outcome:
                with scheduler.task(op.tag), request_tag(op.tag):
                    assert op.data is not None
                    node.write(op.offset, op.data)
                return Outcome(True)
            with ThreadPoolExecutor(WRITERS) as pool:
                outcomes = list(pool.map(write, ops))
            disk.gate = None
            model = ImageModel(bytes(IMAGE_SIZE))
            problems = model.apply_batch(ops, outcomes)
            problems += model.check_current(node.read(0, IMAGE_SIZE), "after the race")
            assert node._tracker.in_flight == 0
    finally:
        sim.forget(path)
    return problems


@contextlib.contextmanager
def _untracked(self: RequestTracker, start: int, end: int,
               exclusive: bool) -> Iterator[None]:
    yield None


@pytest.fixture(params=["raw", "blockmap"])
def format_name(request: pytest.FixtureRequest) -> str:
    if request.param == "blockmap":
        request.getfixturevalue("blockmap")
    return request.param


def test_concurrent_overlapping_unaligned_writes_are_serialised(format_name):
    for seed in range(SCHEDULES):
        assert race_unaligned_writes(format_name, seed) == [], f"schedule {seed}"


def test_the_race_loses_writes_without_request_tracking(format_name, monkeypatch):
    """The same race with tracking disabled: the test above would fail."""
    monkeypatch.setattr(RequestTracker, "track", _untracked)
    lost = [seed for seed in range(SCHEDULES) if race_unaligned_writes(format_name, seed)]
    assert len(lost) >= SCHEDULES // 2, lost

"""Power cuts during rebase, stream and commit (simulated disks with a
volatile cache, corefmt.storage.simulated): cut right after the step that
makes the old state unnecessary (the new backing reference, the emptying
of the top), every seed's surviving disks must still show the guest data.
Catches a missing flush before that step: the copied data would be lost
while the reference (or the emptied table) survives."""

from __future__ import annotations

import random

import pytest

import corefmt
from corefmt import plugins
from corefmt.errors import CorefmtError
from corefmt.ops.check import check_node
from corefmt.ops.commit import commit_node
from corefmt.ops.rebase import rebase_node
from corefmt.ops.stream import stream_node
from corefmt.storage.simulated import SimFault, SimRequest

SIZE = 1024 * 1024
SEEDS = range(12)


def _sim():
    return plugins.registry().storages["sim"]


def _chain(prefix: str) -> bytes:
    """qcow2 bot <- qcow2 mid <- qcow2 top on simulated disks; top's guest view.

    The base's name and format are as long as mid's: qcow2's header (qemu's
    too) spans two sectors, so a cut may keep the new length and format with
    the old name; with equal lengths and formats that is the old reference.
    """
    corefmt.create(f"{prefix}bot", "qcow2", SIZE)
    with corefmt.open(f"{prefix}bot", "qcow2") as base:
        base.write(0, b"\x01" * (SIZE // 2))
    corefmt.create(f"{prefix}mid", "qcow2", backing="bot", backing_format="qcow2")
    with corefmt.open(f"{prefix}mid", "qcow2") as mid:
        mid.write(128 * 1024, b"\x02" * (256 * 1024))
        mid.write(768 * 1024, b"\x04" * 4096)
    corefmt.create(f"{prefix}top", "qcow2", backing="mid", backing_format="qcow2")
    with corefmt.open(f"{prefix}top", "qcow2") as top:
        top.write(300 * 1024, b"\x03" * (100 * 1024))
        return top.read(0, SIZE)


def _cut_after(prefix: str, seed: int, trigger) -> None:
    """Cut the power of every disk of the chain at the first request of the
    top after ``trigger(request)`` matched one."""
    rng = random.Random(seed)
    sim = _sim()
    disks = [sim.disk(name) for name in sim.names(prefix)]
    for disk in disks:
        disk.sync()
    seen = []

    def policy(request: SimRequest) -> SimFault | None:
        if seen:
            for disk in disks:
                if disk.name != request.disk:
                    disk.power_cut(rng)
            return SimFault(power_cut=seed)
        if trigger(request):
            seen.append(request)
        return None

    sim.disk(f"{prefix}top").policy = policy


def _power_back(prefix: str) -> None:
    sim = _sim()
    for name in sim.names(prefix):
        disk = sim.disk(name)
        disk.policy = None
        if disk.crash_image is not None:
            disk.restore(disk.crash_image)


def _header_write(request: SimRequest) -> bool:
    return request.kind == "write" and request.offset == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("verb", ["rebase", "stream"])
def test_power_cut_after_the_reference_changes(seed, verb):
    prefix = f"sim:cut-{verb}-{seed}/"
    expected = _chain(prefix)
    _cut_after(prefix, seed, _header_write)
    with pytest.raises(CorefmtError), corefmt.open(f"{prefix}top", "qcow2") as top:
        base = top.backing.backing
        if verb == "rebase":
            rebase_node(top, base, "bot", "qcow2")
        else:
            stream_node(top, f"{prefix}bot")
    _power_back(prefix)
    with corefmt.open(f"{prefix}top", "qcow2", read_only=True) as top:
        assert top.read(0, SIZE) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_power_cut_while_the_top_is_emptied(seed):
    prefix = f"sim:cut-commit-{seed}/"
    corefmt.create(f"{prefix}base", "raw", SIZE)
    with corefmt.open(f"{prefix}base", "raw") as base:
        base.write(0, b"\x01" * (SIZE // 2))
    corefmt.create(f"{prefix}top", "qcow2", backing="base", backing_format="raw")
    with corefmt.open(f"{prefix}top", "qcow2") as top:
        top.write(300 * 1024, b"\x03" * (300 * 1024))
        expected = top.read(0, SIZE)
    # The top is written only when it is emptied: cut at its next request.
    _cut_after(prefix, seed, lambda request: request.kind == "write")
    with pytest.raises(CorefmtError), corefmt.open(f"{prefix}top", "qcow2") as top:
        commit_node(top)
    _power_back(prefix)
    with corefmt.open(f"{prefix}top", "qcow2", read_only=True) as top:
        assert top.read(0, SIZE) == expected



def _nth_write(count: int):
    """A trigger matching the top's ``count``-th write from now."""
    writes = []

    def trigger(request: SimRequest) -> bool:
        if request.kind == "write":
            writes.append(request)
        return len(writes) == count

    return trigger


#: qcow2's rebuild of an emptied top (dirty bit, L1 zeroed, first clusters
#: zeroed, refcount table entry, header, refcount block, clean bit) writes
#: the top this many times; a cut after each must keep the guest view.
REBUILD_WRITES = 7


@pytest.mark.parametrize("writes", range(1, REBUILD_WRITES + 1))
def test_power_cut_at_each_step_of_the_empty_rebuild(writes):
    prefix = f"sim:cut-rebuild-{writes}/"
    corefmt.create(f"{prefix}base", "raw", SIZE)
    corefmt.create(f"{prefix}top", "qcow2", backing="base", backing_format="raw")
    with corefmt.open(f"{prefix}top", "qcow2") as top:
        top.write(0, b"\x05" * (SIZE // 4))
        top.write(SIZE // 2, b"\x06" * 4096)
        expected = top.read(0, SIZE)
    _cut_after(prefix, writes, _nth_write(writes))
    with pytest.raises(CorefmtError), corefmt.open(f"{prefix}top", "qcow2") as top:
        commit_node(top)
    _power_back(prefix)
    with corefmt.open(f"{prefix}top", "qcow2") as top:  # a dirty image is repaired here
        assert top.read(0, SIZE) == expected
        result = check_node(top)
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)

"""qcow2 under blkdebug: an I/O error, or the power going, at each named
metadata event of the driver (corefmt_qcow2.events). Whatever fails, the
image opens again, qemu-img check finds no corruption (leaks are allowed,
as after a crash) and everything flushed before is intact.

Power cuts happen on a simulated disk (``sim:``): the writes it had not
flushed survive or not, sector by sector, as blkdebug's ``seed`` picks, so
a missing flush between two ordered writes shows as a corrupt image."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess

import pytest
from corefmt_qcow2 import events

import corefmt
from corefmt import CorefmtError, RequestFlags, plugins
from tests.conftest import fill

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"

KiB, MiB = 1024, 1024 * 1024
SIZE = 8 * MiB

#: Every event the driver names, and option sets that reach them all
#: (512-byte clusters with 64-bit refcounts allocate refcount blocks and grow
#: the refcount table within a few MiB; lazy refcounts rewrite the header).
EVENTS = (events.L1_UPDATE, events.L2_ALLOC_WRITE, events.L2_UPDATE, events.REFBLOCK_UPDATE,
          events.REFBLOCK_ALLOC, events.REFTABLE_UPDATE, events.REFTABLE_GROW,
          events.CLUSTER_ALLOC, events.COW_WRITE, events.HEADER_UPDATE,
          events.L1_GROW_WRITE_TABLE, events.CLUSTER_ALLOC_BYTES, events.WRITE_COMPRESSED,
          events.CLUSTER_ALLOC_SPACE)
#: Events the 512-byte clusters never reach: no header rewrite without lazy
#: refcounts, and no new run as long as ZERO_BEFORE_WRITE_MIN (an L2 table
#: there maps 32 KiB).
SMALL_CLUSTERS_MISS = {events.HEADER_UPDATE, events.CLUSTER_ALLOC_SPACE}
OPTION_SETS = {
    "default": "",
    "c512-rb64": "cluster_size=512,refcount_bits=64",
    "lazy": "lazy_refcounts=on",
    "extl2": "extended_l2=on",
}
ACTIONS = ("error", "powercut")


#: Which unflushed writes survive a power cut (blkdebug's ``seed``).
SURVIVOR_SEEDS = (0, 1, 2)


def _spec(path: str, event: str, action: str, seed: int = 0) -> dict:
    return {"driver": "qcow2",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": event, "errno": 5, "once": True,
                                       "action": action, "seed": seed}],
                     "image": {"driver": "file", "filename": path}}}


def _run(request, *args) -> None:
    request(*args)


def _carry_on(request, *args) -> None:
    """A request whose failure the caller shrugs off, as a guest retries."""
    with contextlib.suppress(CorefmtError):
        request(*args)


def _workload(disk, step=_run, grow: bool = True) -> None:
    """Something of every kind: new clusters (and tables, refcount blocks),
    copy-on-write into zero clusters, zeroing, a discard, a resize, flushes.
    Each request goes through ``step`` (``_carry_on``: failures are ignored
    and the workload goes on, so what a failed update left in memory is used).
    Without ``grow`` the refcount table never moves (a move rewrites every
    entry from memory, which would hide an entry memory has and disk lacks)."""
    for index in range(24):
        step(disk.write, index * 320 * KiB + 16 * KiB + 512, fill(6 * KiB, index))
    step(disk.write_zeroes, 2 * MiB, 128 * KiB)
    step(disk.write, 2 * MiB + 4 * KiB, fill(1 * KiB, 99))  # into the zeroed (zero) clusters
    step(disk.discard, 5 * MiB, 256 * KiB)
    # Compressed clusters packed into shared host clusters, one of them then
    # overwritten in place of a compressed one, another discarded.
    step(disk.write, 3 * MiB, fill(16, 5) * 8192, RequestFlags.COMPRESSED)
    step(disk.write, 3 * MiB, fill(16, 6) * 4096, RequestFlags.COMPRESSED)
    step(disk.discard, 3 * MiB + 64 * KiB, 64 * KiB)
    step(disk.flush)
    if not grow:
        return
    step(disk.truncate, 64 * MiB)  # a bigger L1 for the small clusters
    # Past the first refcount table (512-byte clusters).
    step(disk.write, 60 * MiB, fill(2 * MiB, 7))
    step(disk.flush)


def _qemu_check(path: str) -> dict:
    """qemu-img check after the fault; a dirty image (lazy refcounts) is first
    opened read-write, which rebuilds its refcounts as qemu's open would."""
    info = subprocess.run([QEMU_IMG, "info", "--output=json", path], capture_output=True,
                          text=True, check=True)
    if json.loads(info.stdout).get("dirty-flag"):
        with corefmt.open(path, "qcow2"):
            pass
    result = subprocess.run([QEMU_IMG, "check", "--output=json", path], capture_output=True,
                            text=True, check=False)
    assert result.returncode in (0, 3), result.stdout + result.stderr  # clean or leaks only
    return json.loads(result.stdout)


def _fresh(path: str, options: str) -> dict[int, bytes]:
    """A new image with some data written and flushed."""
    corefmt.create(path, "qcow2", SIZE, options=options)
    flushed = {offset: fill(8 * KiB, offset) for offset in (0, 1 * MiB + 4 * KiB, 7 * MiB)}
    with corefmt.open(path, "qcow2") as disk:
        for offset, data in flushed.items():
            disk.write(offset, data)
    return flushed


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_a_fault_at_every_event_keeps_the_image_sound(tmp_path, options, action):
    seen: set[str] = set()
    seeds = SURVIVOR_SEEDS if action == "powercut" else (0,)
    for number, (event, seed) in enumerate(itertools.product(EVENTS, seeds)):
        path = (f"sim:{tmp_path.name}-{number}" if action == "powercut"
                else str(tmp_path / "image.qcow2"))
        flushed = _fresh(path, options)
        try:
            with corefmt.open(_spec(path, event, action, seed)) as disk:
                try:
                    _workload(disk)
                finally:
                    seen.update(disk.storage.info()["events"])
        except CorefmtError:
            pass  # the fault, reported (by the request or by close)
        if action == "powercut":
            disk_below = plugins.registry().storage_for(path).disk(path)
            if disk_below.dead:
                disk_below.restore(disk_below.crash_image or b"")
            copy = tmp_path / "crashed.qcow2"
            copy.write_bytes(bytes(disk_below.current))
            _qemu_check(str(copy))
            path = str(copy)
        else:
            _qemu_check(path)
        with corefmt.open(path, "qcow2", read_only=True) as disk:
            for offset, data in flushed.items():
                assert disk.read(offset, len(data)) == data, (event, seed, offset)
    if options == OPTION_SETS["c512-rb64"]:
        # This set reaches every metadata event at least once.
        assert set(EVENTS) - SMALL_CLUSTERS_MISS <= seen, set(EVENTS) - seen
    if options == OPTION_SETS["default"]:
        assert events.CLUSTER_ALLOC_SPACE in seen


@pytest.mark.parametrize("grow", [False, True], ids=["table-stays", "table-grows"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_the_image_goes_on_sound_after_a_failed_update(tmp_path, options, grow):
    """An I/O error at one event, then more requests on the same open image
    and a clean close: what memory kept of the failed update must match the
    disk (a refcount table entry set in memory before its write succeeded
    left an L2 table with no refcount block once the write failed; found by
    corefmt stress, seed 116, cluster_size=512, refcount_bits=64)."""
    path = str(tmp_path / "image.qcow2")
    for event in EVENTS:
        flushed = _fresh(path, options)
        try:
            with corefmt.open(_spec(path, event, "error")) as disk:
                _workload(disk, _carry_on, grow)
        except CorefmtError:
            pass  # a close that could not flush, reported
        _qemu_check(path)
        with corefmt.open(path, "qcow2", read_only=True) as disk:
            for offset, data in flushed.items():
                assert disk.read(offset, len(data)) == data, (event, offset)


def test_each_event_is_really_named(tmp_path):
    """A fault at each event fails something: the events are emitted at
    their writes (a renamed or dropped event turns this red)."""
    path = str(tmp_path / "image.qcow2")
    for event in EVENTS:
        _fresh(path, ("lazy_refcounts=on" if event in SMALL_CLUSTERS_MISS
                      else "cluster_size=512,refcount_bits=64,lazy_refcounts=on"))
        failed = False
        try:
            with corefmt.open(_spec(path, event, "error")) as disk:
                _workload(disk)
        except CorefmtError:
            failed = True
        assert failed, f"no write failed at {event}"


def test_the_zeroing_of_a_new_run_is_a_write_zeroes_request_blkdebug_sees(tmp_path):
    """A rule for write-zeroes requests only, after cluster_alloc_space,
    fails the zeroing itself: blkdebug passes zero_before_write through as
    a request, not to the base class's do-nothing default."""
    path = str(tmp_path / "image.qcow2")
    flushed = _fresh(path, "")
    spec = {"driver": "qcow2",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": events.CLUSTER_ALLOC_SPACE, "errno": 28,
                                       "iotype": "write-zeroes", "once": True}],
                     "image": {"driver": "file", "filename": path}}}
    with corefmt.open(spec) as disk:
        with pytest.raises(CorefmtError, match="No space left"):
            disk.write(4 * MiB, fill(MiB, 3))
        disk.write(4 * MiB, fill(MiB, 3))  # the rule fired once
        assert disk.storage.info()["errors-injected"] == 1
    _qemu_check(path)
    with corefmt.open(path, "qcow2", read_only=True) as disk:
        assert disk.read(4 * MiB, MiB) == fill(MiB, 3)
        for offset, data in flushed.items():
            assert disk.read(offset, len(data)) == data

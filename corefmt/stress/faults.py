"""The fault policy a seed installs on its simulated disks.

Everything is keyed by (request tag, request index), never by arrival
order, so the same seed fails and cuts the power at the same requests
whatever the threads do. (The order in which requests complete is the
scheduler's business: ``corefmt.stress.scheduler``.)

Workload operations are tags 0..n-1; the phases around them have tags of
their own (``CREATE_TAG``, and n, n+1 for closing and reopening), so a
seed can also fail or cut a create, a close or an open. The choices added
for those phases come from their own random streams: a seed's workload and
its faults on workload requests stay what they were.

A whole-image prefetch makes many requests, and what matters most comes
last: the fills made durable, then the driver's record that the base is no
longer needed. For a share of the seeds that have one, its fault (power cut
or error) is counted from its first flush (where completion begins), so it
lands inside completion.

A snapshot create or delete makes tens of requests (flushes, refcounts,
tables, the header), so its faults are spread over its first
``SNAPSHOT_SPAN`` requests, and in a share of the seeds that have snapshot
operations one of them takes the seed's power cut (or an error): the
order of its steps is what must keep the image sound. Runs with those new
kinds also cut the power inside the flushes after them (``flush_tags``): a
flush writes the cached tables back in the order their dependencies ask
for, which only a cut between its requests tests.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Sequence

import attrs

from corefmt.storage.simulated import NO_TAG, SimDisk, SimFault, SimRequest

ERROR_SHARE = 0.12
ENOSPC_SHARE = 0.3
#: The n-th storage request of a chosen op fails (0 or 1: ops make few).
MAX_FAULT_INDEX = 1
MAX_TEAR_SECTORS = 4
#: Storage requests that may run out of space (reads only get EIO). A flush
#: may: delayed allocation, thin provisioning and NFS report ENOSPC at fsync.
ENOSPC_REQUESTS = frozenset({"write", "zero", "discard", "truncate", "flush"})
#: Share of failed flushes that drop the dirty data (Linux's fsync), not keep it.
DROP_SHARE = 0.5
#: Share of crash seeds whose power goes while the image closes, not in the workload.
CLOSE_CUT_SHARE = 0.2
#: Share of seeds whose first reopen is cut (crash runs) or failed (error runs).
REOPEN_FAULT_SHARE = 0.5
#: A faulted open or close fails or loses power at one of its first requests.
MAX_PHASE_FAULT_INDEX = 3
#: With both power cuts and errors on, the share of faulted phases that lose power.
CUT_OR_ERROR = 0.5
#: The tag of a create's requests (workload tags are never negative).
CREATE_TAG = -2
#: Names of the random streams of the phase choices (apart from the workload's).
DROP_STREAM, LIFECYCLE_STREAM, CREATE_STREAM = "drop", "lifecycle", "create"
PREFETCH_STREAM = "prefetch"
#: Share of whole-image prefetches whose fault is moved into their completion...
COMPLETION_FAULT_SHARE = 0.5
#: ... at one of its first requests from the first flush on (FVD's completion
#: makes about ten: flushes, table, bitmap, header); later means after it.
COMPLETION_SPAN = 12
#: Completion starts with this request kind (a prefetch's fills never flush
#: before: checkpoints come every 64 MiB).
COMPLETION_STARTS = "flush"
SNAPSHOT_STREAM = "snapshot"
#: A snapshot operation's fault lands at one of its first requests (a create
#: on a 1 MiB image makes 9..53, a delete 14..17); later means after it.
SNAPSHOT_SPAN = 12
#: Share of seeds with snapshot operations whose fault is moved into one.
SNAPSHOT_FAULT_SHARE = 0.6
#: Share of the others whose power cut is moved into a flush, at one of its
#: first FLUSH_SPAN requests (table and refcount write-backs, then the flush).
FLUSH_FAULT_SHARE = 0.6
FLUSH_SPAN = 6


@attrs.frozen
class PlannedError:
    error: int
    index: int
    tear_sectors: int
    #: If the failing request is a flush: seeds the dropped cache's survivors
    #: (None: the flush fails before touching the cache).
    drop_seed: int | None = None


@attrs.define
class FaultPlan:
    """Which ops fail and where the power goes."""

    seed: int
    errors: dict[int, PlannedError] = attrs.field(factory=dict)
    crash_tag: int | None = None
    crash_disk: str | None = None
    crash_seed: int = 0
    #: The power goes before this request of the crash tag on the crash disk.
    crash_index: int = 0
    #: Tags whose request indices count from their first request of this kind.
    anchors: dict[int, str] = attrs.field(factory=dict)
    _anchored: dict[tuple[str, int], int] = attrs.field(factory=dict)
    #: Every disk of the machine: a power cut takes them all at once.
    machine: list[SimDisk] = attrs.field(factory=list)
    fired: set[int] = attrs.field(factory=set)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def __call__(self, request: SimRequest) -> SimFault | None:
        if request.tag == NO_TAG:
            return None
        index = self._index(request)
        if index is None:
            return None
        if (request.tag == self.crash_tag and request.disk == self.crash_disk
                and index == self.crash_index):
            for disk in self.machine:
                if disk.name != request.disk:
                    disk.power_cut(random.Random(f"{self.crash_seed}:{disk.name}"))
            return SimFault(power_cut=self.crash_seed)
        planned = self.errors.get(request.tag)
        if planned is not None and index == planned.index:
            with self.lock:
                fire = request.tag not in self.fired
                self.fired.add(request.tag)
            if fire:
                error = planned.error if request.kind in ENOSPC_REQUESTS else errno.EIO
                drop = planned.drop_seed if request.kind == "flush" else None
                return SimFault(error=error, tear_sectors=planned.tear_sectors,
                                drop_cache=drop)
        return None

    def _index(self, request: SimRequest) -> int | None:
        """The request's index for this plan: from its tag's anchor, if it has
        one (None before it)."""
        kind = self.anchors.get(request.tag)
        if kind is None:
            return request.index
        key = (request.disk, request.tag)
        with self.lock:
            if key not in self._anchored and request.kind == kind:
                self._anchored[key] = request.index
            start = self._anchored.get(key)
        return None if start is None else request.index - start

    def cut_machine(self) -> None:
        """The power goes now (no-op for disks that already lost it)."""
        for disk in self.machine:
            seed = self.crash_seed if disk.name == self.crash_disk else \
                f"{self.crash_seed}:{disk.name}"
            disk.power_cut(random.Random(seed))

    def was_fired(self, tag: int) -> bool:
        with self.lock:
            return tag in self.fired


def _error(rng: random.Random, drops: random.Random, index: int) -> PlannedError:
    error = errno.ENOSPC if rng.random() < ENOSPC_SHARE else errno.EIO
    tear = rng.randint(0, MAX_TEAR_SECTORS)
    drop = drops.getrandbits(32) if drops.random() < DROP_SHARE else None
    return PlannedError(error, index, tear, drop)


def plan_faults(rng: random.Random, seed: int, operations: int, *, errors: bool,
                crash_disk: str | None, prefetch_tag: int | None = None,
                snapshot_tags: Sequence[int] = (), flush_tags: Sequence[int] = ()
                ) -> FaultPlan:
    """Faults of the workload's ops (tags 0..operations-1) and of the close
    that follows it (tag ``operations``); ``prefetch_tag`` names the op of a
    whole-image prefetch, whose completion may take the fault, and
    ``snapshot_tags`` the snapshot operations, whose faults are spread, and
    ``flush_tags`` flushes the power cut may land inside."""
    plan = FaultPlan(seed)
    drops = random.Random(f"{seed}:{DROP_STREAM}")
    lifecycle = random.Random(f"{seed}:{LIFECYCLE_STREAM}")
    if errors:
        for tag in range(operations):
            if rng.random() < ERROR_SHARE:
                plan.errors[tag] = _error(rng, drops, rng.randint(0, MAX_FAULT_INDEX))
        if lifecycle.random() < ERROR_SHARE:
            plan.errors[operations] = _error(lifecycle, drops,
                                             lifecycle.randint(0, MAX_FAULT_INDEX))
    if crash_disk is not None and operations:
        plan.crash_tag = rng.randrange(operations)
        plan.crash_disk = crash_disk
        plan.crash_seed = rng.getrandbits(32)
        if lifecycle.random() < CLOSE_CUT_SHARE:
            plan.crash_tag = operations
            plan.crash_index = lifecycle.randint(0, MAX_PHASE_FAULT_INDEX)
    if prefetch_tag is not None:
        _fault_completion(plan, random.Random(f"{seed}:{PREFETCH_STREAM}"), prefetch_tag,
                          operations, drops, errors=errors)
    stream = random.Random(f"{seed}:{SNAPSHOT_STREAM}")
    if snapshot_tags:
        _fault_snapshots(plan, stream, snapshot_tags, operations, drops, errors=errors)
    if flush_tags:
        _cut_in_flush(plan, stream, flush_tags, [operations, *snapshot_tags])
    return plan


def _cut_in_flush(plan: FaultPlan, rng: random.Random, tags: Sequence[int],
                  keep: Sequence[int]) -> None:
    """For some seeds, the power cut (if it is in the workload, not in a
    ``keep`` op or a prefetch's completion) goes inside a flush."""
    if (plan.crash_disk is None or plan.crash_tag in keep or plan.crash_tag in plan.anchors
            or rng.random() >= FLUSH_FAULT_SHARE):
        return
    plan.crash_tag, plan.crash_index = rng.choice(tags), rng.randint(0, FLUSH_SPAN)


def _fault_snapshots(plan: FaultPlan, rng: random.Random, tags: Sequence[int],
                     close_tag: int, drops: random.Random, *, errors: bool) -> None:
    """Spread the faults of snapshot operations over their requests; for some
    seeds, move the power cut (if it is in the workload) or else an error
    into one of them."""
    for tag in tags:
        if tag in plan.errors:
            plan.errors[tag] = attrs.evolve(plan.errors[tag],
                                            index=rng.randint(0, SNAPSHOT_SPAN))
    if rng.random() < SNAPSHOT_FAULT_SHARE:
        tag = rng.choice(tags)
        if (plan.crash_disk is not None and plan.crash_tag != close_tag
                and plan.crash_tag not in plan.anchors):  # not a prefetch's completion
            plan.crash_tag = tag
        elif errors:
            plan.errors[tag] = _error(rng, drops, rng.randint(0, SNAPSHOT_SPAN))
    if plan.crash_tag in tags:
        plan.crash_index = rng.randint(0, SNAPSHOT_SPAN)


def _fault_completion(plan: FaultPlan, rng: random.Random, tag: int, close_tag: int,
                      drops: random.Random, *, errors: bool) -> None:
    """For some seeds, the power cut (crash runs whose cut is in the workload,
    not in the close) or else an error lands in the completion of the
    prefetch ``tag``; every fault of that tag then counts from its anchor."""
    if rng.random() >= COMPLETION_FAULT_SHARE:
        return
    index = rng.randint(0, COMPLETION_SPAN)
    if plan.crash_disk is not None and plan.crash_tag != close_tag:
        plan.crash_tag, plan.crash_index = tag, index
    elif errors:
        plan.errors[tag] = _error(rng, drops, index)
    else:
        return
    plan.anchors[tag] = COMPLETION_STARTS


def plan_reopen(seed: int, tag: int, disk: str, *, cut: bool, error: bool) -> FaultPlan | None:
    """A fault in the first reopen after the run: a power cut (if ``cut``)
    or an error at one of its first requests; None for most seeds."""
    rng = random.Random(f"{seed}:{LIFECYCLE_STREAM}:reopen")
    if not (cut or error) or rng.random() >= REOPEN_FAULT_SHARE:
        return None
    plan = FaultPlan(seed)
    index = rng.randint(0, MAX_PHASE_FAULT_INDEX)
    if cut and error:
        cut = rng.random() < CUT_OR_ERROR
    if cut:
        plan.crash_tag, plan.crash_disk, plan.crash_index = tag, disk, index
        plan.crash_seed = rng.getrandbits(32)
    else:
        plan.errors[tag] = PlannedError(errno.EIO, index, 0)
    return plan


def plan_create(seed: int, requests: int, disk: str, *, cut: bool, error: bool) -> FaultPlan:
    """Cut the power before (if ``cut``), or fail, one of the ``requests`` a create makes."""
    rng = random.Random(f"{seed}:{CREATE_STREAM}")
    plan = FaultPlan(seed)
    index = rng.randrange(max(requests, 1))
    if cut and error:
        cut = rng.random() < CUT_OR_ERROR
    if cut:
        plan.crash_tag, plan.crash_disk, plan.crash_index = CREATE_TAG, disk, index
        plan.crash_seed = rng.getrandbits(32)
    else:
        code = errno.ENOSPC if rng.random() < ENOSPC_SHARE else errno.EIO
        plan.errors[CREATE_TAG] = PlannedError(code, index, rng.randint(0, MAX_TEAR_SECTORS))
    return plan

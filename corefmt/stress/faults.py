"""The fault policy a seed installs on its simulated disks.

Everything is keyed by (request tag, request index), never by arrival
order, so the same seed fails and cuts the power at the same requests
whatever the threads do. (The order in which requests complete is the
scheduler's business: ``corefmt.stress.scheduler``.)
"""

from __future__ import annotations

import errno
import random
import threading

import attrs

from corefmt.storage.simulated import NO_TAG, SimFault, SimRequest

ERROR_SHARE = 0.12
ENOSPC_SHARE = 0.3
#: The n-th storage request of a chosen op fails (0 or 1: ops make few).
MAX_FAULT_INDEX = 1
MAX_TEAR_SECTORS = 4
#: Storage requests that may run out of space (reads and flushes only get EIO).
WRITE_REQUESTS = frozenset({"write", "zero", "discard", "truncate"})


@attrs.frozen
class PlannedError:
    error: int
    index: int
    tear_sectors: int


@attrs.define
class FaultPlan:
    """Which ops fail and where the power goes."""

    seed: int
    errors: dict[int, PlannedError] = attrs.field(factory=dict)
    crash_tag: int | None = None
    crash_disk: str | None = None
    crash_seed: int = 0
    fired: set[int] = attrs.field(factory=set)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def __call__(self, request: SimRequest) -> SimFault | None:
        if request.tag == NO_TAG:
            return None
        if (request.tag == self.crash_tag and request.disk == self.crash_disk
                and request.index == 0):
            return SimFault(power_cut=self.crash_seed)
        planned = self.errors.get(request.tag)
        if planned is not None and request.index == planned.index:
            with self.lock:
                fire = request.tag not in self.fired
                self.fired.add(request.tag)
            if fire:
                error = planned.error if request.kind in WRITE_REQUESTS else errno.EIO
                return SimFault(error=error, tear_sectors=planned.tear_sectors)
        return None

    def was_fired(self, tag: int) -> bool:
        with self.lock:
            return tag in self.fired


def plan_faults(rng: random.Random, seed: int, operations: int, *, errors: bool,
                crash_disk: str | None) -> FaultPlan:
    plan = FaultPlan(seed)
    if errors:
        for tag in range(operations):
            if rng.random() < ERROR_SHARE:
                error = errno.ENOSPC if rng.random() < ENOSPC_SHARE else errno.EIO
                plan.errors[tag] = PlannedError(error, rng.randint(0, MAX_FAULT_INDEX),
                                                rng.randint(0, MAX_TEAR_SECTORS))
    if crash_disk is not None and operations:
        plan.crash_tag = rng.randrange(operations)
        plan.crash_disk = crash_disk
        plan.crash_seed = rng.getrandbits(32)
    return plan

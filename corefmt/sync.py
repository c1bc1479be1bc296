"""Locks and conditions that a cooperative scheduler can see.

Requests block in two places: at storage, and on each other's locks
(tracked requests, metadata caches, driver locks). A scheduler that runs
one thread at a time (the stress tester's, so a seed replays exactly) must
know when a thread waits for another, or it would wait forever for a thread
that is itself waiting. These primitives behave like ``threading``'s, except
that a thread running under a scheduler (see ``scheduled``) hands its wait
to that scheduler instead of sleeping in the OS. Without a scheduler they
cost one extra non-blocking acquire.

Drivers that hold a lock across storage requests should use ``Lock`` or
``RLock`` from here, so they can be stress tested with exact replay.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol


class Scheduler(Protocol):
    """What a cooperative scheduler offers the threads it runs."""

    def block(self, resource: object) -> None:
        """The calling thread waits for ``resource``; returns when it may have changed
        (callers re-check, as with a condition variable)."""

    def notify(self, resource: object) -> None:
        """``resource`` changed: threads blocked on it may run again."""


_local = threading.local()
#: Schedulers that run at least one thread now (one entry per thread).
_active: list[Scheduler] = []
_active_lock = threading.Lock()


@contextlib.contextmanager
def scheduled(scheduler: Scheduler) -> Iterator[None]:
    """Hand this thread's waits on these primitives to ``scheduler``."""
    previous = current_scheduler()
    _local.scheduler = scheduler
    with _active_lock:
        _active.append(scheduler)
    try:
        yield
    finally:
        with _active_lock:
            _active.remove(scheduler)
        _local.scheduler = previous


def current_scheduler() -> Scheduler | None:
    return getattr(_local, "scheduler", None)


def _notify(resource: object) -> None:
    if not _active:  # the usual case: nobody schedules threads
        return
    with _active_lock:
        schedulers = list(dict.fromkeys(_active))
    for scheduler in schedulers:
        scheduler.notify(resource)


class Lock:
    """``threading.Lock`` whose blocking acquire a scheduler can see."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        if self._lock.acquire(False):
            return True
        scheduler = current_scheduler()
        if scheduler is None or not blocking:
            return self._lock.acquire(blocking)
        while not self._lock.acquire(False):
            scheduler.block(self)
        return True

    def release(self) -> None:
        self._lock.release()
        _notify(self)

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class RLock:
    """``threading.RLock`` whose blocking acquire a scheduler can see."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._owner: int | None = None
        self._count = 0

    def acquire(self, blocking: bool = True) -> bool:
        me = threading.get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._lock.acquire(blocking):
            return False
        self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        if self._owner != threading.get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._owner = None
            self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class Condition:
    """``threading.Condition`` whose waits a scheduler can see.

    Its own lock must only be held briefly (never across storage requests
    or other waits), as a condition's lock usually is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)

    def wait(self) -> None:
        scheduler = current_scheduler()
        if scheduler is None:
            self._condition.wait()
            return
        self._condition.release()
        try:
            scheduler.block(self)
        finally:
            self._condition.acquire()

    def notify_all(self) -> None:
        self._condition.notify_all()
        _notify(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()  # the lock itself: one call less per request

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.release()

"""Tracked requests: overlapping dependent requests wait, others run.

A range lock with shared (read) and exclusive (write, read-modify-write,
copy-on-read) holders. Requests that only touch disjoint ranges, or only
read, never wait for each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from corefmt import sync


@attrs.define(eq=False)
class TrackedRequest:
    start: int
    end: int
    exclusive: bool

    def conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        overlaps = self.start < end and start < self.end
        return overlaps and (exclusive or self.exclusive)


class RequestTracker:
    def __init__(self) -> None:
        self._changed = sync.Condition()  # a stress scheduler sees the waits
        self._active: list[TrackedRequest] = []

    @contextmanager
    def track(self, start: int, end: int, exclusive: bool) -> Iterator[TrackedRequest]:
        """Hold [start, end) for the duration of the ``with`` block."""
        request = TrackedRequest(start, end, exclusive)
        with self._changed:
            while any(other.conflicts(start, end, exclusive) for other in self._active):
                self._changed.wait()
            self._active.append(request)
        try:
            yield request
        finally:
            with self._changed:
                self._active.remove(request)
                self._changed.notify_all()

    def wait_idle(self) -> None:
        """Wait until no request holds a range (close lets them finish)."""
        with self._changed:
            while self._active:
                self._changed.wait()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return len(self._active)

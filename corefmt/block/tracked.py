"""Tracked requests: overlapping dependent requests wait, others run.

A range lock with shared (read) and exclusive (write, read-modify-write,
copy-on-read) holders. Requests that only touch disjoint ranges, or only
read, never wait for each other.
"""

from __future__ import annotations

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
        self._waiting = 0  # threads waiting on _changed: a release wakes them

    def track(self, start: int, end: int, exclusive: bool) -> _Hold:
        """Hold [start, end) for the duration of the ``with`` block (a class,
        not a generator: every read and write takes one)."""
        return _Hold(self, TrackedRequest(start, end, exclusive))

    def _hold(self, request: TrackedRequest) -> None:
        start, end, exclusive = request.start, request.end, request.exclusive
        with self._changed:
            while self._active and any(other.conflicts(start, end, exclusive)
                                       for other in self._active):
                self._wait()
            self._active.append(request)

    def _release(self, request: TrackedRequest) -> None:
        with self._changed:
            self._active.remove(request)
            if self._waiting:
                self._changed.notify_all()

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._changed.wait()
        finally:
            self._waiting -= 1

    def wait_idle(self) -> None:
        """Wait until no request holds a range (close lets them finish)."""
        with self._changed:
            while self._active:
                self._wait()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return len(self._active)


class _Hold:
    """A tracked request held while its ``with`` block runs."""

    __slots__ = ("_tracker", "request")

    def __init__(self, tracker: RequestTracker, request: TrackedRequest):
        self._tracker = tracker
        self.request = request

    def __enter__(self) -> TrackedRequest:
        self._tracker._hold(self.request)
        return self.request

    def __exit__(self, *exc_info: object) -> None:
        self._tracker._release(self.request)

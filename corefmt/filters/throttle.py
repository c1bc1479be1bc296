"""throttle: caps the bytes and requests per second that reach the child.

Each limit is a token bucket: tokens (bytes or requests) drain at the
limit's rate, a bucket holds ``burst`` seconds' worth, and a request that
does not fit waits until it does. The tokens are taken when the request
arrives, under a lock, and the wait happens outside it, so concurrent
requests queue in arrival order without holding each other up.

As in QEMU's throttling, writes, write-zeroes and discards count as
writes, reads as reads, and flushes and truncation are never held back;
the ``-total`` limits count both directions, and cannot be combined with
the per-direction ones of the same kind.

The clock and the sleep are attributes of the filter (defaulting to the
module's ``CLOCK`` and ``SLEEP``), so tests run against a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from corefmt import sync
from corefmt.errors import OptionError
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.options import KIND_NUMBER, option, to_size

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

#: Where the filter reads the time and how it waits (tests replace these).
CLOCK: Callable[[], float] = time.monotonic
SLEEP: Callable[[float], None] = time.sleep

#: Seconds of traffic a bucket lets through at once after an idle spell
#: (QEMU's default bucket holds a tenth of the rate).
DEFAULT_BURST = 0.1
READ, WRITE = "read", "write"


def _non_negative(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name.replace('_', '-')} must not be negative")


def _count(name: str) -> Callable[[Any], int]:
    """A converter to a whole number that names its option when it fails."""

    def convert(value: Any) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise OptionError(f"Parameter '{name}' expects a number") from None

    return convert


def _rate(help: str, converter: Callable[[Any], Any] = to_size) -> Any:
    return option(0, f"{help} (0 = unlimited)", converter=converter, validator=_non_negative,
                  kind=KIND_NUMBER)


@attrs.frozen
class ThrottleOptions:
    bps_total: int = _rate("bytes per second, reads and writes together")
    bps_read: int = _rate("bytes per second read")
    bps_write: int = _rate("bytes per second written")
    iops_total: int = _rate("requests per second, reads and writes together",
                            _count("iops-total"))
    iops_read: int = _rate("read requests per second", _count("iops-read"))
    iops_write: int = _rate("write requests per second", _count("iops-write"))
    burst: float = option(DEFAULT_BURST, "seconds of traffic let through at once after idling",
                          converter=float, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        for kind in ("bps", "iops"):
            total = getattr(self, f"{kind}_total")
            if total and (getattr(self, f"{kind}_read") or getattr(self, f"{kind}_write")):
                raise ValueError(f"{kind}-total and {kind}-read/{kind}-write cannot be used "
                                 "at the same time")


class TokenBucket:
    """``rate`` units per second, at most ``capacity`` ahead.

    ``level`` is the tokens owed (taken but not yet drained); a request
    may go when, after taking its cost, the level is within capacity. The
    bucket starts full at its first request, so the clock may be replaced
    until then.
    """

    def __init__(self, rate: float, capacity: float):
        self.rate = rate
        self.capacity = capacity
        self.level = 0.0
        self.updated: float | None = None

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens; the seconds to wait before the request may go."""
        if self.updated is not None:
            drained = (now - self.updated) * self.rate
            self.level = max(0.0, self.level - drained)
        self.updated = now
        self.level += cost
        return max(0.0, (self.level - self.capacity) / self.rate)


class RateLimit:
    """One byte rate for an operation's own writes (convert -r, commit -r):
    qemu-img puts its target behind a throttle group with that write rate;
    this is the same bucket, without a filter in the graph. ``take`` waits
    until the bytes may go; concurrent callers queue in arrival order."""

    def __init__(self, rate: float, burst: float = DEFAULT_BURST):
        self._bucket = TokenBucket(rate, rate * burst)
        self._lock = sync.Lock()

    def take(self, length: int) -> None:
        with self._lock:
            wait = self._bucket.take(length, time.monotonic())
        if wait > 0:
            time.sleep(wait)


class ThrottleFilter(Filter):
    def __init__(self, child: BlockNode, options: ThrottleOptions, context: FilterContext):
        super().__init__(child, options, context)
        self.clock = CLOCK
        self.sleep = SLEEP
        self._lock = sync.Lock()
        #: Per direction: (bucket, counts bytes) pairs that apply to it.
        self._buckets: dict[str, list[tuple[TokenBucket, bool]]] = {READ: [], WRITE: []}
        for kind, by_bytes in (("bps", True), ("iops", False)):
            for direction, targets in (("total", (READ, WRITE)), (READ, (READ,)),
                                       (WRITE, (WRITE,))):
                rate = getattr(options, f"{kind}_{direction}")
                if rate:
                    bucket = TokenBucket(rate, rate * options.burst)
                    for target in targets:
                        self._buckets[target].append((bucket, by_bytes))
        self.waited = 0.0

    def _admit(self, direction: str, length: int) -> None:
        """Wait until the request fits in every bucket that applies to it."""
        buckets = self._buckets[direction]
        if not buckets:
            return
        with self._lock:
            now = self.clock()
            wait = max(bucket.take(length if by_bytes else 1, now)
                       for bucket, by_bytes in buckets)
            self.waited += wait
        if wait > 0:
            self.sleep(wait)

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        self._admit(READ, len(buf))
        self.child.readinto(offset, buf, flags)

    def write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        self._admit(WRITE, len(data))
        self.child.write(offset, data, flags)

    def write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._admit(WRITE, length)
        self.child.write_zeroes(offset, length, flags=flags)

    def discard(self, offset: int, length: int) -> None:
        self._admit(WRITE, length)
        self.child.discard(offset, length)

    def info(self) -> dict[str, Any]:
        limits = {field.name.replace("_", "-"): getattr(self.options, field.name)
                  for field in attrs.fields(ThrottleOptions)}
        return {**limits, "waited": self.waited}


class ThrottleDriver(FilterDriver):
    name = "throttle"
    open_options = ThrottleOptions
    child_key = "file"
    filter_class = ThrottleFilter

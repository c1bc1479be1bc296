"""prefetch: fills the image from its backing chain in the background
while it is in use, and times the image's own requests so the prefetcher
backs off when they suffer (see corefmt.ops.prefetch).

The filter sits on top of the image (above copy-on-read, if both): the
requests it passes down are the foreground workload, the prefetcher's
own reads and stores go to the layer directly. A read-only image is not
prefetched. Closing stops the prefetch after the piece in hand; what it
stored stays (the close writes FVD's bitmap), and the next prefetch
starts from there.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from corefmt.errors import OptionError
from corefmt.fills import fill_policy
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.ops.prefetch import Prefetcher
from corefmt.options import KIND_NUMBER, option, to_bool

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode


def _delay(value: Any) -> float | None:
    """Seconds, finite and at most what a thread can wait for."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 <= seconds <= threading.TIMEOUT_MAX:  # also refuses nan
        raise OptionError(f"Parameter 'start-delay' expects a number of seconds from 0 to "
                          f"{int(threading.TIMEOUT_MAX)}")
    return seconds


@attrs.frozen
class PrefetchOptions:
    start_delay: float | None = option(
        None, "seconds before prefetch starts (default: as the image asks, FVD's "
        "prefetch_start_delay, else at once)", converter=_delay, kind=KIND_NUMBER)
    throttle: bool = option(True, "back off when the base is slow or the image's own "
                            "requests get slower", converter=to_bool)


class PrefetchFilter(Filter):
    def __init__(self, child: BlockNode, options: PrefetchOptions, context: FilterContext):
        super().__init__(child, options, context)
        policy = fill_policy(child)
        self.prefetcher = Prefetcher(child, policy.prefetch, throttle=options.throttle)
        self.delay = options.start_delay
        if self.delay is None:
            self.delay = policy.prefetch_start_delay or 0.0

    def graph_complete(self) -> None:
        if not self.context.read_only and self.child.layer().backing is not None:
            self.prefetcher.start(self.delay)

    def _timed(self, began: float) -> None:
        self.prefetcher.note_foreground(time.perf_counter() - began)

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        began = time.perf_counter()
        self.child.readinto(offset, buf, flags)
        self._timed(began)

    def write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        began = time.perf_counter()
        self.child.write(offset, data, flags)
        self._timed(began)

    def write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        began = time.perf_counter()
        self.child.write_zeroes(offset, length, flags=flags)
        self._timed(began)

    def close(self) -> None:
        self.prefetcher.stop()

    def info(self) -> dict[str, Any]:
        return self.prefetcher.status.as_dict()


class PrefetchDriver(FilterDriver):
    name = "prefetch"
    open_options = PrefetchOptions
    child_key = "file"
    filter_class = PrefetchFilter

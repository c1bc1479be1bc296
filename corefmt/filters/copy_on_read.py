"""copy-on-read: data read from below the filtered image is also written
into it, so the next read of it is local.

Two modes (``auto``, the default, takes the one the image asks for in its
fill policy: FVD's header asks for ``async``, everything else gets ``sync``):
- ``sync`` (QEMU's copy-on-read filter): the read returns once the data
  is also stored in the image, widened to the image's copy granularity.
- ``async`` (FVD's copy-on-read, spec section 7.1): the read returns at
  once and the fill runs in the background. Fills are bounded by the bytes
  outstanding; a fill that would exceed the bound is dropped, not queued
  (it costs nothing but a later re-read: the base still has the data).

Either way a guest write that reaches the image first wins, and fills are
marked FILL so a driver may store them without journaling (a crash only
costs copying them again).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs

from corefmt import sync
from corefmt.fills import COPY_ON_READ_ASYNC, COPY_ON_READ_SYNC, fill_policy
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.options import choice, option, to_size

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

MODE_SYNC, MODE_ASYNC = COPY_ON_READ_SYNC, COPY_ON_READ_ASYNC
MODE_AUTO = "auto"
#: FVD replaces a bound below this many copy units by one unit (spec 10, item 12).
MIN_OUTSTANDING_UNITS = 2


@attrs.frozen
class CopyOnReadOptions:
    mode: str = option(MODE_AUTO, "sync: the read waits for the copy (QEMU); async: "
                       "background fills, dropped when too many bytes are outstanding (FVD); "
                       "auto: as the image asks (FVD: async)",
                       validator=choice(MODE_AUTO, MODE_SYNC, MODE_ASYNC))
    max_outstanding: int = option(0, "async mode: bytes of fills in flight at most (0: as "
                                  "the image asks, FVD's max_outstanding_copy_on_read_data; "
                                  "else 2 MB)", converter=to_size)


class CopyOnReadFilter(Filter):
    def __init__(self, child: BlockNode, options: CopyOnReadOptions, context: FilterContext):
        super().__init__(child, options, context)
        self._lock = sync.Lock()
        self._outstanding = 0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[Any]] = set()
        self.fills_started = self.fills_dropped = 0
        policy = fill_policy(child)
        self.mode = policy.copy_on_read_mode if options.mode == MODE_AUTO else options.mode
        unit = max(child.limits.copy_granularity, 1)
        limit = options.max_outstanding or policy.max_outstanding
        self.max_outstanding = unit if limit < MIN_OUTSTANDING_UNITS * unit else limit

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if self.child.read_only:  # may change: commit reopens images
            self.child.readinto(offset, buf, flags)
        elif self.mode == MODE_SYNC:
            self.child.readinto(offset, buf, flags | RequestFlags.COPY_ON_READ)
        else:
            self.child.readinto(offset, buf, flags & ~RequestFlags.COPY_ON_READ)
            self._schedule_fills(offset, buf)

    def _schedule_fills(self, offset: int, buf: memoryview) -> None:
        unit = max(self.child.limits.copy_granularity, 1)
        for extent in self.child.block_status(offset, len(buf)):
            if extent.depth == 0 or extent.node is None:
                continue
            # FVD counts the copy-unit-aligned buffer a fill will write.
            start, end = extent.offset - extent.offset % unit, -(-extent.end // unit) * unit
            with self._lock:
                if self._outstanding >= self.max_outstanding:
                    self.fills_dropped += 1
                    continue
                self._outstanding += end - start
                self.fills_started += 1
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="corefmt-cor")
            data = bytes(buf[extent.offset - offset:extent.end - offset])
            future = self._executor.submit(self._fill, extent.offset, extent.length, data,
                                           end - start)
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._finished)

    def _fill(self, offset: int, length: int, data: bytes, counted: int) -> None:
        try:
            self.child.copy_up(offset, length, data)
        finally:
            with self._lock:
                self._outstanding -= counted

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self) -> None:
        """Wait for the fills in flight (flush and close do)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()  # a failed fill loses nothing: the base still has it

    def flush(self) -> None:
        self.drain()
        self.child.flush()

    def close(self) -> None:
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "fills-started": self.fills_started,
                "fills-dropped": self.fills_dropped}


class CopyOnReadDriver(FilterDriver):
    name = "copy-on-read"
    open_options = CopyOnReadOptions
    child_key = "file"
    filter_class = CopyOnReadFilter

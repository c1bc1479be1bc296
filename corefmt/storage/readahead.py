"""A small read cache with readahead for stores where each request costs a
round trip (http today, s3 next).

Small sequential reads (a guest booting, ``dd bs=4k``) would pay a round
trip each: once a read starts where an earlier one ended, the next fetch
reads a window ahead, doubling up to a cap, and later reads are served from
it. Random reads (metadata tables) and large reads (convert's chunks) go
straight to the store, into the caller's buffer. The cache is bounded and
only ever holds bytes the store fetched, so a store that verifies its
answers (an object's version) keeps every cached byte verified too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from corefmt import sync

#: The first readahead of a sequential stream, and the most it grows to.
WINDOW_START = 256 * 1024
WINDOW_MAX = 4 * 1024 * 1024
#: Bytes of fetched windows kept (least recently used go first).
CACHE_BYTES = 16 * 1024 * 1024
#: Sequential streams told apart at once (one per reading thread, say).
STREAMS = 8
#: A read this long goes straight to the store even in a sequential stream:
#: its round trip is amortised already, and the callers that read this much
#: (convert, prefetch) keep several reads in flight. Reading ahead would only
#: copy every byte once more, through a freshly allocated window.
DIRECT_READ = 1024 * 1024

Fetch = Callable[[int, memoryview], None]


class ReadAhead:
    """Serves ``readinto`` from fetched windows where reads are sequential."""

    def __init__(self, fetch: Fetch, size: int, *, window_start: int = WINDOW_START,
                 window_max: int = WINDOW_MAX, cache_bytes: int = CACHE_BYTES,
                 direct_read: int = DIRECT_READ):
        self._fetch = fetch
        self._direct_read = direct_read
        self._size = size
        self._window_start = window_start
        self._window_max = window_max
        self._cache_bytes = cache_bytes
        self._lock = sync.Lock()
        #: start offset -> fetched bytes, oldest use first.
        self._windows: OrderedDict[int, bytearray] = OrderedDict()
        self._cached = 0
        #: Where a stream's last read ended -> the window it reads ahead.
        self._streams: OrderedDict[int, int] = OrderedDict()
        self.hits = self.fetches = 0

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` (which lies inside the store) from ``offset``."""
        length = len(view)
        end = offset + length
        with self._lock:
            previous = self._streams.pop(offset, None)
            if self._copy_cached(offset, view):
                self.hits += 1
                self._note(end, previous or 0)  # the window grows with fetches only
                return
            window = (0 if previous is None
                      else min(self._window_max, max(self._window_start, 2 * previous)))
            self._note(end, window)
        span = min(window, self._size - offset)
        if span <= length or length >= self._direct_read:  # random, or long: straight in
            self._fetch(offset, view)
            return
        block = bytearray(span)
        self._fetch(offset, memoryview(block))
        view[:] = memoryview(block)[:length]
        with self._lock:
            self.fetches += 1
            self._keep(offset, block)

    def _note(self, end: int, window: int) -> None:
        """A stream's read ended at ``end``; a read from there reads ahead
        twice ``window`` (at least the first window)."""
        self._streams[end] = window
        while len(self._streams) > STREAMS:
            self._streams.popitem(last=False)

    def _copy_cached(self, offset: int, view: memoryview) -> bool:
        end = offset + len(view)
        for start, block in reversed(self._windows.items()):
            if start <= offset and end <= start + len(block):
                view[:] = memoryview(block)[offset - start:end - start]
                self._windows.move_to_end(start)
                return True
        return False

    def _keep(self, offset: int, block: bytearray) -> None:
        old = self._windows.pop(offset, None)
        if old is not None:
            self._cached -= len(old)
        self._windows[offset] = block
        self._cached += len(block)
        while self._cached > self._cache_bytes and len(self._windows) > 1:
            _, dropped = self._windows.popitem(last=False)
            self._cached -= len(dropped)

"""Merged chain status of read-only nodes, computed once per chunk.

A read through a chain of hundreds of overlays would otherwise ask every
layer about every range. A node's merged status changes only when a node
at or below it changes (a write after reopening it read-write, a
truncate, a re-pointed backing link): each such change bumps the
*generation* of every node above it. A cached chunk is valid only for the
generation it was computed at, and a chunk whose computation overlapped a
change is never inserted, so a status computed before an invalidation
cannot outlive it.

Memory is bounded twice: by a total number of cached extents (LRU), and
per chunk: a chunk that splits into more than ``MAX_EXTENTS_PER_CHUNK``
runs (a hostile or very fragmented image) is not cached; lookups in it
compute just the range asked for.

A lookup over many chunks that are not cached computes them in one call,
not chunk by chunk: drivers answer a whole run at once (SEEK_DATA/SEEK_HOLE,
an empty L1 table), so a petabyte of holes costs a few calls instead of
millions. Of a long range, only the chunks where an extent starts or ends
are cached (the others lie inside one extent, and there may be millions).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable

import attrs

from corefmt.extents import ChainExtent, merge_runs

STATUS_CHUNK_SIZE = 256 * 1024 * 1024
MAX_CACHED_EXTENTS = 65536
MAX_EXTENTS_PER_CHUNK = 4096
#: Chunks cached, fragmented ones (which hold no extents) included.
MAX_CACHED_CHUNKS = 65536
#: A computed range of at most this many chunks is cached chunk by chunk;
#: of a longer one only the chunks where an extent starts or ends.
MAX_CHUNKS_CACHED_WHOLE = 16

ComputeFn = Callable[[int, int], list[ChainExtent]]


@attrs.frozen
class _Chunk:
    generation: int
    starts: list[int]
    extents: list[ChainExtent]
    #: Too many runs to keep: lookups compute their own range.
    fragmented: bool = False


class ChainStatusCache:
    def __init__(self, compute: ComputeFn, size: Callable[[], int],
                 generation: Callable[[], int] = lambda: 0):
        self._compute = compute
        self._size = size
        self._generation = generation
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._numbers: list[int] = []  # the cached chunk numbers, sorted
        self._extent_count = 0
        self._lock = threading.Lock()
        self.computed = 0  # compute calls, of a chunk or a longer range (tests read it)

    def lookup(self, offset: int, length: int) -> list[ChainExtent]:
        end = offset + length
        result: list[ChainExtent] = []
        position = offset
        while position < end:
            chunk = position // STATUS_CHUNK_SIZE
            chunk_end = (chunk + 1) * STATUS_CHUNK_SIZE
            entry = self._cached(chunk)
            if entry is None:
                gap_end = min(end, self._next_cached_start(chunk + 1))
                if gap_end > chunk_end:  # several chunks to compute: in one call
                    result.extend(self._compute_range(position, gap_end))
                    position = gap_end
                    continue
                entry = self._compute_chunk(chunk)
            stop = min(end, chunk_end)
            if entry.fragmented:
                result.extend(self._compute(position, stop - position))
            else:
                index = max(0, bisect.bisect_right(entry.starts, position) - 1)
                while index < len(entry.extents) and entry.extents[index].offset < stop:
                    extent = entry.extents[index]
                    if extent.end > position:
                        result.append(extent.clip(position, stop))
                    index += 1
            position = stop
        return merge_runs(result)

    def _cached(self, chunk: int) -> _Chunk | None:
        generation = self._generation()
        with self._lock:
            cached = self._chunks.get(chunk)
            if cached is None:
                return None
            if cached.generation != generation:
                self._drop(chunk)
                return None
            self._chunks.move_to_end(chunk)
            return cached

    def _next_cached_start(self, chunk: int) -> int:
        """Where the first cached chunk numbered ``chunk`` or more starts."""
        with self._lock:
            index = bisect.bisect_left(self._numbers, chunk)
            if index < len(self._numbers):
                return self._numbers[index] * STATUS_CHUNK_SIZE
        return 1 << 126

    def _compute_chunk(self, chunk: int) -> _Chunk:
        generation = self._generation()
        start = chunk * STATUS_CHUNK_SIZE
        end = min(start + STATUS_CHUNK_SIZE, self._size())
        extents = self._compute(start, end - start) if end > start else []
        self.computed += 1
        entry = self._entry(generation, extents)
        self._insert({chunk: entry}, generation)
        return entry

    def _compute_range(self, offset: int, end: int) -> list[ChainExtent]:
        """Status of [offset, end) in one compute call (from the start of the
        chunk, so whole chunks can be cached), clipped to the range."""
        generation = self._generation()
        start = offset - offset % STATUS_CHUNK_SIZE
        stop = min(-(-end // STATUS_CHUNK_SIZE) * STATUS_CHUNK_SIZE, self._size())
        extents = self._compute(start, stop - start) if stop > start else []
        self.computed += 1
        self._insert(self._split(start, stop, extents, generation), generation)
        return [extent.clip(offset, end) for extent in extents
                if extent.end > offset and extent.offset < end]

    def _split(self, start: int, stop: int, extents: list[ChainExtent],
               generation: int) -> dict[int, _Chunk]:
        """The chunks of a computed range worth caching: all of a short range;
        of a long one those where an extent starts or ends (at most two per
        extent), up to MAX_CACHED_EXTENTS extents in all."""
        whole = -(-(stop - start) // STATUS_CHUNK_SIZE) <= MAX_CHUNKS_CACHED_WHOLE
        pieces: dict[int, list[ChainExtent]] = {}
        for extent in extents:
            first = extent.offset // STATUS_CHUNK_SIZE
            last = (extent.end - 1) // STATUS_CHUNK_SIZE
            touched = range(first, last + 1) if whole else dict.fromkeys((first, last))
            for chunk in touched:
                chunk_start = chunk * STATUS_CHUNK_SIZE
                pieces.setdefault(chunk, []).append(
                    extent.clip(chunk_start, min(chunk_start + STATUS_CHUNK_SIZE, stop)))
        entries: dict[int, _Chunk] = {}
        kept = 0
        for chunk, chunk_extents in pieces.items():
            kept += len(chunk_extents)
            if kept > MAX_CACHED_EXTENTS:
                break
            entries[chunk] = self._entry(generation, chunk_extents)
        return entries

    @staticmethod
    def _entry(generation: int, extents: list[ChainExtent]) -> _Chunk:
        if len(extents) > MAX_EXTENTS_PER_CHUNK:
            return _Chunk(generation, [], [], fragmented=True)
        return _Chunk(generation, [extent.offset for extent in extents], extents)

    def _insert(self, entries: dict[int, _Chunk], generation: int) -> None:
        with self._lock:
            if self._generation() != generation:
                return  # changed while computing: good for this caller only
            for chunk, entry in entries.items():
                self._drop(chunk)
                self._chunks[chunk] = entry
                bisect.insort(self._numbers, chunk)
                self._extent_count += len(entry.extents)
            while len(self._chunks) > 1 and (self._extent_count > MAX_CACHED_EXTENTS
                                             or len(self._chunks) > MAX_CACHED_CHUNKS):
                oldest = next(iter(self._chunks))
                self._drop(oldest)

    def _drop(self, chunk: int) -> None:
        """Forget one chunk (the caller holds the lock)."""
        stale = self._chunks.pop(chunk, None)
        if stale is None:
            return
        self._extent_count -= len(stale.extents)
        del self._numbers[bisect.bisect_left(self._numbers, chunk)]

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._numbers.clear()
            self._extent_count = 0

    @property
    def extent_count(self) -> int:
        with self._lock:
            return self._extent_count

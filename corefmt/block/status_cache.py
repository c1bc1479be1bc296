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
        self._extent_count = 0
        self._lock = threading.Lock()
        self.computed = 0  # chunks computed (tests and benchmarks read it)

    def lookup(self, offset: int, length: int) -> list[ChainExtent]:
        end = offset + length
        result: list[ChainExtent] = []
        chunk = offset // STATUS_CHUNK_SIZE
        while chunk * STATUS_CHUNK_SIZE < end:
            entry = self._chunk(chunk)
            if entry.fragmented:
                start = max(offset, chunk * STATUS_CHUNK_SIZE)
                stop = min(end, (chunk + 1) * STATUS_CHUNK_SIZE)
                result.extend(self._compute(start, stop - start))
            else:
                index = max(0, bisect.bisect_right(entry.starts, offset) - 1)
                while index < len(entry.extents) and entry.extents[index].offset < end:
                    extent = entry.extents[index]
                    if extent.end > offset:
                        result.append(extent.clip(offset, end))
                    index += 1
            chunk += 1
        return merge_runs(result)

    def _chunk(self, chunk: int) -> _Chunk:
        generation = self._generation()
        with self._lock:
            cached = self._chunks.get(chunk)
            if cached is not None and cached.generation == generation:
                self._chunks.move_to_end(chunk)
                return cached
        start = chunk * STATUS_CHUNK_SIZE
        end = min(start + STATUS_CHUNK_SIZE, self._size())
        extents = self._compute(start, end - start) if end > start else []
        self.computed += 1
        if len(extents) > MAX_EXTENTS_PER_CHUNK:
            entry = _Chunk(generation, [], [], fragmented=True)
        else:
            entry = _Chunk(generation, [extent.offset for extent in extents], extents)
        with self._lock:
            if self._generation() != generation:
                return entry  # changed while computing: good for this caller only
            stale = self._chunks.pop(chunk, None)
            if stale is not None:
                self._extent_count -= len(stale.extents)
            self._chunks[chunk] = entry
            self._extent_count += len(entry.extents)
            while self._extent_count > MAX_CACHED_EXTENTS and len(self._chunks) > 1:
                _, dropped = self._chunks.popitem(last=False)
                self._extent_count -= len(dropped.extents)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._extent_count = 0

    @property
    def extent_count(self) -> int:
        with self._lock:
            return self._extent_count

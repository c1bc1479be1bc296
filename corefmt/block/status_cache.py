"""Merged chain status of read-only nodes, computed once per chunk.

A read through a chain of hundreds of overlays would otherwise ask every
layer about every range. Backing nodes are read-only, so what the chain
below them holds cannot change while they are open: their merged status is
cached in fixed chunks, bounded by a total number of extents (LRU).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable

from corefmt.extents import ChainExtent, merge_runs

STATUS_CHUNK_SIZE = 256 * 1024 * 1024
MAX_CACHED_EXTENTS = 65536

ComputeFn = Callable[[int, int], list[ChainExtent]]


class ChainStatusCache:
    def __init__(self, compute: ComputeFn, size: Callable[[], int]):
        self._compute = compute
        self._size = size
        self._chunks: OrderedDict[int, tuple[list[int], list[ChainExtent]]] = OrderedDict()
        self._extent_count = 0
        self._lock = threading.Lock()

    def lookup(self, offset: int, length: int) -> list[ChainExtent]:
        end = offset + length
        result: list[ChainExtent] = []
        chunk = offset // STATUS_CHUNK_SIZE
        while chunk * STATUS_CHUNK_SIZE < end:
            starts, extents = self._chunk(chunk)
            index = max(0, bisect.bisect_right(starts, offset) - 1)
            while index < len(extents) and extents[index].offset < end:
                extent = extents[index]
                if extent.end > offset:
                    result.append(extent.clip(offset, end))
                index += 1
            chunk += 1
        return merge_runs(result)

    def _chunk(self, chunk: int) -> tuple[list[int], list[ChainExtent]]:
        with self._lock:
            cached = self._chunks.get(chunk)
            if cached is not None:
                self._chunks.move_to_end(chunk)
                return cached
        start = chunk * STATUS_CHUNK_SIZE
        end = min(start + STATUS_CHUNK_SIZE, self._size())
        extents = self._compute(start, end - start) if end > start else []
        entry = ([extent.offset for extent in extents], extents)
        with self._lock:
            if chunk not in self._chunks:
                self._chunks[chunk] = entry
                self._extent_count += len(extents)
            while self._extent_count > MAX_CACHED_EXTENTS and len(self._chunks) > 1:
                _, (_, dropped) = self._chunks.popitem(last=False)
                self._extent_count -= len(dropped)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._extent_count = 0

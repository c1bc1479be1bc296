"""A shared cache for fixed-size metadata tables (qcow2 L2 and refcount
blocks, FVD bitmap and table chunks).

LRU with dirty tracking. Crash safety comes from flush ordering between
caches: ``set_dependency(other)`` makes every write-back of this cache
first write back ``other`` and flush the storage, so (for qcow2) refcount
blocks are durable before the L2 tables that use the clusters they count.
"""

from __future__ import annotations

from collections import OrderedDict

from corefmt import sync
from corefmt.errors import CorefmtError
from corefmt.storage.base import Storage

#: Even a tiny cache keeps a few tables, or a single request could thrash it.
MIN_CACHE_ENTRIES = 4
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024


def capacity_for(table_count: int, table_size: int, limit_bytes: int = DEFAULT_CACHE_BYTES) -> int:
    """Entries for a cache that holds all tables of a disk, up to ``limit_bytes``."""
    return max(MIN_CACHE_ENTRIES, min(table_count, limit_bytes // max(table_size, 1)))


class _Entry:
    __slots__ = ("data", "dirty")

    def __init__(self, data: bytearray, dirty: bool = False):
        self.data = data
        self.dirty = dirty


class MetadataCache:
    """Tables of ``table_size`` bytes keyed by their offset in ``storage``."""

    def __init__(self, name: str, storage: Storage, table_size: int, entries: int):
        self.name = name
        self.storage = storage
        self.table_size = table_size
        self.capacity = max(MIN_CACHE_ENTRIES, entries)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._dependency: MetadataCache | None = None
        self._flush_storage_first = False
        self._lock = sync.RLock()  # held across storage requests
        self.hits = self.misses = self.writebacks = 0

    # -- ordering -------------------------------------------------------------------
    def set_dependency(self, other: MetadataCache) -> None:
        """``other`` must be durable before any table of this cache is written."""
        if other is self or other._dependency is self:
            raise CorefmtError(f"cache {self.name}: circular flush dependency")
        with self._lock:
            self._dependency = other

    def require_storage_flush(self) -> None:
        """Flush the storage before the next write-back (data before metadata)."""
        with self._lock:
            self._flush_storage_first = True

    def _settle_dependency(self) -> None:
        """Make the dependency durable (written, then a storage flush)."""
        if self._dependency is not None and self._dependency.dirty_count:
            self._dependency.flush()
            self._flush_storage_first = True
        if self._flush_storage_first:
            self.storage.flush()
            self._flush_storage_first = False

    # -- access -----------------------------------------------------------------------
    def get(self, offset: int) -> bytearray:
        """The table at ``offset``, read from storage on a miss."""
        with self._lock:
            entry = self._entries.get(offset)
            if entry is not None:
                self.hits += 1
                self._entries.move_to_end(offset)
                return entry.data
            self.misses += 1
            self._make_room()
            data = bytearray(self.table_size)
            self.storage.readinto(offset, data)
            self._entries[offset] = _Entry(data)
            return data

    def get_empty(self, offset: int) -> bytearray:
        """A zeroed table for a freshly allocated offset (not read from storage)."""
        with self._lock:
            self._make_room()
            data = bytearray(self.table_size)
            self._entries[offset] = _Entry(data, dirty=True)
            self._entries.move_to_end(offset)
            return data

    def mark_dirty(self, offset: int, data: bytearray | None = None) -> None:
        """Record that a table changed (``data`` re-adds one evicted meanwhile)."""
        with self._lock:
            entry = self._entries.get(offset)
            if entry is None:
                if data is None:
                    raise CorefmtError(f"cache {self.name}: table {offset:#x} is not cached")
                self._make_room()
                entry = self._entries[offset] = _Entry(data)
            elif data is not None and data is not entry.data:
                entry.data = data
            entry.dirty = True

    def forget(self, offset: int) -> None:
        """Drop a table without writing it back (its clusters were freed)."""
        with self._lock:
            self._entries.pop(offset, None)

    @property
    def dirty_count(self) -> int:
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.dirty)

    # -- write-back -----------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty table (after its dependency); no storage flush after."""
        with self._lock:
            dirty = [(offset, entry) for offset, entry in self._entries.items() if entry.dirty]
            if not dirty:
                return
            self._settle_dependency()
            for offset, entry in sorted(dirty, key=lambda item: item[0]):
                self._write_back(offset, entry)

    def _write_back(self, offset: int, entry: _Entry) -> None:
        self.storage.write(offset, entry.data)
        entry.dirty = False
        self.writebacks += 1

    def _make_room(self) -> None:
        while len(self._entries) >= self.capacity:
            victim = next((key for key, entry in self._entries.items() if not entry.dirty), None)
            if victim is None:
                victim = next(iter(self._entries))
                self._settle_dependency()
                self._write_back(victim, self._entries[victim])
            del self._entries[victim]

    def clear(self) -> None:
        """Forget everything (after flush, or to drop what a failed update cached)."""
        with self._lock:
            self._entries.clear()

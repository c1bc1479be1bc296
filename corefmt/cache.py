"""A shared cache for fixed-size metadata tables (qcow2 L2 tables and refcount
blocks, FVD bitmap and table chunks), modelled on QEMU's block/qcow2-cache.c.

Why it looks the way it does:

* Tables are *pinned* while a caller uses them (``with cache.table(offset) as
  t``). Eviction never drops a pinned or a dirty table, so an update made
  through a handle can never land in a copy the cache has already forgotten.
* Crash safety comes from write ordering. ``a.depends_on(b)`` makes the next
  write-back of any of ``a``'s tables first write back ``b`` and flush ``b``'s
  storage (qcow2: refcount blocks before the L2 tables that use the clusters
  they count when allocating; L2 tables before refcount blocks when freeing).
  A dependency is resolved by that flush and then forgotten, as in QEMU, so the
  driver sets it again for each update that needs it. Setting one against an
  existing path first resolves the existing one, so the graph never has a cycle.
* Barriers (``add_barrier``) order *other* things before this cache's writes:
  a data file's flush, FVD's journal.
* The cache-wide lock guards the index only. Reads and write-backs run with the
  entry marked loading/writing; threads that need it wait on the entry's own
  condition, and hits on other tables go on meanwhile. All waits go through
  ``corefmt.sync`` so the stress scheduler can replay races.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from corefmt import sync
from corefmt.errors import CorefmtError, OptionError
from corefmt.storage.base import Storage

#: Even a tiny cache keeps a few tables, or a single request could thrash it
#: (a qcow2 allocation can pin an L2 table and two refcount blocks at once).
MIN_CACHE_ENTRIES = 4
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024

# qemu's docs/qcow2-cache.txt, named so the sizing below can cite them.
#: Default maximum L2 cache size on Linux (covers 256 GiB with 64 KiB clusters).
QEMU_DEFAULT_L2_CACHE_MAX_BYTES = 32 * 1024 * 1024
#: qemu's minimum L2 cache (we clamp to MIN_CACHE_ENTRIES, which is larger).
QEMU_MIN_L2_CACHE_ENTRIES = 2
#: qemu's default, and minimum, refcount cache: 4 clusters.
QEMU_DEFAULT_REFCOUNT_CACHE_ENTRIES = 4
#: Bytes per L2 entry: 8, or 16 with extended L2 entries.
L2_ENTRY_BYTES = 8
EXTENDED_L2_ENTRY_BYTES = 16

_LOADING, _READY, _FAILED = "loading", "ready", "failed"

#: Guards every cache's dependency edges: a cycle check needs a consistent view
#: of the whole graph. Never held across storage I/O or while taking a cache lock.
_GRAPH_LOCK = sync.Lock()
#: Orders dependency edges against flushes (a flush resolves older edges only).
_SEQUENCE = itertools.count(1)


def capacity_for(table_count: int, table_size: int, limit_bytes: int = DEFAULT_CACHE_BYTES) -> int:
    """Entries for a cache that holds all tables of a disk, up to ``limit_bytes``."""
    return max(MIN_CACHE_ENTRIES, min(table_count, limit_bytes // max(table_size, 1)))


def l2_cache_entries(virtual_size: int, cluster_size: int, l2_cache_size: int | None = None,
                     *, entry_bytes: int = L2_ENTRY_BYTES) -> int:
    """Entries for an L2 cache, with qemu's ``l2-cache-size`` semantics.

    The option is a maximum in bytes (default QEMU_DEFAULT_L2_CACHE_MAX_BYTES);
    the cache never exceeds what holding every L2 table of the disk takes
    (the L2 bytes for ``virtual_size``, rounded up to whole clusters). Bytes
    become entries by rounding down, then at least MIN_CACHE_ENTRIES.
    """
    if cluster_size <= 0 or virtual_size < 0:
        raise OptionError(f"Invalid cache geometry: size {virtual_size}, cluster {cluster_size}")
    if l2_cache_size is not None and l2_cache_size < 0:
        raise OptionError(f"l2-cache-size must not be negative (got {l2_cache_size})")
    mapped_clusters = -(-virtual_size // cluster_size)
    all_tables_bytes = -(-mapped_clusters * entry_bytes // cluster_size) * cluster_size
    limit = QEMU_DEFAULT_L2_CACHE_MAX_BYTES if l2_cache_size is None else l2_cache_size
    return max(MIN_CACHE_ENTRIES, min(all_tables_bytes, limit) // cluster_size)


def refcount_cache_entries(cluster_size: int, refcount_cache_size: int | None = None) -> int:
    """Entries for a refcount-block cache, with qemu's ``refcount-cache-size``
    semantics: default and minimum QEMU_DEFAULT_REFCOUNT_CACHE_ENTRIES blocks."""
    if cluster_size <= 0:
        raise OptionError(f"Invalid cluster size {cluster_size}")
    if refcount_cache_size is None:
        return max(MIN_CACHE_ENTRIES, QEMU_DEFAULT_REFCOUNT_CACHE_ENTRIES)
    if refcount_cache_size < 0:
        raise OptionError(f"refcount-cache-size must not be negative (got {refcount_cache_size})")
    minimum = max(MIN_CACHE_ENTRIES, QEMU_DEFAULT_REFCOUNT_CACHE_ENTRIES)
    return max(minimum, refcount_cache_size // cluster_size)


class _Entry:
    """One cached table. ``state`` and ``writing`` change under both the cache
    lock and ``condition``; waiters hold only ``condition``."""

    __slots__ = ("condition", "data", "dirty", "offset", "pins", "state", "writing")

    def __init__(self, offset: int, data: bytearray, state: str):
        self.offset = offset
        self.data = data
        self.state = state
        self.pins = 0
        self.dirty = False
        self.writing = False
        self.condition = sync.Condition()

    def idle(self) -> bool:
        """Neither used, nor being read, nor being written: may be dropped."""
        return not self.pins and not self.writing and self.state == _READY


class TableHandle:
    """A pinned table: the table stays cached until ``release`` (or the end of
    the ``with`` block). Change ``data`` in place, then ``mark_dirty``."""

    __slots__ = ("_entry", "_released", "cache", "data", "offset")

    def __init__(self, cache: MetadataCache, entry: _Entry):
        self.cache = cache
        self.offset = entry.offset
        self.data = entry.data
        self._entry = entry
        self._released = False

    def mark_dirty(self) -> None:
        self.cache.mark_dirty(self)

    def release(self) -> None:
        self.cache.release(self)

    def __enter__(self) -> TableHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cache.release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else "pinned"
        return f"<TableHandle {self.cache.name} {self.offset:#x} {state}>"


class MetadataCache:
    """Tables of ``table_size`` bytes keyed by their offset in ``storage``.

    When every table is pinned, a miss grows the cache past ``entries``
    instead of failing (QEMU returns -ENOSPC there): with a thread per request,
    more tables can legitimately be in use at once than a small cache holds,
    and failing a guest request for it would be worse than a few extra tables,
    bounded by what is pinned. The next miss shrinks it back.

    ``writethrough`` writes each dirty table back when its handle is released
    (still after its dependencies and barriers).
    """

    def __init__(self, name: str, storage: Storage, table_size: int, entries: int,
                 *, writethrough: bool = False):
        if table_size <= 0:
            raise CorefmtError(f"cache {name}: table size must be positive (got {table_size})")
        self.name = name
        self.storage = storage
        self.table_size = table_size
        self.capacity = max(MIN_CACHE_ENTRIES, entries)
        self.writethrough = writethrough
        self.hits = self.misses = self.writebacks = 0
        self._lock = sync.Lock()  # the index and counters only: never held across I/O
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._barriers: list[Callable[[], object]] = []
        self._barriers_running = 0
        self._barriers_done = sync.Condition()
        self._flush_requested = self._flush_served = 0
        self._writes_done = self._writes_durable = 0
        # Guarded by _GRAPH_LOCK: caches to make durable first (-> edge sequence),
        # and the caches that depend on this one.
        self._deps: dict[MetadataCache, int] = {}
        self._dependents: weakref.WeakSet[MetadataCache] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<MetadataCache {self.name} {len(self)}/{self.capacity}>"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, offset: object) -> bool:
        with self._lock:
            return offset in self._entries

    @property
    def dirty_count(self) -> int:
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.dirty)

    # -- access -----------------------------------------------------------------------
    def get(self, offset: int) -> TableHandle:
        """Pin the table at ``offset``, reading it on a miss; ``release`` it after.

        Concurrent misses of one offset share a single read.
        """
        while True:
            with self._lock:
                entry = self._entries.get(offset)
                if entry is not None:
                    self.hits += 1
                    entry.pins += 1
                    self._entries.move_to_end(offset)
                    if entry.state == _READY:
                        return TableHandle(self, entry)
                else:
                    self.misses += 1
                    entry = _Entry(offset, bytearray(self.table_size), _LOADING)
                    entry.pins = 1
                    self._entries[offset] = entry
                    break
            # Another thread is reading this table: wait for it, outside the lock.
            with entry.condition:
                while entry.state == _LOADING:
                    entry.condition.wait()
            if entry.state == _READY:
                return TableHandle(self, entry)
            # Its read failed (and it left the index): try again ourselves.
        try:
            self._make_room()
            self.storage.readinto(offset, entry.data)
        except BaseException:
            self._set_state(entry, _FAILED, drop=True)
            raise
        self._set_state(entry, _READY)
        return TableHandle(self, entry)

    table = get  # ``with cache.table(offset) as t:`` reads better in a with block

    def table_empty(self, offset: int) -> TableHandle:
        """Pin a zeroed table for a freshly allocated ``offset``, without reading it.

        It starts dirty: the storage holds whatever the cluster held before.
        """
        with self._lock:
            entry = self._entries.get(offset)
            if entry is not None and (entry.pins or entry.state != _READY):
                raise CorefmtError(f"cache {self.name}: table {offset:#x} is allocated "
                                   "again while still in use")
            created = entry is None
            if entry is None:
                entry = _Entry(offset, bytearray(self.table_size), _READY)
                self._entries[offset] = entry
            else:
                # A write-back in flight works from its own copy: zeroing is safe.
                entry.data[:] = bytes(self.table_size)
                self._entries.move_to_end(offset)
            entry.dirty = True
            entry.pins += 1
        if created:
            try:
                self._make_room()
            except BaseException:
                with self._lock:
                    entry.pins -= 1
                    if self._entries.get(offset) is entry and entry.idle():
                        del self._entries[offset]
                raise
        return TableHandle(self, entry)

    def mark_dirty(self, handle: TableHandle) -> None:
        """Record that the table behind a pinned ``handle`` changed."""
        self._check_handle(handle, "mark_dirty")
        with self._lock:
            handle._entry.dirty = True

    def release(self, handle: TableHandle) -> None:
        """Unpin; in writethrough mode write the table back first if it is dirty."""
        self._check_handle(handle, "release")
        entry = handle._entry
        handle._released = True
        try:
            if self.writethrough and entry.dirty:
                self._write_back(entry)
        finally:
            with self._lock:
                entry.pins -= 1

    def forget(self, offset: int) -> None:
        """Drop a table without writing it back (its cluster was freed)."""
        while True:
            with self._lock:
                entry = self._entries.get(offset)
                if entry is None:
                    return
                if entry.pins:
                    raise CorefmtError(f"cache {self.name}: cannot forget table "
                                       f"{offset:#x}: it is in use")
                if not entry.writing:
                    del self._entries[offset]
                    return
            self._wait_written(entry)  # its old contents must not land after a reuse

    def clear(self) -> None:
        """Drop every table, dirty ones included (flush first to keep them)."""
        while True:
            with self._lock:
                if any(entry.pins for entry in self._entries.values()):
                    raise CorefmtError(f"cache {self.name}: cannot clear: tables are in use")
                busy = [entry for entry in self._entries.values() if entry.writing]
                if not busy:
                    self._entries.clear()
                    return
            for entry in busy:
                self._wait_written(entry)

    # -- ordering -----------------------------------------------------------------------
    def depends_on(self, other: MetadataCache) -> None:
        """Before any table of this cache is written, write back ``other`` and
        flush its storage.

        An existing dependency the other way round (``other`` on this cache,
        directly or through others) is resolved first by making this cache
        durable, so no cycle can form.
        """
        if other is self:
            raise CorefmtError(f"cache {self.name}: a cache cannot depend on itself")
        while True:
            with _GRAPH_LOCK:
                opposite = other._reaches(self)
            if opposite:
                self._make_durable()
            # Under our lock: a write-back checks for dependencies and copies the
            # table in one step, so it sees this edge or copies none of the
            # changes the caller makes after we return.
            with self._lock, _GRAPH_LOCK:
                if other._reaches(self):
                    continue  # set again meanwhile: resolve once more
                self._deps[other] = next(_SEQUENCE)
                other._dependents.add(self)
                return

    def add_barrier(self, barrier: Callable[[], object]) -> None:
        """Run ``barrier`` before the next write-back of this cache's tables (e.g.
        flush the data file, make a journal durable); it runs once, then is cleared.

        A barrier must not write back a cache that depends on this one.
        """
        with self._lock:
            self._barriers.append(barrier)

    def require_storage_flush(self) -> None:
        """Flush this cache's storage before its next write-back (data before metadata)."""
        with self._lock:
            self._flush_requested += 1

    # -- write-back ---------------------------------------------------------------------
    def flush(self, storage: bool = False) -> None:
        """Write back every dirty table in offset order, after dependencies and
        barriers; with ``storage``, then flush the storage too."""
        self._flush(storage, always_flush_storage=storage)

    def _flush(self, storage: bool, always_flush_storage: bool) -> None:
        with _GRAPH_LOCK:
            start = next(_SEQUENCE)
        with self._lock:
            dirty = sorted((entry for entry in self._entries.values() if entry.dirty),
                           key=lambda entry: entry.offset)
        for entry in dirty:
            self._write_back(entry)
        if not storage:
            return
        # Write-backs started by others (evictions) are part of what we flush.
        with self._lock:
            busy = [entry for entry in self._entries.values() if entry.writing]
        for entry in busy:
            self._wait_written(entry)
            self._write_back(entry)  # their write failed: the table is dirty, write it
        with self._lock:
            unflushed = self._writes_done != self._writes_durable
        if always_flush_storage or unflushed:
            self._flush_storage()
        self._resolve_dependents(start)

    def make_durable(self) -> None:
        """What a dependent needs: our tables written and our storage flushed
        (the storage flush skipped when nothing was written since the last)."""
        self._flush(storage=True, always_flush_storage=False)

    _make_durable = make_durable

    def _flush_storage(self) -> None:
        with self._lock:
            done = self._writes_done
        self.storage.flush()
        with self._lock:
            self._writes_durable = max(self._writes_durable, done)

    def _resolve_dependents(self, start: int) -> None:
        """Edges to this cache set before a flush that began at ``start`` are satisfied."""
        with _GRAPH_LOCK:
            for dependent in list(self._dependents):
                sequence = dependent._deps.get(self)
                if sequence is not None and sequence < start:
                    del dependent._deps[self]
                if self not in dependent._deps:
                    self._dependents.discard(dependent)

    def _reaches(self, target: MetadataCache) -> bool:
        """Whether ``target`` must be durable before this cache writes (under _GRAPH_LOCK)."""
        seen: set[int] = set()
        pending = list(self._deps)
        while pending:
            cache = pending.pop()
            if cache is target:
                return True
            if id(cache) not in seen:
                seen.add(id(cache))
                pending.extend(cache._deps)
        return False

    def _ordering_pending(self) -> bool:
        """Something must happen before a table may be written (under self._lock)."""
        if self._barriers or self._barriers_running:
            return True
        if self._flush_requested != self._flush_served:
            return True
        with _GRAPH_LOCK:
            return bool(self._deps)

    def _settle(self) -> None:
        """Resolve dependencies, run barriers and requested flushes (no lock held)."""
        with _GRAPH_LOCK:
            deps = list(self._deps)
        for dependency in deps:
            dependency._make_durable()
        with self._lock, self._barriers_done:
            barriers, self._barriers = self._barriers, []
            if barriers:
                self._barriers_running += 1
            others_running = not barriers and self._barriers_running
        if barriers:
            self._run_barriers(barriers)
        elif others_running:
            with self._barriers_done:
                while self._barriers_running:
                    self._barriers_done.wait()
        with self._lock:
            requested = self._flush_requested
            flush_needed = requested != self._flush_served
        if flush_needed:
            self._flush_storage()
            with self._lock:
                self._flush_served = max(self._flush_served, requested)

    def _run_barriers(self, barriers: list[Callable[[], object]]) -> None:
        done = 0
        try:
            while done < len(barriers):
                barriers[done]()
                done += 1
        finally:
            with self._lock, self._barriers_done:
                # A failed barrier and the ones after it still come first next time.
                self._barriers[:0] = barriers[done:]
                self._barriers_running -= 1
                self._barriers_done.notify_all()

    def _write_back(self, entry: _Entry) -> bool:
        """Write one dirty table after everything it must follow; False if clean."""
        while True:
            self._settle()
            with self._lock:
                wanted = self._entries.get(entry.offset) is entry and entry.dirty
                if not entry.writing:
                    if not wanted:
                        return False
                    if self._ordering_pending():
                        continue  # a new barrier or dependency meanwhile
                    # Copy under the lock, so later changes wait for the next write-back.
                    snapshot = bytes(entry.data)
                    entry.dirty = False
                    with entry.condition:
                        entry.writing = True
                    break
            # Someone else is writing it: one write per table at a time, in order.
            # Then look again: if their write failed, the table is dirty again.
            self._wait_written(entry)
        try:
            self.storage.write(entry.offset, snapshot)
        except BaseException:
            with self._lock, entry.condition:
                entry.dirty = True
                entry.writing = False
                entry.condition.notify_all()
            raise
        with self._lock, entry.condition:
            entry.writing = False
            self.writebacks += 1
            self._writes_done += 1
            entry.condition.notify_all()
        return True

    def _wait_written(self, entry: _Entry) -> None:
        with entry.condition:
            while entry.writing:
                entry.condition.wait()

    def _set_state(self, entry: _Entry, state: str, drop: bool = False) -> None:
        with self._lock, entry.condition:
            entry.state = state
            if drop:
                entry.pins -= 1
                if self._entries.get(entry.offset) is entry:
                    del self._entries[entry.offset]
            entry.condition.notify_all()

    def _make_room(self) -> None:
        """Evict least recently used idle tables down to capacity, writing dirty
        ones back first; if every table is in use, stay over capacity."""
        while True:
            with self._lock:
                if len(self._entries) <= self.capacity:
                    return
                victim = next((entry for entry in self._entries.values() if entry.idle()), None)
                if victim is None:
                    return  # all pinned or busy: grow for now
                if not victim.dirty:
                    del self._entries[victim.offset]
                    continue
            self._write_back(victim)
            with self._lock:
                if (self._entries.get(victim.offset) is victim and victim.idle()
                        and not victim.dirty):
                    del self._entries[victim.offset]

    def _check_handle(self, handle: TableHandle, action: str) -> None:
        if handle.cache is not self:
            raise CorefmtError(f"cache {self.name}: {action} of a table from cache "
                               f"{handle.cache.name}")
        if handle._released:
            raise CorefmtError(f"cache {self.name}: {action} of table {handle.offset:#x} "
                               "after its release")

"""The metadata-table cache: pinning, eviction, write ordering, concurrency."""

from __future__ import annotations

import random
import threading
import time

import pytest

from corefmt import cache as cache_module
from corefmt import sync
from corefmt.cache import (
    MIN_CACHE_ENTRIES,
    QEMU_DEFAULT_L2_CACHE_MAX_BYTES,
    MetadataCache,
    capacity_for,
    l2_cache_entries,
    refcount_cache_entries,
)
from corefmt.errors import CorefmtError, OptionError
from corefmt.storage.base import Storage
from corefmt.storage.memory import MemoryStorageDriver
from corefmt.stress.scheduler import BatchScheduler

TABLE = 512
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
#: How long a test thread may take before we call it stuck.
STUCK_SECONDS = 5


class OwnedLock(sync.Lock):
    """A cache lock that knows its owner, so storage can tell whether the thread
    doing I/O holds it (``locked()`` alone also sees other threads' holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        acquired = super().acquire(blocking)
        if acquired:
            self.owner = threading.get_ident()
        return acquired

    def release(self) -> None:
        self.owner = None
        super().release()

    def mine(self) -> bool:
        return self.owner == threading.get_ident()


@pytest.fixture(autouse=True)
def owned_graph_lock(monkeypatch):
    monkeypatch.setattr(cache_module, "_GRAPH_LOCK", OwnedLock())


class RecordingStorage(Storage):
    """A byte store that logs every read, write and flush to a shared log, and
    fails the request if any cache lock is held while it runs."""

    def __init__(self, name: str, log: list[tuple]):
        super().__init__(name, read_only=False)
        self.name = name
        self.log = log
        self.bytes = bytearray()
        self.caches: list[MetadataCache] = []
        self.on_write = None  # called inside write, for concurrency tests
        self.on_read = None
        self.scheduler: BatchScheduler | None = None

    def _check_unlocked(self, kind: str) -> None:
        assert not cache_module._GRAPH_LOCK.mine(), "storage I/O under the graph lock"
        for cache in self.caches:
            assert not cache._lock.mine(), f"storage I/O under {cache.name}'s lock"
        if self.scheduler is not None:
            self.scheduler.hold(kind)  # the request takes virtual time: others run

    def size(self) -> int:
        return len(self.bytes)

    def readinto(self, offset, buf) -> None:
        self._check_unlocked("read")
        self.log.append(("read", self.name, offset))
        if self.on_read is not None:
            self.on_read(offset)
        chunk = self.bytes[offset:offset + len(buf)]
        buf[:len(chunk)] = chunk
        buf[len(chunk):] = bytes(len(buf) - len(chunk))

    def _write(self, offset, data) -> None:
        self._check_unlocked("write")
        self.log.append(("write", self.name, offset))
        if self.on_write is not None:
            self.on_write(offset)
        end = offset + len(data)
        if end > len(self.bytes):
            self.bytes.extend(bytes(end - len(self.bytes)))
        self.bytes[offset:end] = data

    def _truncate(self, size: int) -> None:
        del self.bytes[size:]

    def flush(self) -> None:
        self._check_unlocked("flush")
        self.log.append(("flush", self.name))

    def byte(self, offset: int) -> int:
        return self.bytes[offset] if offset < len(self.bytes) else 0


def make_cache(name, storage, entries=8, **options) -> MetadataCache:
    cache = MetadataCache(name, storage, TABLE, entries, **options)
    cache._lock = OwnedLock()
    storage.caches.append(cache)
    return cache


@pytest.fixture
def log():
    return []


@pytest.fixture
def disk(log):
    return RecordingStorage("disk", log)


def without_reads(log):
    return [entry for entry in log if entry[0] != "read"]


def writes(log, name=None):
    return [entry for entry in log if entry[0] == "write" and name in (None, entry[1])]


def modify(cache, offset, value):
    with cache.table(offset) as table:
        table.data[0] = value
        table.mark_dirty()


# -- pinning -----------------------------------------------------------------------------
def test_pinned_table_is_never_evicted(disk, log):
    cache = make_cache("l2", disk, entries=MIN_CACHE_ENTRIES)
    pinned = cache.get(0)
    for index in range(1, 4 * MIN_CACHE_ENTRIES):
        with cache.table(index * TABLE):
            pass
    assert 0 in cache
    assert [entry for entry in log if entry == ("read", "disk", 0)] == [("read", "disk", 0)]
    with cache.table(0) as again:
        assert again.data is pinned.data
    cache.release(pinned)


def test_update_through_a_handle_survives_evictions(disk):
    """The old cache handed out the live table: once a clean table was evicted
    while its caller still changed it, mark_dirty marked a freshly read copy and
    the change was lost. A pinned table stays the one the cache writes back."""
    cache = make_cache("l2", disk, entries=MIN_CACHE_ENTRIES)
    handle = cache.get(0)  # clean: the old cache would evict it first
    handle.data[0] = 0x5A
    for index in range(1, 3 * MIN_CACHE_ENTRIES):  # other requests load tables meanwhile
        modify(cache, index * TABLE, index)
    cache.mark_dirty(handle)
    cache.release(handle)
    cache.flush()
    assert disk.byte(0) == 0x5A
    with cache.table(0) as table:
        assert table.data[0] == 0x5A
    for index in range(1, 3 * MIN_CACHE_ENTRIES):
        assert disk.byte(index * TABLE) == index


def test_every_table_pinned_grows_then_shrinks(disk):
    cache = make_cache("l2", disk, entries=MIN_CACHE_ENTRIES)
    handles = [cache.get(index * TABLE) for index in range(MIN_CACHE_ENTRIES + 2)]
    assert len(cache) == MIN_CACHE_ENTRIES + 2
    for handle in handles:
        cache.release(handle)
    with cache.table(100 * TABLE):
        pass
    assert len(cache) == MIN_CACHE_ENTRIES


def test_handles_are_checked(disk, log):
    cache = make_cache("l2", disk)
    other = make_cache("other", disk)
    handle = cache.get(0)
    with pytest.raises(CorefmtError, match="in use"):
        cache.forget(0)
    with pytest.raises(CorefmtError, match="in use"):
        cache.clear()
    with pytest.raises(CorefmtError, match="still in use"):
        cache.table_empty(0)
    with pytest.raises(CorefmtError, match="from cache"):
        other.mark_dirty(handle)
    cache.release(handle)
    with pytest.raises(CorefmtError, match="after its release"):
        cache.mark_dirty(handle)
    with pytest.raises(CorefmtError, match="after its release"):
        cache.release(handle)


def test_table_empty_is_zeroed_dirty_and_not_read(disk, log):
    disk.bytes[:] = b"\xff" * (4 * TABLE)
    cache = make_cache("l2", disk)
    with cache.table(TABLE) as old:
        assert old.data[0] == 0xFF
    with cache.table_empty(TABLE) as fresh, cache.table_empty(2 * TABLE) as other:
        assert fresh.data == bytes(TABLE) and other.data == bytes(TABLE)
    assert ("read", "disk", 2 * TABLE) not in log
    assert cache.dirty_count == 2
    cache.flush()
    assert disk.bytes[TABLE:3 * TABLE] == bytes(2 * TABLE)


def test_forget_drops_without_writing_and_clear_drops_all(disk, log):
    cache = make_cache("l2", disk)
    modify(cache, 0, 1)
    modify(cache, TABLE, 2)
    cache.forget(0)
    cache.forget(0x10000)  # not cached: nothing to do
    cache.flush()
    assert writes(log) == [("write", "disk", TABLE)]
    modify(cache, 2 * TABLE, 3)
    cache.clear()
    assert len(cache) == 0
    cache.flush()
    assert writes(log) == [("write", "disk", TABLE)]


# -- eviction order ----------------------------------------------------------------------
def test_eviction_is_least_recently_used(disk, log):
    cache = make_cache("l2", disk, entries=4)
    for index in range(4):
        with cache.table(index * TABLE):
            pass
    with cache.table(0):  # 0 is now the most recently used
        pass
    with cache.table(4 * TABLE):  # evicts 1 (clean: nothing written)
        pass
    assert TABLE not in cache and 0 in cache and 3 * TABLE in cache
    assert writes(log) == []
    for offset in (0, 2 * TABLE, 3 * TABLE, 4 * TABLE):
        modify(cache, offset, 9)
    with cache.table(5 * TABLE):  # all dirty: the LRU one is written back, then dropped
        pass
    assert writes(log) == [("write", "disk", 0)]
    assert 0 not in cache
    assert cache.misses == 6 and cache.hits == 5 and cache.writebacks == 1


def test_flush_writes_in_offset_order(disk, log):
    cache = make_cache("l2", disk)
    for index in (5, 1, 3, 2):
        modify(cache, index * TABLE, index)
    cache.flush()
    assert writes(log) == [("write", "disk", index * TABLE) for index in (1, 2, 3, 5)]
    assert cache.dirty_count == 0 and ("flush", "disk") not in log
    cache.flush(storage=True)
    assert log[-1] == ("flush", "disk")


# -- dependencies -----------------------------------------------------------------------
@pytest.fixture
def pair(log):
    """An L2 cache and a refcount cache on separate stores, to tell flushes apart."""
    l2_disk, refcount_disk = RecordingStorage("l2-disk", log), RecordingStorage("rc-disk", log)
    return make_cache("l2", l2_disk), make_cache("refcount", refcount_disk)


def test_dependency_is_written_and_flushed_first(pair, log):
    l2, refcounts = pair
    modify(refcounts, 0, 1)
    l2.depends_on(refcounts)
    modify(l2, TABLE, 7)
    l2.flush()
    assert log[-3:] == [("write", "rc-disk", 0), ("flush", "rc-disk"),
                        ("write", "l2-disk", TABLE)]
    # Resolved by that flush: the next L2 write-back needs nothing first.
    log.clear()
    modify(refcounts, 0, 2)
    modify(l2, TABLE, 8)
    l2.flush()
    assert log == [("write", "l2-disk", TABLE)]


def test_dependency_is_honoured_by_an_eviction(pair, log):
    l2, refcounts = pair
    modify(refcounts, 0, 1)
    l2.depends_on(refcounts)
    for index in range(l2.capacity + 1):  # fills L2 with dirty tables, evicting the first
        modify(l2, index * TABLE, 1)
    first_l2_write = log.index(("write", "l2-disk", 0))
    assert log[first_l2_write - 2:first_l2_write] == [("write", "rc-disk", 0),
                                                      ("flush", "rc-disk")]


def test_dependency_without_changes_still_flushes_earlier_write_backs(pair, log):
    """A refcount block evicted (written, not flushed) must still be durable first."""
    l2, refcounts = pair
    modify(refcounts, 0, 1)
    refcounts.flush()  # written back, but not flushed
    l2.depends_on(refcounts)
    modify(l2, TABLE, 1)
    l2.flush()
    assert log[-2:] == [("flush", "rc-disk"), ("write", "l2-disk", TABLE)]


def test_dependencies_in_both_directions_over_time(pair, log):
    l2, refcounts = pair
    # Allocating: refcount blocks before L2 tables.
    modify(refcounts, 0, 1)
    l2.depends_on(refcounts)
    modify(l2, TABLE, 1)
    l2.flush()
    assert writes(log) == [("write", "rc-disk", 0), ("write", "l2-disk", TABLE)]
    # Freeing: L2 tables before refcount blocks.
    log.clear()
    modify(l2, TABLE, 0)
    refcounts.depends_on(l2)
    modify(refcounts, 0, 0)
    refcounts.flush()
    assert log == [("write", "l2-disk", TABLE), ("flush", "l2-disk"), ("write", "rc-disk", 0)]


def test_flipping_a_dependency_resolves_the_existing_one_first(pair, log):
    l2, refcounts = pair
    modify(refcounts, 0, 1)
    l2.depends_on(refcounts)  # refcounts first
    modify(l2, TABLE, 1)
    log.clear()
    refcounts.depends_on(l2)  # now L2 first: the old edge is flushed away at once
    assert log == [("write", "rc-disk", 0), ("flush", "rc-disk")]
    modify(refcounts, 0, 2)
    log.clear()
    refcounts.flush()
    assert log == [("write", "l2-disk", TABLE), ("flush", "l2-disk"), ("write", "rc-disk", 0)]
    assert l2._deps == {} and refcounts._deps == {}


def test_a_transitive_cycle_is_resolved_too(log):
    caches = [make_cache(name, RecordingStorage(name + "-disk", log)) for name in "abc"]
    a, b, c = caches
    for cache in caches:
        modify(cache, 0, 1)
    a.depends_on(b)
    b.depends_on(c)
    log.clear()
    c.depends_on(a)  # a -> b -> c -> a would be a cycle: c is made durable first
    assert log == [("write", "c-disk", 0), ("flush", "c-disk")]
    modify(c, 0, 2)
    log.clear()
    c.flush()  # c after a, which still comes after b
    assert writes(log) == [("write", "b-disk", 0), ("write", "a-disk", 0),
                           ("write", "c-disk", 0)]


def test_dependency_on_itself_is_refused(disk):
    cache = make_cache("l2", disk)
    with pytest.raises(CorefmtError, match="itself"):
        cache.depends_on(cache)


# -- barriers and storage flushes --------------------------------------------------------
def test_barrier_runs_before_the_write_back_once(disk, log):
    cache = make_cache("l2", disk)
    cache.add_barrier(lambda: log.append(("barrier", 1)))
    cache.add_barrier(lambda: log.append(("barrier", 2)))
    cache.flush()  # nothing to write: the barriers wait for a write-back
    assert log == []
    modify(cache, 0, 1)
    modify(cache, TABLE, 1)
    cache.flush()
    assert without_reads(log) == [("barrier", 1), ("barrier", 2), ("write", "disk", 0),
                                  ("write", "disk", TABLE)]
    log.clear()
    modify(cache, 0, 2)
    cache.flush()
    assert log == [("write", "disk", 0)]


def test_barrier_runs_before_an_eviction_write_back(disk, log):
    cache = make_cache("l2", disk, entries=MIN_CACHE_ENTRIES)
    for index in range(MIN_CACHE_ENTRIES):
        modify(cache, index * TABLE, 1)
    cache.add_barrier(lambda: log.append(("barrier",)))
    with cache.table(10 * TABLE):
        pass
    first_write = writes(log)[0]
    assert log.index(("barrier",)) < log.index(first_write)


def test_failed_barrier_stays_and_blocks_the_write(disk, log):
    cache = make_cache("l2", disk)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("journal device gone")

    cache.add_barrier(flaky)
    modify(cache, 0, 1)
    with pytest.raises(OSError):
        cache.flush()
    assert writes(log) == [] and cache.dirty_count == 1
    cache.flush()
    assert len(calls) == 2 and writes(log) == [("write", "disk", 0)]


def test_require_storage_flush(disk, log):
    cache = make_cache("l2", disk)
    cache.require_storage_flush()
    modify(cache, 0, 1)
    cache.flush()
    assert without_reads(log) == [("flush", "disk"), ("write", "disk", 0)]
    log.clear()
    modify(cache, 0, 2)
    cache.flush()
    assert log == [("write", "disk", 0)]


# -- writethrough ------------------------------------------------------------------------
def test_writethrough_writes_at_release_after_its_ordering(pair, log):
    l2_disk = pair[0].storage
    l2 = make_cache("l2wt", l2_disk, writethrough=True)
    refcounts = pair[1]
    modify(refcounts, 0, 1)
    l2.depends_on(refcounts)
    l2.add_barrier(lambda: log.append(("barrier",)))
    handle = l2.get(TABLE)
    handle.data[0] = 3
    l2.mark_dirty(handle)
    assert writes(log, "l2-disk") == []
    l2.release(handle)
    assert log[-4:] == [("write", "rc-disk", 0), ("flush", "rc-disk"), ("barrier",),
                        ("write", "l2-disk", TABLE)]
    assert l2.dirty_count == 0
    with l2.table(TABLE):  # not dirty: nothing written
        pass
    assert len(writes(log, "l2-disk")) == 1


# -- concurrency --------------------------------------------------------------------------
def run_threads(targets) -> None:
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STUCK_SECONDS)
        assert not thread.is_alive(), "thread stuck"
    if errors:
        raise errors[0]


def wait_until(condition) -> None:
    deadline = time.monotonic() + STUCK_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_concurrent_misses_of_one_table_read_it_once(disk, log):
    disk.bytes[:] = b"\x42" * TABLE
    cache = make_cache("l2", disk)
    read_may_finish = threading.Event()
    disk.on_read = lambda offset: read_may_finish.wait(STUCK_SECONDS)
    seen = []

    def reader():
        with cache.table(0) as table:
            seen.append(bytes(table.data[:1]))

    def release_when_both_asked():
        wait_until(lambda: cache.misses + cache.hits == 2)
        read_may_finish.set()

    run_threads([reader, reader, release_when_both_asked])
    assert [entry for entry in log if entry[0] == "read"] == [("read", "disk", 0)]
    assert seen == [b"\x42", b"\x42"]
    assert cache.misses == 1 and cache.hits == 1


def test_no_storage_io_under_the_cache_lock(disk, log):
    """A hit on another table completes while a write-back and a read are in
    flight (RecordingStorage also asserts no cache lock is held during I/O)."""
    cache = make_cache("l2", disk)
    with cache.table(TABLE):  # the hot table
        pass
    hits_during_io = []

    def take_a_hit(offset):
        if offset == TABLE:
            return
        thread = threading.Thread(target=lambda: cache.table(TABLE).release())
        thread.start()
        thread.join(STUCK_SECONDS)
        hits_during_io.append(not thread.is_alive())

    disk.on_write = disk.on_read = take_a_hit
    modify(cache, 0, 1)  # a read
    cache.flush()  # a write
    assert hits_during_io == [True, True]


def racing_updates(disk, workers, rounds, seed=0, wrap=None):
    """Workers change their own byte of random tables in a cache much smaller
    than the tables they touch, setting dependencies as they go; returns the
    bytes every change should have left on ``disk``."""
    tables = 4 * MIN_CACHE_ENTRIES
    cache = make_cache("l2", disk, entries=MIN_CACHE_ENTRIES)
    refcounts = make_cache("refcount", RecordingStorage("rc", disk.log))
    if disk.scheduler is not None:
        refcounts.storage.scheduler = disk.scheduler
    expected = bytearray(tables * TABLE)

    def worker(tag):
        rng = random.Random(seed * 1000 + tag)
        for step in range(rounds):
            table_offset = rng.randrange(tables) * TABLE
            with cache.table(table_offset) as table:
                table.data[tag] = (table.data[tag] + 1) % 256
                expected[table_offset + tag] = table.data[tag]  # each worker its own byte
                if step % 3 == 0:
                    modify(refcounts, rng.randrange(2) * TABLE, step % 256)
                    cache.depends_on(refcounts)
                elif step % 3 == 1:
                    refcounts.depends_on(cache)  # the other way round: a flip
                table.mark_dirty()
            if rng.random() < 0.1:
                cache.flush(storage=rng.random() < 0.5)

    def run(tag):
        if wrap is None:
            worker(tag)
        else:
            with wrap(tag):
                worker(tag)

    run_threads([lambda tag=tag: run(tag) for tag in range(workers)])
    cache.flush(storage=True)
    refcounts.flush(storage=True)
    return bytes(expected)


def test_concurrent_updates_are_never_lost(disk):
    disk.on_read = disk.on_write = lambda offset: time.sleep(0.0001)  # let threads interleave
    expected = racing_updates(disk, workers=6, rounds=60)
    assert bytes(disk.bytes[:len(expected)].ljust(len(expected), b"\0")) == expected


@pytest.mark.parametrize("seed", range(12))
def test_races_replayed_by_the_stress_scheduler(seed, disk):
    """The stress scheduler runs one thread at a time and switches only at storage
    requests and corefmt.sync waits: a wait it cannot see would hang the batch,
    a deadlock raises ScheduleDeadlock, and every seed explores another order."""
    workers = 4
    scheduler = BatchScheduler(random.Random(seed))
    scheduler.begin(range(workers))
    disk.scheduler = scheduler
    expected = racing_updates(disk, workers, rounds=12, seed=seed, wrap=scheduler.task)
    assert bytes(disk.bytes[:len(expected)].ljust(len(expected), b"\0")) == expected
    assert scheduler.handovers > workers


@pytest.mark.parametrize("seed", range(8))
def test_scheduled_concurrent_misses_read_once(seed, disk, log):
    scheduler = BatchScheduler(random.Random(seed))
    workers = 3
    scheduler.begin(range(workers))
    disk.scheduler = scheduler
    cache = make_cache("l2", disk)

    def reader(tag):
        with scheduler.task(tag), cache.table(0) as table:
            table.data[tag] = 1
            table.mark_dirty()

    run_threads([lambda tag=tag: reader(tag) for tag in range(workers)])
    assert [entry for entry in log if entry[0] == "read"] == [("read", "disk", 0)]
    cache.flush()
    assert disk.bytes[:workers] == b"\x01" * workers


# -- sizing -----------------------------------------------------------------------------
def test_l2_cache_size_follows_qemu():
    cluster = 64 * KIB
    # Default: at most 32 MiB, i.e. full coverage of 256 GiB with 64 KiB clusters...
    assert l2_cache_entries(TIB, cluster) == QEMU_DEFAULT_L2_CACHE_MAX_BYTES // cluster == 512
    assert l2_cache_entries(256 * GIB, cluster) == 512
    # ...but never more than holding every L2 table takes (rounded up to a cluster).
    assert l2_cache_entries(64 * GIB, cluster) == 128
    assert l2_cache_entries(1280 * MIB, cluster) == MIN_CACHE_ENTRIES  # 3 tables needed
    assert l2_cache_entries(10 * GIB, cluster) == 20
    # An explicit l2-cache-size is a byte maximum, rounded down to whole tables.
    assert l2_cache_entries(TIB, cluster, 1 * MIB + 100) == 16
    assert l2_cache_entries(TIB, cluster, 0) == MIN_CACHE_ENTRIES
    assert l2_cache_entries(TIB, cluster, 64 * MIB) == 1024
    assert l2_cache_entries(64 * GIB, cluster, 64 * MIB) == 128
    # Extended L2 entries need twice the cache for the same disk.
    assert l2_cache_entries(64 * GIB, cluster, entry_bytes=16) == 256
    with pytest.raises(OptionError):
        l2_cache_entries(TIB, cluster, -1)


def test_refcount_cache_size_follows_qemu():
    assert refcount_cache_entries(64 * KIB) == 4
    assert refcount_cache_entries(64 * KIB, 1 * MIB) == 16
    assert refcount_cache_entries(64 * KIB, 64 * KIB) == 4
    assert capacity_for(10, TABLE) == 10 and capacity_for(1, TABLE) == MIN_CACHE_ENTRIES


def test_works_over_a_memory_store():
    storage = MemoryStorageDriver().create("memory:metadata-cache")
    cache = MetadataCache("l2", storage, TABLE, MIN_CACHE_ENTRIES)
    for index in range(3 * MIN_CACHE_ENTRIES):
        with cache.table_empty(index * TABLE) as table:
            table.data[:2] = bytes([index, 0xEE])
    cache.flush(storage=True)
    for index in range(3 * MIN_CACHE_ENTRIES):
        assert storage.read(index * TABLE, 2) == bytes([index, 0xEE])

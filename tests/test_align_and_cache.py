"""Read-modify-write alignment, tracked requests and the metadata cache."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from corefmt.block.align import write_unaligned
from corefmt.block.tracked import RequestTracker
from corefmt.cache import MetadataCache
from corefmt.storage.memory import MemoryStorageDriver


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 5000), length=st.integers(1, 5000),
       alignment=st.sampled_from([1, 512, 4096]))
def test_write_unaligned_matches_a_plain_write(offset, length, alignment):
    disk = bytearray(range(256)) * 64  # 16 KiB of known bytes
    model = bytearray(disk)
    data = bytes((i * 7 + 1) % 256 for i in range(length))
    model[offset:offset + length] = data
    writes = []

    def read(at, count):
        assert at % alignment == 0 and count % alignment == 0
        return bytes(disk[at:at + count])

    def write(at, payload):
        assert at % alignment == 0 and len(payload) % alignment == 0
        writes.append((at, len(payload)))
        disk[at:at + len(payload)] = payload

    write_unaligned(offset, data, alignment, read, write)
    assert disk[:len(model)] == model
    assert len(writes) <= 3


def test_tracker_serialises_only_conflicting_requests():
    tracker = RequestTracker()
    order = []
    with tracker.track(0, 100, exclusive=True):
        # disjoint and shared-vs-shared never wait
        with tracker.track(100, 200, exclusive=True):
            pass

        def blocked():
            with tracker.track(50, 60, exclusive=False):
                order.append("reader")

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.05)
        order.append("writer done")
    thread.join()
    assert order == ["writer done", "reader"]
    with tracker.track(0, 10, exclusive=False), tracker.track(0, 10, exclusive=False):
        assert tracker.in_flight == 2


class _LoggingStorage:
    """Wraps a memory store and records writes and flushes in order."""

    def __init__(self, name):
        self.inner = MemoryStorageDriver().create(name)
        self.log = []

    def readinto(self, offset, buf):
        self.inner.readinto(offset, buf)

    def write(self, offset, data):
        self.log.append(("write", offset))
        self.inner.write(offset, data)

    def flush(self):
        self.log.append(("flush", None))


def test_cache_flush_order_follows_dependency():
    storage = _LoggingStorage("memory:cache-order")
    refcounts = MetadataCache("refcount", storage, 512, 8)
    tables = MetadataCache("l2", storage, 512, 8)
    tables.set_dependency(refcounts)
    refcounts.get_empty(0x1000)[0] = 1
    table = tables.get(0x2000)
    table[0] = 7
    tables.mark_dirty(0x2000)
    tables.flush()
    assert storage.log == [("write", 0x1000), ("flush", None), ("write", 0x2000)]
    assert storage.inner.read(0x2000, 1) == b"\x07"


def test_cache_evicts_least_recently_used_and_writes_dirty_victims():
    storage = _LoggingStorage("memory:cache-lru")
    cache = MetadataCache("t", storage, 512, 4)
    for index in range(4):
        cache.get(index * 512)
    cache.get(0)  # 0 is now most recently used
    cache.get(4 * 512)  # evicts 512 (clean: nothing written)
    assert storage.log == []
    for offset in (0, 1024, 1536, 2048):
        cache.get(offset)[0] = 9
        cache.mark_dirty(offset)
    cache.get(5 * 512)  # all dirty: the least recently used is written back
    assert storage.log == [("write", 0)]
    assert storage.inner.read(0, 1) == b"\x09"
    assert cache.get(0)[0] == 9  # read back from storage
    assert cache.misses == 7

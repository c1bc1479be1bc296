"""The readahead cache of remote stores, against a store that counts requests."""

from __future__ import annotations

import pytest

from corefmt.storage.readahead import ReadAhead
from tests.conftest import fill

KiB = 1024
SIZE = 8 * 1024 * KiB
START, MAXIMUM, BUDGET = 64 * KiB, 512 * KiB, 1024 * KiB


class CountingStore:
    def __init__(self) -> None:
        self.data = fill(SIZE, 3)
        self.requests: list[tuple[int, int]] = []

    def fetch(self, offset: int, view: memoryview) -> None:
        self.requests.append((offset, len(view)))
        view[:] = self.data[offset:offset + len(view)]


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def cache(store: CountingStore) -> ReadAhead:
    return ReadAhead(store.fetch, SIZE, window_start=START, window_max=MAXIMUM,
                     cache_bytes=BUDGET)


def _read(cache: ReadAhead, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    cache.readinto(offset, memoryview(buf))
    return bytes(buf)


def test_sequential_reads_fetch_growing_windows(store: CountingStore, cache: ReadAhead):
    block = 4 * KiB
    for offset in range(0, 2048 * KiB, block):
        assert _read(cache, offset, block) == store.data[offset:offset + block]
    sizes = [length for _, length in store.requests]
    assert sizes[:4] == [block, START, 2 * START, 4 * START]
    assert max(sizes) == MAXIMUM
    assert len(store.requests) < 10  # instead of 512 round trips
    starts = [offset for offset, _ in store.requests]
    assert starts == sorted(starts)  # every window starts where the last ended


def test_random_reads_fetch_only_what_is_asked(store: CountingStore, cache: ReadAhead):
    for offset in (3 * 1024 * KiB, 17 * KiB, 5 * 1024 * KiB, 0):
        assert _read(cache, offset, 512) == store.data[offset:offset + 512]
    assert [length for _, length in store.requests] == [512] * 4


def test_large_reads_bypass_the_cache(store: CountingStore, cache: ReadAhead):
    for offset in range(0, 4 * MAXIMUM, MAXIMUM):
        assert _read(cache, offset, MAXIMUM) == store.data[offset:offset + MAXIMUM]
    assert store.requests == [(offset, MAXIMUM) for offset in range(0, 4 * MAXIMUM, MAXIMUM)]
    assert cache.fetches == 0


def test_windows_stop_at_the_end_and_the_cache_stays_bounded(store: CountingStore,
                                                            cache: ReadAhead):
    block = 16 * KiB
    for offset in range(0, SIZE, block):
        assert _read(cache, offset, block) == store.data[offset:offset + block]
    assert all(offset + length <= SIZE for offset, length in store.requests)
    assert cache._cached <= BUDGET
    # Read again from the start: the first windows were dropped, so it is fetched.
    before = len(store.requests)
    assert _read(cache, 0, block) == store.data[:block]
    assert len(store.requests) == before + 1


def test_long_sequential_reads_go_straight_to_the_store(store: CountingStore):
    """Reads of direct_read bytes or more are never widened into windows
    (each would be copied once more, through a window of its own)."""
    cache = ReadAhead(store.fetch, SIZE, window_start=START, window_max=4 * MAXIMUM,
                      cache_bytes=8 * BUDGET, direct_read=256 * KiB)
    for offset in range(0, 2048 * KiB, 256 * KiB):
        assert _read(cache, offset, 256 * KiB) == store.data[offset:offset + 256 * KiB]
    assert store.requests == [(offset, 256 * KiB) for offset in range(0, 2048 * KiB, 256 * KiB)]
    assert cache.hits == 0

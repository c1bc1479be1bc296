"""Block status of huge sparse images costs per extent, not per window of
virtual size: map and convert of a 1 PiB raw with a few extents make a few
dozen data_run calls and lseeks (they made millions, one per 256 MiB)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator

import pytest

import corefmt
from corefmt.block import status_cache
from corefmt.block.status_cache import ChainStatusCache
from corefmt.extents import ChainExtent
from corefmt.ops.map import map_entries
from corefmt.storage.file import FileStorage

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PiB = 1024 * 1024 * GiB
TMPFS = "/dev/shm"  # ext4 refuses files over 16 TiB; tmpfs takes a petabyte
EXTENT_STARTS = (0, 3 * GiB + 4 * KiB, 17 * 1024 * GiB, PiB // 2 + 64 * KiB, PiB - MiB)
EXTENT_LENGTH = 64 * KiB
#: Bound on data_run calls and lseeks: O(extents). Fails fast (raises) past
#: it, so the old cost (four million calls) is not waited for.
CALL_BUDGET = 100


class CallBudgetExceeded(AssertionError):
    pass


@pytest.fixture
def petabyte_raw() -> Iterator[str]:
    if not os.path.isdir(TMPFS):
        pytest.skip(f"no {TMPFS} (tmpfs) for a 1 PiB sparse file")
    path = os.path.join(TMPFS, f"corefmt-test-{uuid.uuid4().hex}.raw")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        pytest.skip(f"cannot create a file in {TMPFS}: {error}")
    try:
        try:
            os.ftruncate(fd, PiB)
        except OSError as error:
            pytest.skip(f"{TMPFS} refuses a 1 PiB sparse file: {error}")
        for number, start in enumerate(EXTENT_STARTS):
            os.pwrite(fd, bytes([number + 1]) * EXTENT_LENGTH, start)
        os.close(fd)
        fd = -1
        yield path
    finally:
        if fd >= 0:
            os.close(fd)
        for leftover in (path, path + ".copy"):
            if os.path.exists(leftover):
                os.unlink(leftover)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts FileStorage.data_run calls and os.lseek calls."""
    counts = {"data_run": 0, "lseek": 0}
    real_data_run, real_lseek = FileStorage.data_run, os.lseek

    def count(name: str) -> None:
        counts[name] += 1
        if counts[name] > CALL_BUDGET:
            raise CallBudgetExceeded(f"more than {CALL_BUDGET} {name} calls")

    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        count("data_run")
        return real_data_run(self, offset, length)

    def lseek(fd: int, position: int, whence: int) -> int:
        count("lseek")
        return real_lseek(fd, position, whence)

    monkeypatch.setattr(FileStorage, "data_run", data_run)
    monkeypatch.setattr(os, "lseek", lseek)
    return counts


def test_map_of_a_petabyte_sparse_raw_costs_per_extent(petabyte_raw, counted):
    with corefmt.open(petabyte_raw, "raw", read_only=True) as disk:
        entries = list(map_entries(disk))
    data = [(entry["start"], entry["length"]) for entry in entries if entry["data"]]
    assert data == [(start, EXTENT_LENGTH) for start in EXTENT_STARTS]
    assert sum(entry["length"] for entry in entries) == PiB
    assert counted["data_run"] < CALL_BUDGET and counted["lseek"] < CALL_BUDGET


def test_convert_of_a_petabyte_sparse_raw_costs_per_extent(petabyte_raw, counted):
    target = petabyte_raw + ".copy"
    corefmt.convert(petabyte_raw, target, source_format="raw", cache="unsafe")
    assert counted["data_run"] < CALL_BUDGET
    assert os.path.getsize(target) == PiB
    with open(target, "rb") as copy:
        for number, start in enumerate(EXTENT_STARTS):
            copy.seek(start)
            assert copy.read(EXTENT_LENGTH) == bytes([number + 1]) * EXTENT_LENGTH
    assert os.stat(target).st_blocks * 512 < 2 * len(EXTENT_STARTS) * EXTENT_LENGTH


def test_compare_of_petabyte_sparse_raws_costs_per_extent(petabyte_raw, counted):
    with corefmt.open(petabyte_raw, "raw", read_only=True) as first, \
            corefmt.open(petabyte_raw, "raw", read_only=True) as second:
        assert corefmt.compare_nodes(first, second).identical
    assert counted["data_run"] < CALL_BUDGET and counted["lseek"] < CALL_BUDGET


# -- the chain status cache over a long range ------------------------------------------
def _extents_of(layout: list[tuple[int, int, bool]]) -> list[ChainExtent]:
    return [ChainExtent(start, length, data, not data, 0, None)
            for start, length, data in layout]


def _layout(size: int, seed: int) -> list[tuple[int, int, bool]]:
    """Alternating hole/data runs of random lengths covering [0, size)."""
    rng = random.Random(seed)
    runs, position, data = [], 0, False
    while position < size:
        length = min(size - position, rng.choice([512, 4096, MiB, GiB, 300 * GiB]))
        runs.append((position, length, data))
        position += length
        data = not data
    return runs


def _compute_from(layout: list[tuple[int, int, bool]], calls: list[tuple[int, int]]):
    extents = _extents_of(layout)

    def compute(offset: int, length: int) -> list[ChainExtent]:
        calls.append((offset, length))
        end = offset + length
        return [extent.clip(offset, end) for extent in extents
                if extent.end > offset and extent.offset < end]

    return compute


def test_a_long_lookup_is_one_compute_and_caches_only_boundaries():
    layout = [(0, 4096, True), (4096, PiB - 8192, False), (PiB - 4096, 4096, True)]
    calls: list[tuple[int, int]] = []
    cache = ChainStatusCache(_compute_from(layout, calls), lambda: PiB)
    result = cache.lookup(0, PiB)
    assert [(e.offset, e.length, e.data) for e in result] == layout
    assert calls == [(0, PiB)]
    assert cache.extent_count <= 4  # two chunks: the first and the last
    assert cache.lookup(PiB - 8192, 8192)[-1].data
    assert cache.lookup(100, 10) == [ChainExtent(100, 10, True, False, 0, None)]
    assert len(calls) == 1  # both answered from the cached boundary chunks
    middle = cache.lookup(PiB // 2, 4096)  # a chunk inside the hole: computed on demand
    assert [(e.offset, e.length, e.data) for e in middle] == [(PiB // 2, 4096, False)]
    assert calls[1] == (PiB // 2, status_cache.STATUS_CHUNK_SIZE)


@pytest.mark.parametrize("seed", range(6))
def test_cached_status_equals_computed_status(seed):
    """Random lookups (long and short, in any order) through the cache give
    exactly what a direct computation gives."""
    size = 4 * 1024 * GiB
    layout = _layout(size, seed)
    calls: list[tuple[int, int]] = []
    compute = _compute_from(layout, calls)
    cache = ChainStatusCache(compute, lambda: size)
    rng = random.Random(seed)
    for _ in range(200):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, rng.choice([4096, GiB, 64 * GiB, size])) + 1)
        expected = [(e.offset, e.length, e.data) for e in compute(offset, length)]
        merged: list[tuple[int, int, bool]] = []
        for start, run, data in expected:  # merge_runs, as lookup returns them
            if merged and merged[-1][2] == data and sum(merged[-1][:2]) == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + run, data)
            else:
                merged.append((start, run, data))
        assert [(e.offset, e.length, e.data) for e in cache.lookup(offset, length)] == merged

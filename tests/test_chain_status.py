"""Chain status stays right while the chain changes: generations,
invalidation, the stale-insert race, bounds, status above a base, reopen."""

from __future__ import annotations

import pytest

import corefmt
from corefmt.block import status_cache
from corefmt.block.status_cache import ChainStatusCache
from corefmt.extents import ChainExtent
from tests.conftest import fill

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096


@pytest.fixture
def chain(blockmap, tmp_path):
    """base.raw (all data) <- mid.bm (block 1) <- top.bm (block 3), 64 KiB."""
    base_data = fill(64 * KiB, 1)
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", 64 * KiB)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, base_data)
    corefmt.create(str(tmp_path / "mid.bm"), "blockmap", backing="base.raw",
                   backing_format="raw")
    with corefmt.open(str(tmp_path / "mid.bm"), backing=False) as disk:
        disk.write(BLOCK, b"M" * BLOCK)
    corefmt.create(str(tmp_path / "top.bm"), "blockmap", backing="mid.bm",
                   backing_format="blockmap")
    with corefmt.open(str(tmp_path / "top.bm"), backing=False) as disk:
        disk.write(3 * BLOCK, b"T" * BLOCK)
    return tmp_path, base_data


def _depths(node, length=8 * BLOCK):
    return [(e.offset, e.length, e.depth) for e in node.block_status(0, length)]


def test_a_write_below_a_cached_read_only_overlay_is_seen(chain):
    path, base_data = chain
    with corefmt.open(str(path / "top.bm"), read_only=True) as top:
        mid = top.chain()[1]
        assert top.read(5 * BLOCK, BLOCK) == base_data[5 * BLOCK:6 * BLOCK]  # now cached
        mid.reopen(read_only=False)
        mid.write(5 * BLOCK, b"N" * BLOCK)
        assert top.read(5 * BLOCK, BLOCK) == b"N" * BLOCK  # while mid is read-write
        mid.reopen(read_only=True)
        assert top.read(5 * BLOCK, BLOCK) == b"N" * BLOCK
        assert (5 * BLOCK, BLOCK, 1) in _depths(top)


def test_zeroing_discard_and_truncate_below_are_seen(chain):
    path, _ = chain
    with corefmt.open(str(path / "top.bm"), read_only=True) as top:
        base = top.chain()[2]
        top.read(0, 64 * KiB)
        base.reopen(read_only=False)
        base.write_zeroes(6 * BLOCK, BLOCK)
        assert top.read(6 * BLOCK, BLOCK) == bytes(BLOCK)
        base.truncate(32 * KiB)
        assert top.read(40 * KiB, BLOCK) == bytes(BLOCK)
        assert not [e for e in top.block_status(32 * KiB, 32 * KiB) if e.present]


def test_re_pointing_a_backing_link_is_seen(chain):
    path, _ = chain
    other = str(path / "other.raw")
    corefmt.create(other, "raw", 64 * KiB)
    with corefmt.open(other, "raw") as disk:
        disk.write(0, b"O" * 64 * KiB)
    with corefmt.open(str(path / "top.bm"), read_only=True) as top, \
            corefmt.open(other, "raw", read_only=True) as replacement:
        mid = top.chain()[1]
        old_base = mid.backing
        top.read(0, 64 * KiB)
        mid.set_backing(replacement)
        try:
            assert top.read(0, BLOCK) == b"O" * BLOCK
        finally:
            mid.set_backing(old_base)


def test_a_status_computed_across_an_invalidation_is_not_kept(chain):
    path, _ = chain
    with corefmt.open(str(path / "top.bm"), read_only=True) as top:
        mid = top.chain()[1]
        mid.reopen(read_only=False)
        cache = top.layer()._status_cache
        real_compute = cache._compute
        raced = []

        def compute_while_writing(offset, length):
            result = real_compute(offset, length)
            if not raced:  # a write below lands after the walk, before the insert
                raced.append(True)
                mid.write(7 * BLOCK, b"R" * BLOCK)
            return result

        cache._compute = compute_while_writing
        top.block_status(0, BLOCK)  # computed across the write: must not be cached
        cache._compute = real_compute
        assert top.read(7 * BLOCK, BLOCK) == b"R" * BLOCK
        assert (7 * BLOCK, BLOCK, 1) in _depths(top)


def test_a_read_only_overlay_larger_than_its_base_reads_zeros_past_it(blockmap, tmp_path):
    corefmt.create(str(tmp_path / "small.raw"), "raw", 64 * KiB)
    with corefmt.open(str(tmp_path / "small.raw"), "raw") as disk:
        disk.write(0, b"s" * 64 * KiB)
    corefmt.create(str(tmp_path / "big.bm"), "blockmap", MiB, backing="small.raw",
                   backing_format="raw")
    corefmt.create(str(tmp_path / "top.bm"), "blockmap", MiB, backing="big.bm",
                   backing_format="blockmap")
    with corefmt.open(str(tmp_path / "top.bm"), read_only=True) as top:
        assert top.read(60 * KiB, 8 * KiB) == b"s" * 4096 + bytes(4096)
        tail = top.block_status(64 * KiB, MiB - 64 * KiB)
        assert tail and all(not e.present and e.zero and not e.data for e in tail)


def test_status_above_a_base(chain):
    path, _ = chain
    with corefmt.open(str(path / "top.bm"), read_only=True) as top:
        _, mid, base = top.chain()
        assert top.is_allocated_above(base, 0, 5 * BLOCK) == [
            (0, BLOCK, False), (BLOCK, BLOCK, True), (2 * BLOCK, BLOCK, False),
            (3 * BLOCK, BLOCK, True), (4 * BLOCK, BLOCK, False)]
        assert top.is_allocated_above(mid, 0, 4 * BLOCK) == [
            (0, 3 * BLOCK, False), (3 * BLOCK, BLOCK, True)]
        above = top.block_status_above(mid, 0, BLOCK)
        assert above[0].node is None and not above[0].data and not above[0].zero
        assert top.is_allocated_above(None, 0, BLOCK) == [(0, BLOCK, True)]


def test_reopen_read_write_and_back(chain):
    path, _ = chain
    with corefmt.open(str(path / "top.bm")) as top:
        mid = top.chain()[1]
        with pytest.raises(corefmt.ReadOnlyError):
            mid.write(0, b"x")
        mid.reopen(read_only=False)
        mid.write(0, b"x" * 512)
        mid.reopen(read_only=True)
        with pytest.raises(corefmt.ReadOnlyError):
            mid.write(0, b"x")
        assert top.read(0, 512) == b"x" * 512
    with corefmt.open(str(path / "mid.bm"), read_only=True) as mid:
        assert mid.read(0, 512) == b"x" * 512


def test_a_fragmented_chunk_is_not_cached_and_stays_right(monkeypatch):
    monkeypatch.setattr(status_cache, "MAX_EXTENTS_PER_CHUNK", 8)
    calls = []

    def compute(offset, length):
        calls.append((offset, length))
        return [ChainExtent(start, 512, bool(start // 512 % 2), False, 0, None)
                for start in range(offset, offset + length, 512)]

    cache = ChainStatusCache(compute, lambda: 64 * KiB)
    first = cache.lookup(1024, 2048)
    assert [(e.offset, e.data) for e in first] == [(1024, False), (1536, True),
                                                   (2048, False), (2560, True)]
    assert cache.extent_count == 0
    cache.lookup(1024, 2048)
    # the whole chunk once (found too fragmented), then only the ranges asked for
    assert calls == [(0, 64 * KiB), (1024, 2048), (1024, 2048)]


def test_close_flushes_a_writable_image_and_waits_for_requests(blockmap, tmp_path, monkeypatch):
    import os
    import threading

    path = str(tmp_path / "c.raw")
    corefmt.create(path, "raw", MiB)
    syncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real_fdatasync(fd)))
    disk = corefmt.open(path, "raw")
    node = disk.layer()
    entered, release = threading.Event(), threading.Event()
    real_write = node.image.write

    def slow_write(offset, data):
        entered.set()
        release.wait(10)
        real_write(offset, data)

    node.image.write = slow_write
    writer = threading.Thread(target=disk.write, args=(0, b"w" * 512))
    writer.start()
    entered.wait(10)
    closer = threading.Thread(target=disk.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the write in flight
    release.set()
    writer.join(10)
    closer.join(10)
    assert not closer.is_alive() and syncs
    with corefmt.open(path, "raw", read_only=True) as again:
        assert again.read(0, 512) == b"w" * 512

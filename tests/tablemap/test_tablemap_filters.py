"""tablemap under blkdebug (errors at its own events) and blkverify (against a
raw reference), with the tiny L2 cache."""

from __future__ import annotations

import random

import pytest

import corefmt
from corefmt import CheckFix, CorefmtError, RequestFlags, StorageError
from tests.conftest import fill

MiB = 1024 * 1024
SIZE = 4 * MiB
TINY = "table_size=512,l2_cache_entries=4"


def _blkdebug_spec(path: str, rules: list[dict]) -> dict:
    return {"driver": "tablemap",
            "file": {"driver": "blkdebug", "inject-error": rules,
                     "image": {"driver": "file", "filename": path}}}


@pytest.fixture
def flushed(tablemap, tmp_path) -> tuple[str, dict[int, bytes]]:
    """A tablemap image with data written and flushed in three tables."""
    path = str(tmp_path / "a.tm")
    corefmt.create(path, "tablemap", SIZE, options=TINY)
    written = {offset: fill(8192, offset) for offset in (0, 300 * 1024, 3 * MiB)}
    with corefmt.open(path) as disk:
        for offset, data in written.items():
            disk.write(offset, data)
    return path, written


def _intact(path: str, written: dict[int, bytes]) -> None:
    with corefmt.open(path) as disk:
        found = disk.image.check(CheckFix.NONE)
        assert found.clean, found.messages  # leaks are allowed
        for offset, data in written.items():
            assert disk.read(offset, len(data)) == data


def test_an_l2_update_error_fails_the_write_and_loses_nothing_flushed(flushed):
    path, written = flushed
    spec = _blkdebug_spec(path, [{"event": "l2_update", "errno": 5, "once": True}])
    with corefmt.open(spec) as disk:
        disk.write(4096 * 3, b"a" * 4096)  # no table write yet: the cache holds it
        with pytest.raises(StorageError, match="write failed: Input/output error") as error:
            disk.write(4096 * 5, b"b" * 4096, RequestFlags.FUA)  # durable now: L2 written
        assert error.value.errno == 5
        events = disk.storage.info()["events"]
        assert events["data_alloc"] == 2 and events["l2_update"] == 1
        assert "l2_alloc" not in events and "l1_update" not in events
    _intact(path, written)


def test_an_l2_update_error_fails_the_flush_of_a_plain_write(flushed):
    path, written = flushed
    spec = _blkdebug_spec(path, [{"event": "l2_update", "errno": 5, "once": True}])
    with corefmt.open(spec) as disk:
        disk.write(1 * MiB, b"c" * 4096)  # a new table: its first write is an l2_alloc
        disk.write(4096 * 7, b"d" * 512)  # an existing one: an l2_update
        with pytest.raises(StorageError, match="Input/output error"):
            disk.flush()
        events = disk.storage.info()["events"]
        assert events["l2_update"] == 1 and "l1_update" not in events  # L1 waits for L2
        assert disk.storage.info()["errors-injected"] == 1
    _intact(path, written)


def test_every_event_is_emitted_before_its_write(flushed):
    path, _ = flushed
    rules = [{"event": name, "errno": 28, "once": True}
             for name in ("l2_alloc", "l1_update", "data_alloc")]
    for number, rule in enumerate(rules):
        with corefmt.open(_blkdebug_spec(path, [rule])) as disk, \
                pytest.raises(StorageError, match="No space left on device"):
            # a block in a table not allocated yet needs all three events; the
            # data file is not under blkdebug, so after data_alloc the image
            # file's next request fails (reading the L1 chunk, or at the flush)
            disk.write(2 * MiB + 256 * 1024 * number, b"e" * 4096)
            disk.flush()


def _workload(disk, rng: random.Random, operations: int) -> None:
    for _ in range(operations):
        kind = rng.random()
        length = rng.choice((512, 4096, rng.randint(1, 20000)))
        offset = rng.randrange(0, SIZE - length)
        if kind < 0.5:
            disk.write(offset, rng.randbytes(length))
        elif kind < 0.95:
            disk.read(offset, length)
        else:
            disk.flush()
    disk.read(0, SIZE)


def _blkverify(tmp_path, format: str, cache_entries: int) -> dict:
    image, reference = str(tmp_path / "t.tm"), str(tmp_path / "r.raw")
    corefmt.create(image, "tablemap", SIZE, options="table_size=512")
    corefmt.create(reference, "raw", SIZE)
    return {"driver": "blkverify",
            "test": {"driver": format, "l2_cache_entries": cache_entries,
                     "file": {"driver": "file", "filename": image}},
            "raw": {"driver": "raw", "file": {"driver": "file", "filename": reference}}}


def test_blkverify_passes_a_random_workload(tablemap, tmp_path):
    with corefmt.open(_blkverify(tmp_path, "tablemap", 4)) as disk:
        _workload(disk, random.Random(3), 400)
        assert disk.layer().image.l2_cache.writebacks > 50


def test_blkverify_catches_a_variant_that_loses_evicted_tables(broken_tablemap, tmp_path):
    with corefmt.open(_blkverify(tmp_path, "tablemap-nodirty", 64)) as disk:
        _workload(disk, random.Random(3), 400)  # every table stays cached: no difference
    with corefmt.open(_blkverify(tmp_path, "tablemap-nodirty", 4)) as disk, \
            pytest.raises(CorefmtError, match=r"blkverify: read offset=.* contents mismatch"):
        _workload(disk, random.Random(3), 400)

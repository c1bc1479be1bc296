"""tablemap through the core: entry point, reads and writes, chains in both
directions, conversion, map offsets into the data file, the L2 cache's size
from the open option and the header, and check."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

import corefmt
from corefmt import CheckFix, CorefmtError, plugins
from tests.conftest import fill, run_cli

KiB = 1024
MiB = 1024 * KiB
TINY = "table_size=512,l2_cache_entries=4"


def _image(tmp_path, name="a.tm", size=MiB, options=None, **kw) -> str:
    path = str(tmp_path / name)
    corefmt.create(path, "tablemap", size, options=options, **kw)
    return path


def test_found_through_its_entry_point_and_probed(tablemap, tablemap_site, tmp_path):
    driver = plugins.registry().formats["tablemap"]
    assert type(driver).__module__ == "corefmt_tablemap.driver"
    assert os.path.dirname(os.path.dirname(
        __import__("corefmt_tablemap").__file__)) == str(tablemap_site)
    path = _image(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.tm", "a.tm.data"]
    with corefmt.open(path) as disk:  # no format given: probed
        assert disk.format_name == "tablemap"
        assert disk.virtual_size == MiB
        assert disk.image.info()["data-file"] == "a.tm.data"  # relative to the image
        assert disk.limits.request_alignment == 512
        assert disk.limits.copy_granularity == 4096
        assert disk.image.has_zero_init()


def test_block_size_sets_the_copy_granularity(tablemap, tmp_path):
    path = _image(tmp_path, options="block_size=65536")
    with corefmt.open(path) as disk:
        assert disk.limits.copy_granularity == 65536
        disk.write(70000, b"x" * 10)
        status = [(e.offset, e.length, e.data) for e in disk.block_status(0, MiB)]
    assert status == [(0, 65536, False), (65536, 65536, True), (131072, MiB - 131072, False)]
    with pytest.raises(CorefmtError, match="block_size"):
        corefmt.create(str(tmp_path / "b.tm"), "tablemap", MiB, options="block_size=8192")


def test_creating_without_a_context_is_refused(tablemap):
    from corefmt_tablemap.driver import TableMapCreateOptions

    from corefmt.storage.memory import MemoryStorageDriver

    storage = MemoryStorageDriver().create("memory:no-context")
    with pytest.raises(CorefmtError, match="create context"):
        tablemap.create(storage, MiB, TableMapCreateOptions(), None)


def test_unaligned_writes_read_back(tablemap, tmp_path):
    path = _image(tmp_path, size=3 * MiB, options=TINY)
    rng = random.Random(5)
    expected = bytearray(3 * MiB)
    with corefmt.open(path) as disk:
        for _ in range(60):
            length = rng.randint(1, 20000)
            offset = rng.randrange(0, 3 * MiB - length)
            data = rng.randbytes(length)
            disk.write(offset, data)
            expected[offset:offset + length] = data
        assert disk.read(0, 3 * MiB) == bytes(expected)
        extents = disk.block_status(0, 3 * MiB)
        assert {e.host_child for e in extents if e.data} == {"data_file"}
    with corefmt.open(path, read_only=True) as disk:
        assert disk.read(0, 3 * MiB) == bytes(expected)
        assert disk.image.check(CheckFix.NONE).clean


def test_cache_size_comes_from_the_open_option_or_the_header(tablemap, tmp_path):
    path = _image(tmp_path, size=8 * MiB, options="table_size=512")
    with corefmt.open(path) as disk:
        assert disk.image.l2_cache.capacity == 32  # every table of an 8 MiB image
    with corefmt.open(path, options={"l2_cache_entries": 6}) as disk:
        assert disk.image.l2_cache.capacity == 6
    spec = {"driver": "tablemap", "l2_cache_entries": 2, "file": {"filename": path}}
    with corefmt.open(spec) as disk:
        assert disk.image.l2_cache.capacity == 4  # corefmt's cache keeps at least 4
    tiny = _image(tmp_path, "t.tm", size=8 * MiB, options=TINY)
    with corefmt.open(tiny) as disk:
        assert disk.image.l2_cache.capacity == 4  # recorded at create time
    with pytest.raises(CorefmtError, match="l2_cache_entries"):
        corefmt.open(path, options={"l2_cache_entries": -1})


def test_a_tiny_cache_evicts_dirty_tables_and_loses_nothing(tablemap, tmp_path):
    path = _image(tmp_path, size=8 * MiB, options=TINY)  # 32 tables, 4 cached
    rng = random.Random(7)
    expected = bytearray(8 * MiB)
    with corefmt.open(path) as disk:
        cache = disk.image.l2_cache
        for _ in range(200):
            offset = rng.randrange(0, 8 * MiB - 4096) // 512 * 512
            data = rng.randbytes(rng.choice((512, 4096, 6000)))
            disk.write(offset, data)
            expected[offset:offset + len(data)] = data
        assert cache.writebacks > 50  # evictions wrote dirty tables back, no flush yet
        assert cache.misses > 120
        assert len(cache) <= 4
    with corefmt.open(path, read_only=True) as disk:
        assert disk.read(0, 8 * MiB) == bytes(expected)


def _raw_base(tmp_path, size=MiB, seed=2) -> tuple[str, bytes]:
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", size)
    data = fill(size, seed)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, data)
    return base, data


def test_overlay_of_raw_copies_partial_blocks_from_below(tablemap, tmp_path):
    _, base_data = _raw_base(tmp_path)
    top = _image(tmp_path, "top.tm", size=None, options=TINY,
                 backing="base.raw", backing_format="raw")
    expected = bytearray(base_data)
    with corefmt.open(top) as disk:
        assert [node.format_name for node in disk.chain()] == ["tablemap", "raw"]
        assert disk.image.backing == corefmt.BackingRef("base.raw", "raw")
        for offset, length in ((5000, 100), (8191, 2), (300000, 70000)):
            disk.write(offset, b"T" * length)
            expected[offset:offset + length] = b"T" * length
        assert disk.read(0, MiB) == bytes(expected)
        depths = {(e.offset, e.depth) for e in disk.block_status(0, MiB)}
        assert (4096, 0) in depths and (0, 1) in depths
    with corefmt.open(top, read_only=True) as disk:
        assert disk.read(0, MiB) == bytes(expected)


def test_base_of_a_blockmap_overlay(tablemap, blockmap, tmp_path):
    _, base_data = _raw_base(tmp_path)
    middle = _image(tmp_path, "middle.tm", size=None, backing="base.raw", backing_format="raw")
    top = str(tmp_path / "top.bm")
    corefmt.create(top, "blockmap", backing="middle.tm", backing_format="tablemap")
    expected = bytearray(base_data)
    with corefmt.open(middle) as disk:
        disk.write(5000, b"M" * 100)
        expected[5000:5100] = b"M" * 100
    with corefmt.open(top) as disk:
        assert [node.format_name for node in disk.chain()] == ["blockmap", "tablemap", "raw"]
        disk.write(70000, b"B" * 10)
        expected[70000:70010] = b"B" * 10
        assert disk.read(0, MiB) == bytes(expected)
        depths = {(e.offset, e.depth) for e in disk.block_status(0, MiB)}
        assert (4096, 1) in depths and (69632, 0) in depths and (0, 2) in depths


def test_convert_to_and_from_raw(tablemap, tmp_path):
    raw = str(tmp_path / "a.raw")
    corefmt.create(raw, "raw", 2 * MiB)
    with corefmt.open(raw, "raw") as disk:
        disk.write(123456, fill(300000, 3))
    converted = str(tmp_path / "a.tm")
    back = str(tmp_path / "b.raw")
    corefmt.convert(raw, converted, source_format="raw", target_format="tablemap",
                    options=TINY)
    assert os.path.exists(converted + ".data")
    corefmt.convert(converted, back, target_format="raw")
    assert corefmt.compare(raw, back).identical
    assert corefmt.compare(raw, converted).identical
    with corefmt.open(converted, "tablemap", read_only=True) as disk:
        allocated = sum(e.length for e in disk.block_status(0, disk.virtual_size) if e.data)
        assert disk.image.check(CheckFix.NONE).leaks == 0
    assert allocated == 74 * 4096  # the blocks holding data (122880 .. 425984) only


def test_map_offsets_point_into_the_data_file(tablemap, tmp_path):
    path = _image(tmp_path, size=2 * MiB, options=TINY)
    payload = {offset: fill(length, offset) for offset, length in
               ((1 * MiB, 12288), (4096, 4096), (300 * KiB, 8192))}
    with corefmt.open(path) as disk:
        for offset, data in payload.items():  # allocated out of guest order
            disk.write(offset, data)
    result = run_cli("map", "--output=json", path, check=True)
    entries = [entry for entry in json.loads(result.stdout) if entry["data"]]
    assert sorted(entry["start"] for entry in entries) == sorted(payload)
    with open(path + ".data", "rb") as data_file:
        for entry in entries:
            data_file.seek(entry["offset"])
            assert data_file.read(entry["length"]) == payload[entry["start"]]
    assert {entry["offset"] for entry in entries} == {4096, 4096 * 4, 4096 * 5}


def _patch(path: str, offset: int, value: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(">Q", value))


def test_check_counts_leaks_and_corruptions_and_fixes_them(tablemap, tmp_path):
    from corefmt_tablemap.driver import L1_OFFSET

    path = _image(tmp_path, size=2 * MiB, options=TINY)  # 256 KiB per table
    with corefmt.open(path) as disk:
        disk.write(0, fill(3 * 4096, 1))          # blocks 0-2, table 0
        disk.write(1 * MiB, fill(4096, 2))        # block 256, table 4
        image = disk.image
        metadata_start, first_table = image.geometry.metadata_start, image.l1[0]
        block2_host = image._hosts(2, 1)[0]
    with corefmt.open(path) as disk:
        assert disk.image.check(CheckFix.NONE).clean
        assert disk.image.check(CheckFix.NONE).leaks == 0
    with open(path + ".data", "ab") as data_file:
        data_file.write(bytes(2 * 4096))          # two leaked data blocks at the end
    _patch(path, first_table + 1 * 8, block2_host)      # block 1 shares block 2's data
    _patch(path, L1_OFFSET + 4 * 8, 1 << 40)            # table 4 past the end of the file
    with corefmt.open(path) as disk:
        found = disk.image.check(CheckFix.NONE)
        # leaks: table 4's real slot; data blocks 8192 (block 1's own, no longer
        # referenced) and 16384 (block 256's, behind the bad L1 entry); the two appended
        assert (found.corruptions, found.leaks) == (2, 5), found.messages
        assert any("shared with block 1" in m for m in found.messages)
        assert any("past the end of the image file" in m for m in found.messages)
        with pytest.raises(CorefmtError, match="past the end of the image file"):
            disk.read(1 * MiB, 512)
        fixed = disk.image.check(CheckFix.ALL)
        # the bad references cleared; the leaks at the files' ends truncated away
        assert (fixed.corruptions_fixed, fixed.leaks_fixed) == (2, 4), fixed.messages
    with corefmt.open(path) as disk:
        again = disk.image.check(CheckFix.NONE)
        assert again.clean and again.leaks == 1, again.messages  # block 1's old data slot
        assert disk.read(1 * MiB, 4096) == bytes(4096)  # its table is gone
        assert {disk.read(4096, 4096), disk.read(8192, 4096)} == {
            fill(3 * 4096, 1)[8192:], bytes(4096)}  # one of the two sharers kept the block
    assert os.path.getsize(path) == metadata_start + 512  # table 4's slot truncated away

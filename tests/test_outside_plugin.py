"""An outside plugin (the test-only blockmap format, installed as a
distribution with an entry point) gets everything from the core."""

from __future__ import annotations

import json

import corefmt
from corefmt import plugins
from tests.conftest import fill, run_cli

MiB = 1024 * 1024


def test_found_through_entry_point_and_probed(blockmap, tmp_path):
    assert "blockmap" in plugins.registry().formats
    path = str(tmp_path / "a.bm")
    corefmt.create(path, "blockmap", MiB)
    with corefmt.open(path) as disk:  # no format given: probed
        assert disk.format_name == "blockmap"
        assert disk.virtual_size == MiB


def test_read_write_and_block_status(blockmap, tmp_path):
    path = str(tmp_path / "a.bm")
    corefmt.create(path, "blockmap", MiB)
    payload = fill(10000, 1)
    with corefmt.open(path, "blockmap") as disk:
        disk.write(3000, payload)  # unaligned: head and tail go through read-modify-write
        assert disk.read(3000, len(payload)) == payload
        assert disk.read(0, 3000) == bytes(3000)
        status = disk.block_status(0, MiB)
        assert [(e.offset, e.length, e.data) for e in status] == [
            (0, 16384, True), (16384, MiB - 16384, False)]
    with corefmt.open(path, "blockmap", read_only=True) as disk:
        assert disk.read(3000, len(payload)) == payload


def test_as_overlay_of_raw_and_as_base_of_raw_chain(blockmap, tmp_path):
    base = str(tmp_path / "base.raw")
    middle = str(tmp_path / "middle.bm")
    top = str(tmp_path / "top.bm")
    corefmt.create(base, "raw", MiB)
    base_data = fill(MiB, 2)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, base_data)
    corefmt.create(middle, "blockmap", backing="base.raw", backing_format="raw")
    corefmt.create(top, "blockmap", backing="middle.bm", backing_format="blockmap")
    with corefmt.open(middle) as disk:
        disk.write(5000, b"M" * 100)  # partial block: copy-on-write from the raw base
    with corefmt.open(top) as disk:
        assert [node.format_name for node in disk.chain()] == ["blockmap", "blockmap", "raw"]
        disk.write(70000, b"T" * 10)
        expected = bytearray(base_data)
        expected[5000:5100] = b"M" * 100
        expected[70000:70010] = b"T" * 10
        assert disk.read(0, MiB) == bytes(expected)  # one long read over all layers
        depths = {(e.offset, e.depth) for e in disk.block_status(0, MiB)}
        assert (4096, 1) in depths and (69632, 0) in depths and (0, 2) in depths


def test_convert_to_and_from_raw(blockmap, tmp_path):
    raw = str(tmp_path / "a.raw")
    corefmt.create(raw, "raw", 2 * MiB)
    payload = fill(300000, 3)
    with corefmt.open(raw, "raw") as disk:
        disk.write(123456, payload)
    converted = str(tmp_path / "a.bm")
    back = str(tmp_path / "b.raw")
    corefmt.convert(raw, converted, source_format="raw", target_format="blockmap")
    corefmt.convert(converted, back, target_format="raw")
    assert corefmt.compare(raw, back).identical
    assert corefmt.compare(raw, converted).identical
    with corefmt.open(converted, "blockmap", read_only=True) as disk:
        allocated = sum(e.length for e in disk.block_status(0, disk.virtual_size) if e.data)
    # only the 74 blocks holding data (122880 .. 425984) were written
    assert allocated == 74 * 4096


def test_cli_sees_the_plugin(blockmap, tmp_path):
    formats = run_cli("formats", check=True).stdout
    assert "blockmap" in formats.splitlines()[0]
    path = str(tmp_path / "c.bm")
    run_cli("create", "-f", "blockmap", "-o", "block_size=65536", path, "1M", check=True)
    run_cli("io", "-c", "write -P 0x11 65536 4096", path, check=True)
    info = json.loads(run_cli("info", "--output=json", path, check=True).stdout)
    assert info["format"] == "blockmap" and info["cluster-size"] == 65536
    out = str(tmp_path / "c.raw")
    run_cli("convert", "-O", "raw", path, out, check=True)
    assert run_cli("io", "-f", "raw", "-c", "read -P 0x11 65536 4096", out).returncode == 0
    bad = run_cli("create", "-f", "blockmap", "-o", "block_size=1000", path, "1M")
    assert bad.returncode == 1 and "block_size" in bad.stderr

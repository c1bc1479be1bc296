"""blkverify: an image checked against a raw reference, request by request."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import corefmt
from corefmt import plugins
from corefmt.block.chain import open_graph
from corefmt.errors import OptionError
from corefmt.filters.blkverify import BlkverifyError
from tests.conftest import fill, run_cli
from tests.filters.helpers import blkdebug_spec, make_raw, raw_spec
from tests.stress import broken_formats

KiB = 1024
SIZE = 256 * KiB
SECTOR = 512
WORKLOAD_STEPS = 300


def verified(test: dict, reference: str):
    return open_graph({"driver": "blkverify", "test": test, "raw": raw_spec(reference)})


@pytest.fixture
def broken():
    """raw variants that lose writes (tests/stress/broken_formats), as plugins."""
    plugins.register_plugin(broken_formats)
    yield
    plugins.unregister_plugin(broken_formats)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    """Two raw images with the same content: (test, reference)."""
    data = fill(SIZE, 1)
    return (make_raw(tmp_path / "test.raw", SIZE, data),
            make_raw(tmp_path / "reference.raw", SIZE, data))


@pytest.mark.parametrize("test_format", ["raw", "blockmap"])
def test_a_correct_pair_passes_a_random_workload(request, tmp_path, test_format):
    if test_format == "blockmap":
        request.getfixturevalue("blockmap")
    test_path = str(tmp_path / f"test.{test_format}")
    corefmt.create(test_path, test_format, SIZE)
    reference = make_raw(tmp_path / "reference.raw", SIZE)
    rng = random.Random(20)
    test_spec = {"driver": test_format, "file": {"filename": test_path}}
    with verified(test_spec, reference) as node:
        for _ in range(WORKLOAD_STEPS):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, min(16 * KiB, SIZE - offset) + 1)
            kind = rng.choice(["write", "write", "read", "read", "zeroes", "discard", "flush"])
            if kind == "write":
                node.write(offset, rng.randbytes(length))
            elif kind == "read":
                node.read(offset, length)  # compared inside the filter
            elif kind == "zeroes":
                node.write_zeroes(offset, length, unmap=rng.random() < 0.5)
            elif kind == "discard":
                node.discard(offset, length)
            else:
                node.flush()
        whole = node.read(0, SIZE)
    assert Path(reference).read_bytes() == whole


def test_a_file_changed_behind_the_test_node_is_caught(pair):
    test, reference = pair
    with verified(raw_spec(test), reference) as node:
        node.write(0, b"\x11" * 4 * KiB)
        node.read(0, 4 * KiB)
        with open(test, "r+b") as file:  # behind the node's back
            file.seek(1000)
            file.write(b"Z")
        node.read(0, 512)  # the range before the change still agrees
        with pytest.raises(BlkverifyError) as caught:
            node.read(512, 1024)
    assert str(caught.value) == ("blkverify: read offset=512 bytes=1024 contents mismatch "
                                 "at offset 1000")


def test_a_format_that_loses_writes_is_caught(broken, tmp_path):
    test = make_raw(tmp_path / "test.raw", SIZE)
    reference = make_raw(tmp_path / "reference.raw", SIZE)
    with verified({"driver": "raw-drop", "file": {"filename": test}}, reference) as node:
        for sector in range(16):
            node.write(sector * SECTOR, bytes([sector + 1]) * SECTOR)
        node.read(0, (broken_formats.DROP_EVERY - 1) * SECTOR)  # the first sectors landed
        with pytest.raises(BlkverifyError) as caught:
            node.read(0, 16 * SECTOR)
    first_dropped = (broken_formats.DROP_EVERY - 1) * SECTOR
    assert str(caught.value) == (f"blkverify: read offset=0 bytes={16 * SECTOR} contents "
                                 f"mismatch at offset {first_dropped}")


def test_writes_zeroes_and_discards_reach_both(pair):
    test, reference = pair
    with verified(raw_spec(test), reference) as node:
        node.write(100, b"both" * 100)
        node.write_zeroes(8 * KiB, 8 * KiB)
        node.discard(64 * KiB, 64 * KiB)
        node.flush()
        node.truncate(SIZE + 64 * KiB)
        expected = node.read(0, SIZE + 64 * KiB)
    for path in (test, reference):
        content = Path(path).read_bytes()
        assert content == expected, path
        assert content[100:500] == b"both" * 100
        assert content[8 * KiB:16 * KiB] == bytes(8 * KiB)


def test_a_request_failing_on_one_side_only_is_a_mismatch(tmp_path):
    data = fill(SIZE, 2)
    test = make_raw(tmp_path / "test.raw", SIZE, data)
    reference = make_raw(tmp_path / "reference.raw", SIZE, data)
    rules = [{"event": "read_aio", "once": True}]
    with verified(blkdebug_spec(test, rules), reference) as node:
        with pytest.raises(BlkverifyError) as caught:
            node.read(4096, 512)
        assert node.read(4096, 512) == data[4096:4608]
    assert str(caught.value) == ("blkverify: read offset=4096 bytes=512 return value "
                                 "mismatch test -5 != raw 0")


def test_a_request_failing_on_both_sides_is_that_error(tmp_path):
    data = fill(SIZE, 3)
    test = make_raw(tmp_path / "test.raw", SIZE, data)
    reference = make_raw(tmp_path / "reference.raw", SIZE, data)
    rules = [{"event": "write_aio", "errno": 28, "once": True}]
    spec = {"driver": "blkverify", "test": blkdebug_spec(test, rules),
            "raw": blkdebug_spec(reference, rules)}
    with open_graph(spec) as node:
        with pytest.raises(Exception, match="No space left on device") as caught:
            node.write(0, b"x" * 512)
        assert not isinstance(caught.value, BlkverifyError)
        node.write(0, b"y" * 512)
        assert node.read(0, 512) == b"y" * 512


def test_children_of_different_sizes_are_refused(tmp_path):
    test = make_raw(tmp_path / "test.raw", SIZE)
    reference = make_raw(tmp_path / "reference.raw", SIZE // 2)
    with pytest.raises(BlkverifyError, match=f"sizes differ: test {SIZE} != raw {SIZE // 2}"):
        verified(raw_spec(test), reference)


def test_both_children_are_required(pair):
    test, _ = pair
    with pytest.raises(OptionError, match="needs a 'raw' child"):
        open_graph({"driver": "blkverify", "test": raw_spec(test)})


def test_the_cli_reports_a_mismatch_with_qemus_message(pair):
    test, reference = pair
    with open(test, "r+b") as file:
        file.seek(3000)
        file.write(b"!")
    spec = (f'json:{{"driver":"blkverify","test":{{"driver":"raw","file":{{"filename":"{test}"}}}},'
            f'"raw":{{"driver":"file","filename":"{reference}"}}}}')
    result = run_cli("io", "-r", "-c", "read 0 2k", "-c", "read 2k 2k", spec)
    assert result.returncode == 1
    assert ("read failed: blkverify: read offset=2048 bytes=2048 contents mismatch at offset "
            "3000") in result.stdout.splitlines()


def test_a_backing_layer_under_blkverify_is_checked_through_an_overlay(blockmap, pair, tmp_path):
    test, reference = pair
    top = str(tmp_path / "top.bm")
    corefmt.create(top, "blockmap", SIZE, backing=test, backing_format="raw")
    spec = {"driver": "blockmap", "file": {"filename": top},
            "backing": {"driver": "blkverify", "test": raw_spec(test), "raw": raw_spec(reference)}}
    with open_graph(spec) as node:
        node.write(0, b"top" * 100)
        assert node.read(0, 8 * KiB)[:300] == b"top" * 100  # the rest from the base, verified
        with open(test, "r+b") as file:
            file.seek(6000)
            file.write(b"?")
        with pytest.raises(BlkverifyError, match="contents mismatch at offset 6000"):
            node.read(4 * KiB, 4 * KiB)

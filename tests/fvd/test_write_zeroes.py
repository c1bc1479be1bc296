"""FVD's write_zeroes: whole blocks are zeroed without writing zero bytes
(a compact image's EMPTY chunks stay EMPTY), partial blocks still in the
base copy the rest of the block from it, and a guest's zeroes are
journaled like its writes."""

from __future__ import annotations

from pathlib import Path

import pytest

import corefmt
from tests.fvd.helpers import cli, random_base

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
COMPACT = {"compact_image": "on", "chunk_size": "64k", "block_size": "64k"}


def _pair(tmp_path: Path, options: dict) -> tuple[Path, bytes]:
    base, top = tmp_path / "base.raw", tmp_path / "top.fvd"
    data = random_base(base, SIZE, seed=7)
    corefmt.create(str(top), "fvd", SIZE, backing=str(base), backing_format="raw",
                   options=options)
    return top, data


@pytest.mark.parametrize("options", [{"block_size": "64k"}, COMPACT], ids=["plain", "compact"])
@pytest.mark.parametrize("start, length", [(0, MiB), (1000, 200 * KiB), (64 * KiB - 512, 1024),
                                           (3 * MiB + 5, 1)])
def test_zeroes_read_back_and_keep_the_base_around_them(tmp_path, options, start, length):
    top, data = _pair(tmp_path, options)
    expected = bytearray(data)
    expected[start:start + length] = bytes(length)
    with corefmt.open(str(top)) as node:
        node.write_zeroes(start, length)
        assert node.read(0, SIZE) == bytes(expected)
    with corefmt.open(str(top)) as node:
        assert node.read(0, SIZE) == bytes(expected)


def test_whole_chunks_of_a_compact_image_are_zeroed_without_writing(tmp_path):
    """Every marked block has its chunk (check's rule), but a new chunk is
    a hole already: zeroing 2 MiB allocates 32 chunks and writes no data;
    past the base's end, EMPTY chunks stay EMPTY."""
    base, top = tmp_path / "base.raw", tmp_path / "top.fvd"
    random_base(base, SIZE, seed=7)
    corefmt.create(str(top), "fvd", 2 * SIZE, backing=str(base), backing_format="raw",
                   options=COMPACT)
    before = top.stat().st_blocks
    with corefmt.open(str(top)) as node:
        node.write_zeroes(0, 2 * MiB)
        node.write_zeroes(SIZE, SIZE)  # past the base
        assert node.layer().image.used_chunks == 2 * MiB // (64 * KiB)
        assert node.read(0, 2 * MiB) == bytes(2 * MiB)
    assert (top.stat().st_blocks - before) * 512 < 256 * KiB  # metadata only
    status, out, _ = cli("check", "-f", "fvd", top)
    assert status == 0, out


def test_a_guests_zeroes_are_journaled_and_survive_a_crash(tmp_path):
    top, data = _pair(tmp_path, {"block_size": "64k"})
    with corefmt.open(str(top)) as node:
        node.write_zeroes(MiB, MiB)
        node.flush()  # the records reach the journal; the bitmap stays old in place
        crashed = top.read_bytes()  # what a power cut now leaves
    top.write_bytes(crashed)
    with corefmt.open(str(top), read_only=True) as node:
        assert node.layer().image.opened_unclean
        assert node.read(MiB, MiB) == bytes(MiB)
        assert node.read(0, MiB) == data[:MiB]


def test_block_status_racing_a_bit_being_set_answers_a_real_extent(tmp_path):
    """Status is read without the image's lock: a copy-on-write may set the
    block's bit between the look at it and the look for the end of its run
    (a prefetch scan racing the guest); the answer must still be an extent."""
    top, _ = _pair(tmp_path, {"block_size": "64k"})
    with corefmt.open(str(top)) as node:
        image = node.layer().image
        bitmap = image.bitmap
        real_test = bitmap.test

        def test_then_set(block):
            answer = real_test(block)
            bitmap.set_range(block * bitmap.block_size, bitmap.block_size)  # the racing write
            bitmap.test = real_test
            return answer

        bitmap.test = test_then_set
        extent = image.block_status(0, SIZE)
        assert extent.offset == 0 and extent.length > 0

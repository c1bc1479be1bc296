"""`corefmt measure -O fvd` (qemu-img measure's shape: "required size" and
"fully allocated size", or the JSON object): the metadata create lays out
(spec §2.4), plus the data the source holds (whole sectors; whole chunks
of a compact image, its storage grown by whole grow units, §4.2).
Expected numbers are worked out here from the spec's rules; converted
images must then be as long as measured."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import pytest

from corefmt import ChainExtent
from corefmt.cli.main import main

KiB, MiB, GiB = 1024, 1024**2, 1024**3
HEADER_REGION = 8192
JOURNAL_DEFAULT = 16 * MiB
GROW_DEFAULT = 100 * MiB


def ru(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in args])
    return status, out.getvalue(), err.getvalue()


def measure(*args: str | Path) -> tuple[int, int]:
    status, out, err = cli("measure", "--output=json", "-O", "fvd", *args)
    assert (status, err) == (0, ""), err
    document = json.loads(out)
    assert list(document) == ["required", "fully-allocated"]
    return document["required"], document["fully-allocated"]


def grown(chunks: int, chunk: int, grow: int) -> int:
    """Storage after ``chunks`` allocations growing by ``grow`` from empty."""
    return ru(chunks * chunk, grow) if chunks else 0


# -- --size ------------------------------------------------------------------------------
def test_plain_size():
    assert measure("--size", "1G") == (HEADER_REGION, HEADER_REGION + GiB)
    assert measure("--size", "1000") == (HEADER_REGION, HEADER_REGION + 1024)
    assert measure("--size", "0") == (HEADER_REGION, HEADER_REGION)


def test_compact_size():
    """1 GiB of 1 MiB chunks: a 4 KiB table, the 16 MiB journal; every chunk
    allocated grows the storage by 100 MiB steps (11 of them)."""
    metadata = HEADER_REGION + 4096 + JOURNAL_DEFAULT
    assert measure("-o", "compact_image=on", "--size", "1G") == (
        metadata, metadata + 11 * GROW_DEFAULT)
    # 4 KiB chunks over 1 GiB: 262144 entries, a 1 MiB table, and a journal of
    # at least ceil(262144 / 121) sectors (it stays 16 MiB).
    metadata = HEADER_REGION + MiB + JOURNAL_DEFAULT
    assert measure("-o", "compact_image=on,chunk_size=4k,storage_grow_unit=4k",
                   "--size", "1G") == (metadata, metadata + GiB)


def test_with_a_base():
    """-o backing_file: a bitmap for a base as large as the disk (4 KiB
    blocks: 256 Ki bits, a 32 KiB bitmap), the journal; nothing required."""
    metadata = HEADER_REGION + 32 * KiB + JOURNAL_DEFAULT
    assert measure("-o", "backing_file=base.raw,backing_fmt=raw", "--size", "1G") == (
        metadata, metadata + GiB)
    # 512-byte blocks: 2 Mi bits, a 256 KiB bitmap (the spec's §2.4 example).
    metadata = HEADER_REGION + 256 * KiB + JOURNAL_DEFAULT
    assert measure("-o", "backing_file=base.raw,block_size=512", "--size", "1G") == (
        metadata, metadata + GiB)


def test_journal_size_option():
    metadata = HEADER_REGION + 4096 + 64 * KiB
    assert measure("-o", "compact_image=on,chunk_size=64k,storage_grow_unit=64k,"
                   "journal_size=64k", "--size", "4M") == (metadata, metadata + 4 * MiB)
    # No journal for a plain image (the original's unused gap is not reserved, §10 #11).
    assert measure("-o", "journal_size=1M", "--size", "4M") == (HEADER_REGION,
                                                                HEADER_REGION + 4 * MiB)


def test_data_file_does_not_change_the_sums():
    assert measure("-o", "data_file=x.data", "--size", "1G") == measure("--size", "1G")
    assert measure("-o", "compact_image=on,data_file=x.data", "--size", "1G") == measure(
        "-o", "compact_image=on", "--size", "1G")


def test_human_output():
    status, out, err = cli("measure", "-O", "fvd", "--size", "1G")
    assert (status, err) == (0, "")
    assert out == f"required size: {HEADER_REGION}\nfully allocated size: {HEADER_REGION + GiB}\n"


def test_refusals():
    status, out, err = cli("measure", "-O", "fvd", "-o",
                           "compact_image=on,detect_sparse_hole=64k,backing_file=b.raw",
                           "--size", "1G")
    assert (status, out) == (1, "")
    assert err == "corefmt: detect_sparse_hole cannot be used with compact_image\n"
    status, _, err = cli("measure", "-O", "fvd", "-o", "chunk_size=abc", "--size", "1G")
    assert status == 1 and "chunk_size" in err


# -- sources -------------------------------------------------------------------------------
#: Data a source holds: (offset, length); all else is a hole.
PIECES = ((0, 5000), (5100, 10), (64 * KiB, 512), (200 * KiB, 70 * KiB),
          (3 * MiB + 100, 10))  # the second shares a sector and a chunk with the first
SIZE = 4 * MiB


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.raw"
    rng = random.Random(1)
    with open(path, "wb") as file:
        file.truncate(SIZE)
        for offset, length in PIECES:
            file.seek(offset)
            file.write(rng.randbytes(length))
    return path


def touched(unit: int) -> int:
    """How many ``unit`` pieces of the disk the data touch (each once)."""
    pieces = set()
    for offset, length in PIECES:
        pieces.update(range(offset // unit, ru(offset + length, unit) // unit))
    return len(pieces)


def file_data(path: Path) -> list[tuple[int, int]]:
    """The file's data extents as the file system keeps them (SEEK_DATA/SEEK_HOLE)."""
    extents = []
    with open(path, "rb") as file:
        fd, end, position = file.fileno(), os.fstat(file.fileno()).st_size, 0
        while position < end:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, stop))
            position = stop
    return extents


def test_plain_source(source):
    """The data the file system holds for the source, in whole sectors."""
    data = sum(ru(stop, 512) - start // 512 * 512 for start, stop in file_data(source))
    assert data >= touched(512) * 512
    assert measure(source) == (HEADER_REGION + data, HEADER_REGION + SIZE)


class FakeSource:
    """A source node whose extents are exactly PIECES (no file system in between)."""

    virtual_size = SIZE

    def block_status(self, offset: int, length: int) -> list:
        end, extents, position = offset + length, [], offset
        for start, size in PIECES:
            stop = start + size
            if stop <= position or start >= end:
                continue
            if start > position:
                extents.append(ChainExtent(position, start - position, False, True, 0, None))
            extents.append(ChainExtent(max(start, position), min(stop, end) - max(start, position),
                                       True, False, 0, self))
            position = min(stop, end)
        if position < end:
            extents.append(ChainExtent(position, end - position, False, True, 0, None))
        return extents


def test_whole_sectors_and_chunks():
    """Data of 5000, 512, 71680 and 10 bytes: 10 + 1 + 140 + 1 sectors;
    in 64 KiB chunks, chunks 0, 1, 3, 4 and 48."""
    from corefmt_fvd.measure import measure as fvd_measure
    from corefmt_fvd.options import FvdCreateOptions

    assert (touched(512), touched(64 * KiB)) == (152, 5)
    result = fvd_measure(0, FvdCreateOptions(), FakeSource(), None)
    assert (result.required, result.fully_allocated) == (HEADER_REGION + 152 * 512,
                                                         HEADER_REGION + SIZE)
    options = FvdCreateOptions(compact_image=True, chunk_size=64 * KiB,
                               storage_grow_unit=64 * KiB, journal_size=64 * KiB)
    result = fvd_measure(0, options, FakeSource(), None)
    metadata = HEADER_REGION + 4096 + 64 * KiB
    assert (result.required, result.fully_allocated) == (metadata + 5 * 64 * KiB,
                                                         metadata + SIZE)


def test_compact_source_and_its_conversion(source, tmp_path):
    """64 KiB chunks: the data touch chunks 0, 1, 3, 4 and 48; the storage
    grows 256 KiB at a time (two steps). The converted image is exactly
    that long."""
    options = "compact_image=on,chunk_size=64k,storage_grow_unit=256k,journal_size=64k"
    metadata = HEADER_REGION + 4096 + 64 * KiB
    assert touched(64 * KiB) == 5
    required, fully = measure("-o", options, source)
    assert (required, fully) == (metadata + grown(5, 64 * KiB, 256 * KiB),
                                 metadata + grown(64, 64 * KiB, 256 * KiB))
    target = tmp_path / "target.fvd"
    status, _, err = cli("convert", "-O", "fvd", "-o", options, source, target)
    assert status == 0, err
    assert target.stat().st_size == required


def test_fully_allocated_source_and_its_conversion(tmp_path):
    """A source without holes needs all of it; converted, the image is as
    long as 'fully allocated' says (both layouts)."""
    path = tmp_path / "full.raw"
    path.write_bytes(random.Random(2).randbytes(SIZE))
    for options in ("journal_size=64k",
                    "compact_image=on,chunk_size=64k,storage_grow_unit=192k,journal_size=64k"):
        required, fully = measure("-o", options, path)
        assert required == fully
        target = tmp_path / "target.fvd"
        status, _, err = cli("convert", "-O", "fvd", "-o", options, path, target)
        assert status == 0, err
        assert target.stat().st_size == fully, options
        target.unlink()
    # 64 chunks in 3-chunk steps: 22 steps, 2 chunks past the disk.
    metadata = HEADER_REGION + 4096 + 64 * KiB
    assert fully == metadata + 22 * 192 * KiB


def test_source_of_an_odd_size(tmp_path):
    """A source of 70103 bytes is a disk of 70144 (whole sectors)."""
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x07" * 100 + bytes(70000) + b"\x09" * 3)
    required, fully = measure(path)
    assert fully == HEADER_REGION + 70144
    assert required <= fully


def test_source_with_a_new_base(source):
    """-o backing_file with a source: the new image may share nothing with it:
    everything counts (as qcow2's measure has it)."""
    required, fully = measure("-o", "backing_file=other.raw,journal_size=64k", source)
    assert required == fully
    metadata = HEADER_REGION + 4096 + 64 * KiB
    assert fully == metadata + SIZE


def test_empty_source(tmp_path):
    path = tmp_path / "empty.raw"
    path.write_bytes(b"")
    assert measure(path) == (HEADER_REGION, HEADER_REGION)
    assert measure("-o", "compact_image=on", path) == (HEADER_REGION, HEADER_REGION)


def test_fvd_source(source, tmp_path):
    """An FVD source is measured by its data like any other."""
    fvd = tmp_path / "source.fvd"
    status, _, err = cli("convert", "-O", "fvd", source, fvd)
    assert status == 0, err
    assert measure(fvd) == measure(source)

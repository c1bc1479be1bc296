"""The Python API as a user calls it: create, open, file view, convert, compare."""

from __future__ import annotations

import io
import itertools
import os

import pytest

import corefmt
from corefmt.errors import OptionError, UnknownFormatError
from tests.conftest import fill

KiB = 1024
MiB = 1024 * KiB


def test_open_is_a_context_manager_and_closes_the_chain(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", MiB)
    with corefmt.open(path) as disk:
        disk.write(0, b"abc")
    assert disk.closed
    with pytest.raises(corefmt.CorefmtError, match="closed"):
        disk.read(0, 1)


def test_file_view_seek_read_readinto_write(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", 64 * KiB)
    with corefmt.open(path) as disk, disk.io() as view:
        assert isinstance(view, io.RawIOBase)
        view.seek(1000)
        assert view.write(b"hello") == 5
        assert view.tell() == 1005
        view.seek(-5, os.SEEK_CUR)
        assert view.read(5) == b"hello"
        buf = bytearray(10)
        view.seek(998)
        assert view.readinto(buf) == 10
        assert bytes(buf) == b"\0\0hello\0\0\0"
        view.seek(0, os.SEEK_END)
        assert view.read(10) == b""  # end of the disk
        with pytest.raises(OSError):
            view.write(b"x")
        buffered = io.BufferedReader(disk.io())
        buffered.seek(1000)
        assert buffered.read(5) == b"hello"


def test_read_only_file_view(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", 4 * KiB)
    with corefmt.open(path, read_only=True) as disk, disk.io() as view:
        assert not view.writable()
        with pytest.raises(io.UnsupportedOperation):
            view.write(b"x")


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_raw_preallocation(tmp_path, mode):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", MiB, options={"preallocation": mode})
    with corefmt.open(path, "raw") as disk:
        assert disk.read(0, MiB) == bytes(MiB)
        allocated = disk.storage.allocated_size()
    if mode == "off":
        assert allocated == 4096  # qemu's allocate_first_block: the first 4 KiB only
    else:
        assert allocated >= MiB


def test_create_errors_touch_nothing(tmp_path):
    path = tmp_path / "a.raw"
    with pytest.raises(UnknownFormatError):
        corefmt.create(str(path), "nosuchformat", MiB)
    with pytest.raises(OptionError, match="preallocation"):
        corefmt.create(str(path), "raw", MiB, options="preallocation=bogus")
    with pytest.raises(OptionError, match="negative"):
        corefmt.create(str(path), "raw", "-1")
    with pytest.raises(OptionError, match="backing"):
        corefmt.create(str(path), "raw", MiB, backing="x", backing_format="raw")
    assert not path.exists()


def test_convert_keeps_holes_and_zero_runs_sparse(tmp_path):
    source = str(tmp_path / "s.raw")
    target = str(tmp_path / "t.raw")
    corefmt.create(source, "raw", 8 * MiB)
    payload = fill(3 * MiB, 5)
    with corefmt.open(source, "raw") as disk:
        disk.write(MiB, payload)
        disk.write(5 * MiB, bytes(MiB))  # explicit zeros: allocated, but zero
    calls = []
    corefmt.convert(source, target, source_format="raw", target_format="raw",
                    progress=lambda done, total: calls.append((done, total)))
    assert corefmt.compare(source, target).identical
    with corefmt.open(target, "raw", read_only=True) as disk:
        data_bytes = sum(e.length for e in disk.block_status(0, 8 * MiB) if e.data)
        assert disk.read(MiB, 3 * MiB) == payload
    assert data_bytes == 3 * MiB + 4096  # and the new file's first block, as qemu-img's
    assert calls[-1] == (8 * MiB, 8 * MiB)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(calls))


def test_compare_reports_first_differing_sector(tmp_path):
    a = str(tmp_path / "a.raw")
    b = str(tmp_path / "b.raw")
    corefmt.create(a, "raw", MiB)
    corefmt.create(b, "raw", 2 * MiB)
    with corefmt.open(b, "raw") as disk:
        disk.write(MiB + 700, b"x")
    result = corefmt.compare(a, b)
    assert not result.identical and result.mismatch_offset == MiB + 512
    assert result.size_mismatch
    with corefmt.open(a, "raw") as disk:
        disk.write(300000, b"y")
    assert corefmt.compare(a, b).mismatch_offset == 300000 - 300000 % 512
    assert corefmt.compare(a, a, strict=True).identical


def test_convert_onto_its_own_source_is_refused(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", 64 * KiB)
    with corefmt.open(path, "raw") as disk:
        disk.write(0, b"\x55" * 4096)
    with pytest.raises(corefmt.CorefmtError, match="onto itself"):
        corefmt.convert(path, path)
    with corefmt.open(path, "raw", read_only=True) as disk:
        assert disk.read(0, 4096) == b"\x55" * 4096


@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none", "directsync"])
def test_convert_cache_modes_give_the_same_image(tmp_path, cache):
    source = str(tmp_path / "s.raw")
    target = str(tmp_path / "t.raw")
    corefmt.create(source, "raw", MiB)
    with corefmt.open(source, "raw") as disk:
        disk.write(1000, fill(70000, 9))  # unaligned: O_DIRECT targets read-modify-write
    corefmt.convert(source, target, source_format="raw", cache=cache)
    assert (tmp_path / "t.raw").read_bytes() == (tmp_path / "s.raw").read_bytes()


def test_convert_refuses_an_unknown_cache_mode(tmp_path):
    source = str(tmp_path / "s.raw")
    corefmt.create(source, "raw", MiB)
    with pytest.raises(OptionError, match="cache mode"):
        corefmt.convert(source, str(tmp_path / "t.raw"), cache="fast")
    assert not (tmp_path / "t.raw").exists()

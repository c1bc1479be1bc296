"""O_DIRECT (convert -t none/directsync, direct=True): the last, partial
block does not grow the image, and a failing write reports its own error
(not "BufferError: cannot close exported pointers exist") and leaves the
file as long as it was."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import StorageError
from corefmt.storage.file import FileStorage, FileStorageDriver
from tests.conftest import fill, run_cli

#: A source whose size is no multiple of any block size; qemu-img makes a
#: raw copy of it SECTOR-aligned: 5120 bytes.
SHORT_SIZE = 5000
SHORT_COPY_SIZE = 5120
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


def _direct(path: Path) -> FileStorage:
    storage = FileStorageDriver().open(str(path), read_only=False, direct=True)
    if not storage.direct:
        storage.close()
        pytest.skip(f"{path.parent}: this file system has no O_DIRECT")
    return storage


@pytest.fixture
def short_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = fill(SHORT_SIZE, 7)
    path = tmp_path / "short.raw"
    path.write_bytes(data)
    _direct(path).close()  # skips where O_DIRECT is missing
    return path, data


@pytest.mark.parametrize("cache", ["none", "directsync"])
def test_direct_convert_of_a_short_image_is_sector_sized(short_file, tmp_path, cache):
    source, data = short_file
    target = tmp_path / "copy.raw"
    corefmt.convert(str(source), str(target), source_format="raw", cache=cache)
    assert os.path.getsize(target) == SHORT_COPY_SIZE
    assert target.read_bytes() == data + bytes(SHORT_COPY_SIZE - SHORT_SIZE)


def test_direct_convert_on_the_command_line(short_file, tmp_path):
    source, _ = short_file
    run_cli("convert", "-t", "none", "-f", "raw", "-O", "raw", str(source),
            str(tmp_path / "copy.raw"), check=True)
    assert os.path.getsize(tmp_path / "copy.raw") == SHORT_COPY_SIZE


def test_direct_writes_in_the_last_block_keep_the_size(short_file):
    path, data = short_file
    storage = _direct(path)
    try:
        storage.write(4990, b"t" * 10)  # ends at the end of the file
        storage.write(100, b"h" * 10)
        assert storage.size() == SHORT_SIZE
        storage.write(4995, b"g" * 10)  # grows it by exactly 5 bytes
        assert storage.size() == SHORT_SIZE + 5
    finally:
        storage.close()
    expected = bytearray(data)
    expected[100:110] = b"h" * 10
    expected[4990:] = b"t" * 5 + b"g" * 10
    assert path.read_bytes() == bytes(expected)


def _enospc_after(monkeypatch: pytest.MonkeyPatch, good_bytes: int) -> None:
    """os.pwrite writes ``good_bytes`` (really, so the file may grow), then
    fails with ENOSPC, as a file system that fills up does."""
    real_pwrite = os.pwrite
    budget = [good_bytes]

    def pwrite(fd: int, data, offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, ENOSPC_TEXT)
        view = memoryview(data)[:budget[0]]
        written = real_pwrite(fd, view, offset)
        budget[0] -= written
        return written

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("good_bytes", [0, 2048])
@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_write_reports_enospc_and_keeps_the_size(short_file, monkeypatch,
                                                           good_bytes, direct):
    path, data = short_file
    storage = _direct(path) if direct else FileStorageDriver().open(str(path), read_only=False)
    _enospc_after(monkeypatch, good_bytes)
    try:
        with pytest.raises(StorageError) as raised:
            storage.write(4000, b"n" * 8000)  # past the end: it would grow the file
        assert raised.value.errno == errno.ENOSPC
        assert ENOSPC_TEXT in str(raised.value) and "\n" not in str(raised.value)
        assert storage.size() == SHORT_SIZE
    finally:
        storage.close()
    assert os.path.getsize(path) == SHORT_SIZE
    assert path.read_bytes()[:4000] == data[:4000]


def test_direct_convert_onto_a_full_disk_reports_enospc(short_file, tmp_path, monkeypatch):
    source, _ = short_file
    target = tmp_path / "copy.raw"
    _enospc_after(monkeypatch, 4096)  # create writes the first block, as qemu's does
    with pytest.raises(StorageError) as raised:
        corefmt.convert(str(source), str(target), source_format="raw", cache="none")
    assert raised.value.errno == errno.ENOSPC and "\n" not in str(raised.value)
    assert os.path.getsize(target) == SHORT_COPY_SIZE  # as create made it


def test_a_failed_direct_read_reports_its_error(short_file, monkeypatch):
    path, _ = short_file
    storage = _direct(path)

    def preadv(fd, buffers, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        with pytest.raises(StorageError, match="Input/output error"):
            storage.read(10, 100)
        with pytest.raises(StorageError, match="Input/output error"):
            storage.readinto(0, bytearray(4096))
    finally:
        storage.close()

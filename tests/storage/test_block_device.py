"""Block devices as images: real size, raw reads and writes, convert targets
that are zeroed where the source is, never truncated (issue: a device read
as 0 bytes and convert made an empty file or failed to truncate it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import CorefmtError
from corefmt.storage.file import FileStorageDriver
from tests.conftest import fill, run_cli
from tests.storage.conftest import DEVICE_SIZE, FILL_BYTE, FakeDevice, real_size

KiB = 1024
MiB = 1024 * KiB
#: The source image converted onto devices: data, a hole, data, a hole.
SOURCE_SIZE = 1 * MiB
DATA_RANGES = ((0, 64 * KiB), (512 * KiB, 100 * KiB))


def _source(tmp_path: Path) -> tuple[Path, bytes]:
    """A sparse raw image of SOURCE_SIZE bytes and its content."""
    path = tmp_path / "source.raw"
    content = bytearray(SOURCE_SIZE)
    with open(path, "wb") as file:
        file.truncate(SOURCE_SIZE)
        for number, (offset, length) in enumerate(DATA_RANGES):
            data = fill(length, number)
            file.seek(offset)
            file.write(data)
            content[offset:offset + length] = data
    return path, bytes(content)


def _device_bytes(path: Path | str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _check_converted_onto(device: Path | str, content: bytes) -> None:
    """The device holds the source where the source is (zeros in its holes,
    not the old bytes), and its old content after it."""
    data = _device_bytes(device)
    assert len(data) == DEVICE_SIZE
    assert data[:SOURCE_SIZE] == content
    assert data[SOURCE_SIZE:] == bytes([FILL_BYTE]) * (DEVICE_SIZE - SOURCE_SIZE)


# -- a stand-in device: fstat says block device, st_size 0 ---------------------------
def test_a_device_without_st_size_has_its_real_size(fake_device: FakeDevice):
    storage = FileStorageDriver().open(str(fake_device.path), read_only=True)
    try:
        assert storage.size() == DEVICE_SIZE
        assert storage.read(DEVICE_SIZE - 4, 8) == bytes([FILL_BYTE]) * 4 + bytes(4)
        assert storage.data_run(0, DEVICE_SIZE) == (True, DEVICE_SIZE)  # no holes in devices
        assert not storage.has_zero_init()
    finally:
        storage.close()
    with corefmt.open(str(fake_device.path), "raw", read_only=True) as disk:
        assert disk.virtual_size == DEVICE_SIZE


def test_a_device_is_never_truncated(fake_device: FakeDevice):
    storage = FileStorageDriver().create(str(fake_device.path))  # no O_TRUNC either
    try:
        assert storage.size() == DEVICE_SIZE
        storage.truncate(4096)  # within the device: nothing to do
        assert storage.size() == DEVICE_SIZE
        with pytest.raises(CorefmtError, match="Device is too small"):
            storage.truncate(DEVICE_SIZE + 512)
        with pytest.raises(CorefmtError, match="Device is too small"):
            storage.write_zeroes(DEVICE_SIZE - 512, 1024)
    finally:
        storage.close()
    assert fake_device.truncated == []
    assert real_size(fake_device.path) == DEVICE_SIZE
    assert _device_bytes(fake_device.path) == bytes([FILL_BYTE]) * DEVICE_SIZE


@pytest.mark.parametrize("unmap", [False, True])
def test_zeroing_a_device_range_with_partial_blocks(fake_device: FakeDevice, unmap: bool):
    storage = FileStorageDriver().open(str(fake_device.path), read_only=False)
    try:
        storage.write_zeroes(100, 70000, unmap=unmap)
        storage.write_zeroes(DEVICE_SIZE - 300, 200, unmap=unmap)
    finally:
        storage.close()
    expected = bytearray([FILL_BYTE]) * DEVICE_SIZE
    expected[100:70100] = bytes(70000)
    expected[DEVICE_SIZE - 300:DEVICE_SIZE - 100] = bytes(200)
    assert _device_bytes(fake_device.path) == bytes(expected)
    assert fake_device.truncated == []


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_convert_onto_a_device_zeroes_the_source_holes(fake_device: FakeDevice,
                                                       tmp_path: Path, cache: str):
    source, content = _source(tmp_path)
    corefmt.convert(str(source), str(fake_device.path), source_format="raw", cache=cache)
    assert fake_device.truncated == []
    _check_converted_onto(fake_device.path, content)


def test_convert_from_a_device_copies_all_of_it(fake_device: FakeDevice, tmp_path: Path):
    with open(fake_device.path, "r+b") as file:
        file.write(b"head")
    target = tmp_path / "copy.raw"
    corefmt.convert(str(fake_device.path), str(target), source_format="raw")
    assert os.path.getsize(target) == DEVICE_SIZE
    assert target.read_bytes() == _device_bytes(fake_device.path)


def test_convert_onto_a_too_small_device_changes_nothing(fake_device: FakeDevice,
                                                         tmp_path: Path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as file:
        file.truncate(DEVICE_SIZE + MiB)
    with pytest.raises(CorefmtError, match="Device is too small") as raised:
        corefmt.convert(str(big), str(fake_device.path), source_format="raw")
    assert "\n" not in str(raised.value)
    assert fake_device.truncated == []
    assert _device_bytes(fake_device.path) == bytes([FILL_BYTE]) * DEVICE_SIZE


# -- a real loop device -------------------------------------------------------------
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_loop_device_info_and_convert_both_ways(loop_device: tuple[str, Path],
                                                tmp_path: Path, cache: str):
    device, backing = loop_device
    info = run_cli("info", "-f", "raw", device, check=True)
    assert f"virtual size: 8 MiB ({DEVICE_SIZE} bytes)" in info.stdout

    source, content = _source(tmp_path)
    run_cli("convert", "-t", cache, "-f", "raw", "-O", "raw", str(source), device, check=True)
    _check_converted_onto(device, content)
    assert os.path.getsize(backing) == DEVICE_SIZE

    copy = tmp_path / "copy.raw"
    run_cli("convert", "-f", "raw", "-O", "raw", device, str(copy), check=True)
    assert copy.read_bytes() == _device_bytes(device)


def test_loop_device_raw_io_and_zeroing(loop_device: tuple[str, Path]):
    device, _ = loop_device
    storage = FileStorageDriver().open(device, read_only=False)
    try:
        assert storage.is_block_device and storage.size() == DEVICE_SIZE
        storage.write(1000, b"written")
        storage.write_zeroes(5000, 70000)
        storage.write_zeroes(80000, 9000, unmap=True)
        storage.discard(2 * MiB, MiB)  # a hint: it must not fail
        storage.flush()
        assert storage.read(1000, 7) == b"written"
        assert storage.read(5000, 70000) == bytes(70000)
        assert storage.read(80000, 9000) == bytes(9000)
        assert storage.read(4999, 1) == bytes([FILL_BYTE])
        assert storage.read(89000, 1) == bytes([FILL_BYTE])
    finally:
        storage.close()


def test_loop_device_too_small_is_one_line_and_changes_nothing(loop_device: tuple[str, Path],
                                                               tmp_path: Path):
    device, backing = loop_device
    big = tmp_path / "big.raw"
    with open(big, "wb") as file:
        file.truncate(DEVICE_SIZE + MiB)
    result = run_cli("convert", "-f", "raw", "-O", "raw", str(big), device)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Device is too small" in result.stderr
    assert _device_bytes(device) == bytes([FILL_BYTE]) * DEVICE_SIZE
    assert os.path.getsize(backing) == DEVICE_SIZE

"""Storage drivers: file (with and without kernel features) and memory."""

from __future__ import annotations

import os

import pytest

from corefmt import plugins
from corefmt.errors import CorefmtError, ReadOnlyError
from corefmt.storage import file as file_storage
from corefmt.storage.file import FileStorageDriver
from corefmt.storage.memory import MemoryStorageDriver

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(params=["native", "degraded"])
def file_driver(request, monkeypatch):
    """The file driver as the kernel allows, and with every optional feature gone."""
    if request.param == "degraded":
        monkeypatch.setattr(file_storage, "_fallocate", None)
        monkeypatch.setattr(file_storage.FileStorage, "_probe_run",
                            lambda self, position, size: (True, size))
    return FileStorageDriver()


def test_reads_past_end_are_zeros(file_driver, tmp_path):
    storage = file_driver.create(str(tmp_path / "f"))
    storage.write(0, b"abc")
    assert storage.read(0, 8) == b"abc" + bytes(5)
    assert storage.read(100, 4) == bytes(4)
    storage.close()


def test_holes_zeroes_and_same_results_either_way(file_driver, tmp_path):
    storage = file_driver.create(str(tmp_path / "f"))
    storage.truncate(4 * MiB)
    storage.write(MiB, b"\x01" * MiB)
    storage.write_zeroes(MiB + 4 * KiB, 64 * KiB, unmap=True)
    storage.write_zeroes(MiB + 128 * KiB, 64 * KiB, unmap=False)
    storage.discard(MiB + 512 * KiB, 4 * KiB)
    expected = bytearray(b"\x01" * MiB)
    expected[4 * KiB:68 * KiB] = bytes(64 * KiB)
    expected[128 * KiB:192 * KiB] = bytes(64 * KiB)
    expected[512 * KiB:516 * KiB] = bytes(4 * KiB)
    data = storage.read(MiB, MiB)
    if file_storage._fallocate is None:
        # discard is only a hint: without hole punching the data stays
        expected[512 * KiB:516 * KiB] = b"\x01" * 4 * KiB
    assert data == bytes(expected)
    runs = storage.data_extents(0, 4 * MiB)
    assert sum(run for _, run, _ in runs) == 4 * MiB
    data_bytes = sum(run for _, run, is_data in runs if is_data)
    assert data_bytes >= MiB - 64 * KiB - 4 * KiB  # at least what was written stays data
    storage.close()


def test_write_zeroes_past_the_end_grows_the_file(file_driver, tmp_path):
    storage = file_driver.create(str(tmp_path / "f"))
    storage.write(0, b"\xff" * 1000)
    storage.write_zeroes(500, 2000)
    assert storage.size() == 2500
    assert storage.read(0, 2500) == b"\xff" * 500 + bytes(2000)
    storage.close()


def test_sparse_file_reports_holes(tmp_path):
    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.truncate(8 * MiB)
    storage.write(2 * MiB, b"x" * MiB)
    is_data, run = storage.data_run(0, 8 * MiB)
    if is_data:
        pytest.skip("this file system reports no holes")
    assert run == 2 * MiB
    assert storage.data_run(2 * MiB, 6 * MiB) == (True, MiB)
    assert storage.data_run(3 * MiB, 5 * MiB) == (False, 5 * MiB)
    storage.close()


def test_read_only_storage_refuses_writes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"keep")
    storage = FileStorageDriver().open(str(path), read_only=True)
    for call in (lambda: storage.write(0, b"x"), lambda: storage.truncate(0),
                 lambda: storage.write_zeroes(0, 4), lambda: storage.discard(0, 4)):
        with pytest.raises(ReadOnlyError):
            call()
    storage.close()
    assert path.read_bytes() == b"keep"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorefmtError, match="No such file"):
        FileStorageDriver().open(str(tmp_path / "nope"), read_only=True)


def test_direct_io_same_results(tmp_path):
    path = str(tmp_path / "d")
    with open(path, "wb") as file:
        file.write(b"\x02" * 10000)
    storage = FileStorageDriver().open(path, read_only=False, direct=True)
    assert storage.read(3, 5000) == b"\x02" * 5000
    storage.write(4000, b"\x03" * 200)  # unaligned: read-modify-write of aligned blocks
    storage.write(9990, b"\x04" * 20)   # grows the file by 10 bytes only
    assert storage.size() == 10010
    storage.close()
    with open(path, "rb") as file:
        data = file.read()
    assert data == b"\x02" * 4000 + b"\x03" * 200 + b"\x02" * 5790 + b"\x04" * 20


def test_memory_storage_is_shared_by_name():
    driver = MemoryStorageDriver()
    first = driver.create("memory:disk")
    first.write(10, b"hello")
    second = driver.open("memory:disk", read_only=True)
    assert second.read(8, 9) == b"\0\0hello\0\0"
    assert second.size() == 15
    with pytest.raises(ReadOnlyError):
        second.write(0, b"x")
    assert driver.resolve("base", "memory:disk") == "memory:base"
    with pytest.raises(CorefmtError):
        driver.open("memory:nothing", read_only=True)


def test_storage_drivers_are_registered_through_the_plugin_hook():
    registry = plugins.registry()
    assert {"file", "memory"} <= set(registry.storages)
    assert registry.storage_for("memory:x").name == "memory"
    assert registry.storage_for(os.path.join("a", "b")).name == "file"

"""Storage drivers: file (with and without kernel features) and memory."""

from __future__ import annotations

import ctypes
import errno
import os
import random

import pytest

import corefmt
from corefmt import plugins
from corefmt.errors import CorefmtError, ReadOnlyError, StorageError
from corefmt.ops import convert as convert_module
from corefmt.storage import file as file_storage
from corefmt.storage.file import FileStorageDriver
from corefmt.storage.memory import MemoryStorageDriver

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096
SEEKS_FOR_HOLES = (os.SEEK_DATA, os.SEEK_HOLE)


def no_seek_data(monkeypatch: pytest.MonkeyPatch, code: int = errno.EOPNOTSUPP) -> None:
    """lseek refuses SEEK_DATA/SEEK_HOLE, as on file systems without them
    (the file driver's own fallback must then run, not a replacement of it)."""
    real_lseek = os.lseek

    def lseek(fd: int, position: int, whence: int) -> int:
        if whence in SEEKS_FOR_HOLES:
            raise OSError(code, os.strerror(code))
        return real_lseek(fd, position, whence)

    monkeypatch.setattr(os, "lseek", lseek)


@pytest.fixture(params=["native", "degraded"])
def file_driver(request, monkeypatch):
    """The file driver as the kernel allows, and with every optional feature gone."""
    if request.param == "degraded":
        monkeypatch.setattr(file_storage, "_fallocate", None)
        no_seek_data(monkeypatch)
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


def _zero_range_works(directory) -> bool:
    """Whether this file system takes fallocate's zero range at all."""
    probe = directory / "probe"
    probe.write_bytes(b"x" * BLOCK)
    fd = os.open(probe, os.O_RDWR)
    try:
        return file_storage._fallocate(fd, file_storage.FALLOC_FL_ZERO_RANGE, 0, BLOCK) == 0
    finally:
        os.close(fd)
        probe.unlink()


def test_zero_before_write_failing_raises_and_keeps_write_zeroes_zero_range(tmp_path,
                                                                           monkeypatch):
    """A failure (here ENOSPC) raises as a write would, changes nothing,
    and does not make write_zeroes give up its zero range; a refusal
    (EOPNOTSUPP) is False, and only the hint stops trying."""
    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.write(0, b"\x01" * MiB)

    def no_space(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(file_storage, "_fallocate", no_space)
    with pytest.raises(StorageError) as raised:
        storage.zero_before_write(0, 64 * KiB)
    assert raised.value.errno == errno.ENOSPC
    assert storage.read(0, MiB) == b"\x01" * MiB

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(file_storage, "_fallocate", unsupported)
    assert storage.zero_before_write(0, 64 * KiB) is False
    assert not storage._no_zero_range and storage._no_zero_hint
    storage.close()


def test_zero_before_write_zeroes_in_place_or_does_nothing(file_driver, tmp_path):
    """The filesystem zeroes the range and the size stays; where it cannot,
    nothing changes at all (never zero bytes written in its place)."""
    storage = file_driver.create(str(tmp_path / "f"))
    storage.write(0, b"\x01" * MiB)
    writes: list[tuple[int, int]] = []
    real_write = storage._write
    storage._write = lambda offset, data: (writes.append((offset, len(data))),
                                           real_write(offset, data))[1]
    done = storage.zero_before_write(4 * KiB, 64 * KiB)
    beyond = storage.zero_before_write(MiB, 64 * KiB)  # past the end: allocated, size kept
    assert writes == [] and os.path.getsize(tmp_path / "f") == MiB
    expected = bytearray(b"\x01" * MiB)
    if done:
        expected[4 * KiB:68 * KiB] = bytes(64 * KiB)
    assert storage.read(0, MiB) == bytes(expected)
    if file_storage._fallocate is None:
        assert not done and not beyond
    elif _zero_range_works(tmp_path):
        assert done and beyond
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
                 lambda: storage.write_zeroes(0, 4), lambda: storage.discard(0, 4),
                 lambda: storage.zero_before_write(0, 4)):
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


# -- tests that fail when the code they guard is broken ------------------------------
def test_flush_calls_fdatasync(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.write(0, b"durable")
    storage.flush()
    assert synced == [storage.fd]
    storage.close()
    reader = FileStorageDriver().open(str(tmp_path / "f"), read_only=True)
    reader.flush()  # nothing was written through it: nothing to sync
    reader.close()
    assert len(synced) == 1


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_convert_syncs_the_target_after_its_data(tmp_path, monkeypatch, cache):
    source = tmp_path / "src.raw"
    source.write_bytes(b"\x01" * 64 * KiB)
    target = tmp_path / "dst.raw"
    events: list[tuple[str, str]] = []
    real_fdatasync, real_pwrite = os.fdatasync, os.pwrite

    def name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fdatasync(fd: int) -> None:
        events.append(("sync", name(fd)))
        real_fdatasync(fd)

    def pwrite(fd: int, data, offset: int) -> int:
        events.append(("write", name(fd)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    corefmt.convert(str(source), str(target), source_format="raw", cache=cache)
    mine = [kind for kind, path in events if path == str(target)]
    assert "write" in mine and mine[-1] == "sync"


@pytest.mark.parametrize("unmap", [True, False])
def test_zeroing_an_unaligned_range_zeroes_every_byte_of_it(file_driver, tmp_path, unmap):
    """Hole punching works on blocks: the partial blocks at either end must be
    zeroed too (a punch rounded to blocks would leave the tail as it was)."""
    storage = file_driver.create(str(tmp_path / "f"))
    storage.write(0, b"\xff" * 64 * KiB)
    storage.write_zeroes(1000, 10 * BLOCK + 123, unmap=unmap)
    discard_start, discard_end = 50 * KiB + 7, 50 * KiB + 7 + 2 * BLOCK + 5
    storage.discard(discard_start, discard_end - discard_start)
    end = 1000 + 10 * BLOCK + 123
    data = storage.read(0, 64 * KiB)
    assert data[:1000] == b"\xff" * 1000
    assert data[1000:end] == bytes(end - 1000)
    assert data[end:discard_start] == b"\xff" * (discard_start - end)
    if file_storage._fallocate is not None:  # discard is a hint: only holes zero it
        assert data[discard_start:discard_end] == bytes(discard_end - discard_start)
    assert data[discard_end:] == b"\xff" * (64 * KiB - discard_end)
    storage.close()


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY])
def test_without_seek_data_everything_is_data(tmp_path, monkeypatch, code):
    """The fallback when lseek has no SEEK_DATA: all data (reads decide),
    never a hole: a hole would make convert and map skip real data."""
    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.truncate(8 * MiB)
    storage.write(2 * MiB, b"x" * MiB)
    no_seek_data(monkeypatch, code)
    assert storage.data_run(0, 8 * MiB) == (True, 8 * MiB)
    assert storage.data_run(2 * MiB, MiB) == (True, MiB)
    assert storage.data_extents(0, 8 * MiB) == [(0, 8 * MiB, True)]
    assert storage.data_run(8 * MiB, MiB) == (False, MiB)  # past the end: zeros
    storage.close()
    with corefmt.open(str(tmp_path / "f"), "raw", read_only=True) as disk:
        runs = disk.block_status(0, 8 * MiB)
        assert all(extent.data for extent in runs)
        assert disk.read(2 * MiB, 4) == b"xxxx"


def test_seek_data_past_the_last_data_is_a_hole_to_the_end(tmp_path):
    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.truncate(8 * MiB)
    storage.write(0, b"x" * MiB)
    is_data, _ = storage.data_run(MiB, 7 * MiB)
    if is_data:
        storage.close()
        pytest.skip("this file system reports no holes")
    assert storage.data_run(4 * MiB, 6 * MiB) == (False, 6 * MiB)  # ENXIO: hole, even past EOF
    storage.close()


def test_zero_runs_keep_a_short_non_zero_tail():
    zero_block, tail = bytes(BLOCK), b"\x00" * 100 + b"\x07" + b"\x00" * 923
    assert list(convert_module.zero_runs(memoryview(zero_block + tail), BLOCK)) == [
        (0, BLOCK, True), (BLOCK, len(tail), False)]
    assert list(convert_module.zero_runs(memoryview(zero_block + bytes(1024)), BLOCK)) == [
        (0, BLOCK + 1024, True)]
    assert not convert_module.is_zero(memoryview(tail))


def test_the_no_zero_block_shortcut_agrees_with_zero_runs():
    """Whenever the shortcut says "one data run", zero_runs says so too:
    zero blocks aligned and not, blocks that only start with a zero word,
    short tails; and random data takes the shortcut."""
    rng = random.Random(7)
    for trial in range(300):
        blocks = rng.choice((1, 2, 5, 64))
        length = blocks * BLOCK + rng.choice((0, 0, 512, 1000))
        buffer = bytearray(rng.randbytes(length))
        for _ in range(rng.choice((0, 1, 2))):
            kind = rng.choice(("aligned", "unaligned", "first word", "tail"))
            at = rng.randrange(blocks) * BLOCK
            if kind == "aligned":
                buffer[at:at + BLOCK] = bytes(BLOCK)
            elif kind == "unaligned":
                start = min(length - BLOCK, at + rng.randrange(1, BLOCK))
                buffer[start:start + BLOCK] = bytes(BLOCK)
            elif kind == "first word":
                buffer[at:at + 8] = bytes(8)
            else:
                buffer[blocks * BLOCK:] = bytes(length - blocks * BLOCK)
        one_data_run = list(convert_module.zero_runs(memoryview(buffer), BLOCK)) == [
            (0, length, False)]
        if convert_module._no_zero_block(buffer, length, BLOCK):
            assert one_data_run, trial
    data = bytearray(rng.randbytes(64 * BLOCK))
    data[::BLOCK] = b"\x01" * 64  # no block starts with a zero byte
    assert convert_module._no_zero_block(data, len(data), BLOCK)
    data[3 * BLOCK:3 * BLOCK + 8] = bytes(8)  # one starts with a zero word, none is zero
    assert convert_module._no_zero_block(data, len(data), BLOCK)


@pytest.mark.parametrize("head", [bytes(BLOCK), b"\x05" * BLOCK], ids=["zero", "data"])
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_convert_copies_a_short_non_zero_tail_block(tmp_path, head, cache):
    """The image's last block is shorter than the zero-detection block: it is
    data when one byte of it is not zero (a zero head block sends the buffer
    through zero_runs, a data head through the no-zero-block shortcut)."""
    tail = bytes(700) + b"\x09" + bytes(203)  # 5000 bytes in all: virtual 5120
    source = tmp_path / "src.raw"
    source.write_bytes(head + tail)
    target = tmp_path / "dst.raw"
    corefmt.convert(str(source), str(target), source_format="raw", cache=cache)
    assert target.read_bytes() == head + tail + bytes(120)


@pytest.mark.parametrize("direct", [False, True])
def test_a_read_past_the_end_zeroes_the_rest_of_a_reused_buffer(tmp_path, direct):
    path = tmp_path / "f"
    path.write_bytes(b"\x01" * 3000)
    storage = FileStorageDriver().open(str(path), read_only=True, direct=direct)
    buffer = bytearray(b"\xee" * 3 * BLOCK)
    storage.readinto(0, buffer)
    assert buffer == b"\x01" * 3000 + bytes(3 * BLOCK - 3000)
    buffer[:] = b"\xee" * 3 * BLOCK
    storage.readinto(2000, memoryview(buffer)[:BLOCK + 1])
    assert buffer[:BLOCK + 1] == b"\x01" * 1000 + bytes(BLOCK + 1 - 1000)
    assert buffer[BLOCK + 1:] == b"\xee" * (2 * BLOCK - 1)
    buffer[:] = b"\xee" * 3 * BLOCK
    storage.readinto(10 * BLOCK, buffer)  # wholly past the end
    assert buffer == bytes(3 * BLOCK)
    storage.close()


def test_after_a_failed_flush_every_flush_fails(tmp_path, monkeypatch):
    import errno as errno_module
    import os as os_module

    from corefmt.errors import StorageError
    from corefmt.storage.file import FileStorageDriver

    storage = FileStorageDriver().create(str(tmp_path / "f"))
    storage.write(0, b"x" * 512)
    real = os_module.fdatasync

    def failing(fd):
        raise OSError(errno_module.EIO, "Input/output error")

    monkeypatch.setattr(os_module, "fdatasync", failing)
    with pytest.raises(StorageError):
        storage.flush()
    monkeypatch.setattr(os_module, "fdatasync", real)  # the disk "recovers"...
    with pytest.raises(StorageError, match="earlier flush failed"):
        storage.flush()  # ...but the dropped pages are not coming back
    storage.close()

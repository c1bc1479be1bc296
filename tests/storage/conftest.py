"""Fixtures for storage tests: a real loop device where the machine allows
one, and a stand-in block device (a regular file that fstat reports as a
device with no size) everywhere."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

MiB = 1024 * 1024
#: Size of the devices the tests use, and the byte they start filled with.
DEVICE_SIZE = 8 * MiB
FILL_BYTE = 0xAA
LOSETUP_TIMEOUT = 30


def _filled_file(path: Path, size: int) -> Path:
    path.write_bytes(bytes([FILL_BYTE]) * size)
    return path


@attrs.define
class FakeDevice:
    """A regular file that os.stat/os.fstat report as a block device of
    st_size 0 (as the kernel does): the code under test must find the size
    another way and never truncate it."""

    path: Path
    file_id: tuple[int, int]
    #: Lengths os.ftruncate was called with on it (must stay empty).
    truncated: list[int] = attrs.Factory(list)


@pytest.fixture
def fake_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    path = _filled_file(tmp_path / "fake-device", DEVICE_SIZE)
    real_stat, real_fstat, real_ftruncate = os.stat, os.fstat, os.ftruncate
    info = real_stat(path)
    device = FakeDevice(path, (info.st_dev, info.st_ino))

    def as_device(result: os.stat_result) -> os.stat_result:
        if (result.st_dev, result.st_ino) != device.file_id:
            return result
        fields = list(result[:10])
        fields[stat.ST_MODE] = stat.S_IFBLK | 0o660
        fields[stat.ST_SIZE] = 0
        return os.stat_result(fields, {"st_blocks": 0, "st_blksize": 4096,
                                       "st_rdev": os.makedev(7, 99)})

    def fake_stat(target, *args, **kwargs):
        return as_device(real_stat(target, *args, **kwargs))

    def fake_fstat(fd: int) -> os.stat_result:
        return as_device(real_fstat(fd))

    def watched_ftruncate(fd: int, length: int) -> None:
        result = real_fstat(fd)
        if (result.st_dev, result.st_ino) == device.file_id:
            device.truncated.append(length)
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(os, "fstat", fake_fstat)
    monkeypatch.setattr(os, "ftruncate", watched_ftruncate)
    return device


def real_size(path: Path | str) -> int:
    """The size of the file behind a (fake) device, past any patching."""
    with open(path, "rb") as file:
        return file.seek(0, os.SEEK_END)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(/dev/loopN, backing file): a real block device over a filled file."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: this machine has no loop devices")
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup is not installed (util-linux)")
    backing = _filled_file(tmp_path / "loop-backing", DEVICE_SIZE)
    result = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True,
                            text=True, timeout=LOSETUP_TIMEOUT, check=False)
    if result.returncode != 0:
        pytest.skip(f"losetup -f --show failed (needs root): {result.stderr.strip()}")
    device = result.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run([losetup, "-d", device], capture_output=True, timeout=LOSETUP_TIMEOUT,
                       check=False)

"""The largest L1 table qemu opens (32 MiB) bounds every size change: create,
resize, amend and a snapshot's recorded disk size. Past it qemu-img refuses
with -EFBIG and changes nothing; an image corefmt grew past it would be one
qemu cannot open ("Active L1 table too large")."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
COREFMT = shutil.which("corefmt") or "corefmt"
#: With 4 KiB clusters an L1 entry maps 2 MiB, so 4 Mi entries map 8 TiB.
CLUSTER = "cluster_size=4k"
LARGEST = "8T"
TOO_LARGE = str(8 * 2**40 + 2 * 2**20)
#: Snapshot table entry: disk_size sits in the extra data (qcow2.txt).
SNAPSHOTS_OFFSET, SN_DISK_SIZE = 64, 48


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


def message(result: subprocess.CompletedProcess) -> str:
    """The last stderr line without the tool's name (and qemu-img's file name)."""
    line = result.stderr.strip().splitlines()[-1]
    return line.split(": ", 1)[1]


def small_image(path: Path) -> Path:
    assert run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", CLUSTER, path, "1M").returncode == 0
    return path


def size_change(verb: str, image: Path, size: str) -> list[str | Path]:
    return ["resize", image, size] if verb == "resize" else ["amend", "-o", f"size={size}", image]


@pytest.mark.parametrize("verb", ["resize", "amend"])
def test_a_size_change_past_the_l1_limit_is_refused_as_qemu_does(tmp_path, verb):
    theirs, ours = small_image(tmp_path / "theirs.qcow2"), small_image(tmp_path / "ours.qcow2")
    before = ours.read_bytes()
    expected = run(QEMU_IMG, *size_change(verb, theirs, TOO_LARGE))
    result = run(COREFMT, *size_change(verb, ours, TOO_LARGE))
    assert expected.returncode == result.returncode == 1
    assert message(result) == message(expected) == "Failed to grow the L1 table: File too large"
    assert ours.read_bytes() == before
    assert run(COREFMT, *size_change(verb, ours, LARGEST)).returncode == 0
    assert run(QEMU_IMG, "check", ours).returncode == 0


def test_create_past_the_l1_limit_is_refused_and_leaves_nothing(tmp_path):
    expected = run(QEMU_IMG, "create", "-f", "qcow2", "-o", CLUSTER, tmp_path / "t.qcow2",
                   TOO_LARGE)
    result = run(COREFMT, "create", "-f", "qcow2", "-o", CLUSTER, tmp_path / "o.qcow2", TOO_LARGE)
    assert expected.returncode == result.returncode == 1
    assert message(result) == expected.stderr.strip().split(": ", 2)[2]
    assert not (tmp_path / "o.qcow2").exists()
    assert run(COREFMT, "create", "-q", "-f", "qcow2", "-o", CLUSTER, tmp_path / "o.qcow2",
               LARGEST).returncode == 0
    assert run(QEMU_IMG, "check", tmp_path / "o.qcow2").returncode == 0


def test_a_snapshot_with_a_hostile_disk_size_is_not_applied(tmp_path):
    """A snapshot table is input: its disk size must not make corefmt write
    a 32 MiB+ L1 table (or spend seconds trying) that qemu then refuses."""
    ours = small_image(tmp_path / "ours.qcow2")
    assert run(QEMU_IMG, "snapshot", "-c", "one", ours).returncode == 0
    data = bytearray(ours.read_bytes())
    table = struct.unpack_from(">Q", data, SNAPSHOTS_OFFSET)[0]
    struct.pack_into(">Q", data, table + SN_DISK_SIZE, 16 * 2**40)
    ours.write_bytes(data)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(data)
    expected = run(QEMU_IMG, "snapshot", "-a", "one", theirs)
    result = run(COREFMT, "snapshot", "-a", "one", ours)
    assert expected.returncode == result.returncode == 1
    assert result.stderr.replace("corefmt: ", "") == expected.stderr.replace("qemu-img: ", "")
    assert ours.read_bytes() == data

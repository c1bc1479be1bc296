"""Compressed qcow2 images qemu-img made (zlib and zstd, 512 B .. 2 MiB
clusters, with and without extended L2 entries) read correctly from the
start: ``corefmt convert -O raw`` gives qemu-img convert's bytes and
``corefmt map --output=json`` prints qemu-img map's JSON."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from corefmt.cli.main import main as corefmt_main

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024
SIZE = 6 * MiB

#: (cluster size, extended L2): qemu needs 16 KiB clusters for extended L2.
GEOMETRIES = [(512, False), (4 * KiB, False), (64 * KiB, False), (2 * MiB, False),
              (16 * KiB, True), (64 * KiB, True), (2 * MiB, True)]
#: zstd at these geometries in the default run, the rest under -m slow.
ZSTD_DEFAULT = {(4 * KiB, False), (64 * KiB, True), (2 * MiB, False)}
CASES = [pytest.param((compression, cluster, extended),
                      id=f"{compression}-{cluster // KiB or 0.5}k{'-extl2' if extended else ''}",
                      marks=() if compression == "zlib" or (cluster, extended) in ZSTD_DEFAULT
                      else (pytest.mark.slow,))
         for compression in ("zlib", "zstd") for cluster, extended in GEOMETRIES]


def qemu(*args: str | Path) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{args[0]} {args[1]} failed: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def source_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compressible text, incompressible noise, zeros and a tail that ends
    mid-cluster for every cluster size (so compressed, uncompressed and zero
    clusters all appear)."""
    rng = random.Random(7)
    data = bytearray(SIZE)
    words = [b"qcow2 ", b"cluster ", b"zstd ", b"zlib ", b"\x00\x01\x02\x03"]
    text = b"".join(rng.choice(words) for _ in range(300_000))[:2 * MiB]
    data[0:len(text)] = text
    data[3 * MiB:3 * MiB + 600 * KiB] = rng.randbytes(600 * KiB)  # does not compress
    data[2 * MiB + 1000:2 * MiB + 5000] = b"\xee" * 4000
    data[SIZE - 700:] = rng.randbytes(700)
    path = tmp_path_factory.mktemp("foreign") / "source.raw"
    path.write_bytes(data)
    return path


@pytest.fixture(params=CASES)
def compressed(request: pytest.FixtureRequest, source_raw: Path, tmp_path: Path) -> Path:
    compression, cluster, extended = request.param
    path = tmp_path / "compressed.qcow2"
    options = f"cluster_size={cluster},compression_type={compression}"
    if extended:
        options += ",extended_l2=on"
    qemu(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", options, source_raw, path)
    # A plain cluster written over compressed ones, and zeroes.
    qemu(QEMU_IO, "-c", f"write -P 0x3c {3 * MiB} {cluster}",
         "-c", f"write -z {4 * MiB} {max(cluster, 64 * KiB)}", path)
    return path


def test_convert_and_map_equal_qemu(compressed: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The image really holds compressed clusters (qemu-img's human map refuses them).
    human = subprocess.run([QEMU_IMG, "map", str(compressed)], capture_output=True,
                           text=True, timeout=60)
    assert "compressed clusters" in human.stderr
    theirs, ours = tmp_path / "qemu.raw", tmp_path / "corefmt.raw"
    qemu(QEMU_IMG, "convert", "-O", "raw", compressed, theirs)
    assert corefmt_main(["convert", "-f", "qcow2", "-O", "raw", str(compressed),
                         str(ours)]) == 0, capsys.readouterr().err
    assert ours.stat().st_size == theirs.stat().st_size
    expected, seen = theirs.read_bytes(), ours.read_bytes()
    if seen != expected:
        bad = next(i for i, (a, b) in enumerate(zip(seen, expected, strict=True)) if a != b)
        pytest.fail(f"corefmt's raw differs from qemu-img's at byte {bad:#x}")
    qemu_map = json.loads(qemu(QEMU_IMG, "map", "--output=json", compressed))
    capsys.readouterr()
    assert corefmt_main(["map", "--output=json", str(compressed)]) == 0
    assert json.loads(capsys.readouterr().out) == qemu_map

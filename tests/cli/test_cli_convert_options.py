"""convert's qemu-img options (-n, --target-is-zero, -S 0, -B/-F, -T, -r, -C,
-W, --salvage, --bitmaps): corefmt and qemu-img run on the same inputs;
exit codes, messages and the resulting images are compared."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corefmt
from corefmt.filters import throttle
from corefmt.ops import convert as convert_module

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                          check=False)


def ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "corefmt.cli.main", "convert", *args)


def theirs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(QEMU_IMG, "convert", *args)


def messages(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the program's name."""
    return [line.split(": ", 1)[1] if ": " in line else line
            for line in result.stderr.splitlines()]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A raw disk: data extents, holes, an allocated run of zeros."""
    path = tmp_path / "src.raw"
    rng = random.Random(5)
    with open(path, "wb") as out:
        out.truncate(4 * MiB)
        for offset in range(0, 4 * MiB, 512 * KiB):
            out.seek(offset)
            out.write(rng.randbytes(96 * KiB))
        out.seek(3 * MiB + 256 * KiB)
        out.write(bytes(128 * KiB))
    return path


def same(first: Path, second: Path, first_format: str = "raw",
         second_format: str = "raw") -> bool:
    return run(QEMU_IMG, "compare", "-q", "-f", first_format, "-F", second_format,
               first, second).returncode == 0


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("args", [
    ("--target-is-zero", "-O", "raw"),
    ("--skip-broken-bitmaps", "-O", "qcow2"),
    ("-C", "-c", "-O", "qcow2"),
    ("-C", "-S", "4k", "-O", "raw"),
    ("-T", "bogus", "-O", "raw"),
    ("-r", "10x", "-O", "raw"),
    ("-B", "base.raw", "-O", "raw"),
    ("-B", "base.raw", "-O", "qcow2"),
    ("--bitmaps", "-O", "raw"),
    ("-c", "-O", "raw"),
])
def test_refusals_match_qemu_img(tmp_path, source, args):
    mine = ours(*args, source, tmp_path / "a.out")
    reference = theirs(*args, source, tmp_path / "b.out")
    assert (mine.returncode, messages(mine)) == (reference.returncode, messages(reference))
    assert mine.returncode == 1
    assert not (tmp_path / "a.out").exists()


def test_n_writes_into_an_existing_target(tmp_path, source):
    for name, size in (("small.raw", "1M"), ("big.raw", "8M")):
        run(QEMU_IMG, "create", "-q", "-f", "raw", tmp_path / name, size)
    shutil.copy(tmp_path / "big.raw", tmp_path / "big2.raw")
    (tmp_path / "big.raw").write_bytes(b"\xee" * 8 * MiB)  # old content: zeros must be written
    small = ours("-n", "-O", "raw", source, tmp_path / "small.raw")
    assert (small.returncode, messages(small)) == (1, ["output file is smaller than input file"])
    assert messages(small) == messages(theirs("-n", "-O", "raw", source, tmp_path / "small.raw"))
    assert ours("-n", "-O", "raw", source, tmp_path / "big.raw").returncode == 0
    data = (tmp_path / "big.raw").read_bytes()
    assert data[:4 * MiB] == source.read_bytes() and data[4 * MiB:] == b"\xee" * 4 * MiB
    refused = ours("-n", "-o", "cluster_size=4k", "-O", "raw", source, tmp_path / "big2.raw")
    assert messages(refused) == ["-o has no effect when skipping image creation"]
    # A qcow2 made by qemu-img, filled by corefmt -n: qemu-img sees the source.
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", tmp_path / "t.qcow2", "4M")
    assert ours("-n", "-O", "qcow2", source, tmp_path / "t.qcow2").returncode == 0
    assert same(source, tmp_path / "t.qcow2", "raw", "qcow2")
    assert run(QEMU_IMG, "check", tmp_path / "t.qcow2").returncode == 0


def test_target_is_zero_skips_zero_ranges(tmp_path, source):
    target = tmp_path / "t.raw"
    target.write_bytes(b"\xee" * 4 * MiB)
    assert ours("-n", "--target-is-zero", "-O", "raw", source, target).returncode == 0
    # The caller said it reads as zeros: holes of the source were not written.
    assert target.read_bytes()[200 * KiB:201 * KiB] == b"\xee" * KiB


def test_S_0_allocates_the_whole_target_as_qemu_img(tmp_path, source):
    for fmt in ("raw", "qcow2"):
        mine, reference = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        assert ours("-S", "0", "-O", fmt, source, mine).returncode == 0
        assert theirs("-S", "0", "-O", fmt, source, reference).returncode == 0
        assert same(source, mine, "raw", fmt)
        if fmt == "raw":
            assert allocated(mine) == allocated(reference) == 4 * MiB
        else:  # one data extent, written in order, as qemu-img's
            maps = [json.loads(run(QEMU_IMG, "map", "--output=json", path).stdout)
                    for path in (mine, reference)]
            assert maps[0] == maps[1]
            assert [(e["start"], e["length"]) for e in maps[0] if e["data"]] == [(0, 4 * MiB)]


def test_writes_are_in_guest_order_unless_W(tmp_path, source):
    ordered, loose = tmp_path / "o.qcow2", tmp_path / "w.qcow2"
    assert ours("-m", "4", "-O", "qcow2", source, ordered).returncode == 0
    assert ours("-W", "-m", "4", "-O", "qcow2", source, loose).returncode == 0
    reference = tmp_path / "q.qcow2"
    assert theirs("-O", "qcow2", source, reference).returncode == 0
    map_of = [json.loads(run(QEMU_IMG, "map", "--output=json", path).stdout)
              for path in (ordered, reference)]
    assert map_of[0] == map_of[1]  # the same host offsets as qemu-img's in-order copy
    assert same(source, loose, "raw", "qcow2")


def test_B_writes_only_what_the_source_top_holds(tmp_path):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(random.Random(1).randbytes(2 * MiB))
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    run(QEMU_IO, "-c", "write -P 7 64k 64k", "-c", "write -z 1M 64k", top)
    mine, reference = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert ours("-B", base, "-F", "raw", "-O", "qcow2", top, mine).returncode == 0
    assert theirs("-B", base, "-F", "raw", "-O", "qcow2", top, reference).returncode == 0
    maps = [json.loads(run(QEMU_IMG, "map", "--output=json", path).stdout)
            for path in (mine, reference)]
    strip = [[{k: v for k, v in e.items() if k != "offset"} for e in m] for m in maps]
    assert strip[0] == strip[1]
    info = json.loads(run(QEMU_IMG, "info", "--output=json", mine).stdout)
    assert info["backing-filename"] == str(base)
    assert same(top, mine, "qcow2", "qcow2")


def test_T_source_cache_and_C_copy_offload(tmp_path, source):
    target = tmp_path / "t.raw"
    assert ours("-T", "none", "-O", "raw", source, target).returncode == 0
    assert same(source, target)
    offloaded = tmp_path / "c.raw"
    assert ours("-C", "-O", "raw", source, offloaded).returncode == 0
    assert offloaded.read_bytes() == source.read_bytes()
    fallback = tmp_path / "c.qcow2"  # not raw to raw: copied the ordinary way
    assert ours("-C", "-O", "qcow2", source, fallback).returncode == 0
    assert same(source, fallback, "raw", "qcow2")


def test_C_moves_data_with_copy_file_range(tmp_path, source, monkeypatch):
    calls: list[int] = []
    real = os.copy_file_range

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module.os, "copy_file_range", counting)
    corefmt.convert(str(source), str(tmp_path / "c.raw"), copy_offload=True)
    assert sum(calls) >= 8 * 96 * KiB
    assert (tmp_path / "c.raw").read_bytes() == source.read_bytes()


def test_r_limits_the_write_rate(tmp_path, source, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(throttle.time, "sleep", slept.append)
    corefmt.convert(str(source), str(tmp_path / "r.raw"), rate_limit=1 * MiB)
    written = 8 * 96 * KiB + 128 * KiB
    # The clock does not move while "sleeping": the last wait is how far the
    # writes ran ahead of the start at the rate, about written/rate.
    assert written / MiB - 0.5 <= max(slept) <= written / MiB
    assert ours("-r", "0", "-O", "raw", source, tmp_path / "r0.raw").returncode == 0


def test_salvage_goes_on_over_read_errors_as_qemu_img(tmp_path, source):
    spec = json.dumps({"driver": "raw", "file": {
        "driver": "blkdebug", "inject-error": [{"event": "read_aio", "errno": 5, "sector": 8}],
        "image": {"driver": "file", "filename": str(source)}}})
    failed = ours("-O", "raw", f"json:{spec}", tmp_path / "f.raw")
    assert failed.returncode == 1
    mine, reference = tmp_path / "a.raw", tmp_path / "b.raw"
    salvaged = ours("--salvage", "-O", "raw", f"json:{spec}", mine)
    expected = theirs("--salvage", "-O", "raw", f"json:{spec}", reference)
    assert salvaged.returncode == expected.returncode == 0
    assert messages(salvaged) == messages(expected) == [
        "warning: error while reading offset 4096: Input/output error"]
    assert mine.read_bytes() == reference.read_bytes()
    assert mine.read_bytes()[4096:4608] == bytes(512)
    quiet = ours("--salvage", "-q", "-O", "raw", f"json:{spec}", tmp_path / "q.raw")
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_bitmaps_are_copied(tmp_path):
    image = tmp_path / "a.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", image, "4M")
    run(QEMU_IMG, "bitmap", "--add", "-g", "64k", image, "on")
    run(QEMU_IMG, "bitmap", "--add", image, "off")
    run(QEMU_IO, "-c", "write 0 64k", "-c", "write 1M 4k", image)
    run(QEMU_IMG, "bitmap", "--disable", image, "off")
    run(QEMU_IO, "-c", "write 2M 64k", image)
    mine, reference = tmp_path / "m.qcow2", tmp_path / "r.qcow2"
    assert ours("--bitmaps", "-O", "qcow2", image, mine).returncode == 0
    assert theirs("--bitmaps", "-O", "qcow2", image, reference).returncode == 0
    infos = [json.loads(run(QEMU_IMG, "info", "--output=json", path).stdout)
             ["format-specific"]["data"]["bitmaps"] for path in (mine, reference)]
    assert infos[0] == infos[1]
    assert run(QEMU_IMG, "check", mine).returncode == 0
    for name in ("on", "off"):
        with corefmt.open(str(mine), "qcow2", read_only=True) as a, \
                corefmt.open(str(reference), "qcow2", read_only=True) as b:
            assert (a.layer().image.bitmap_dirty_ranges(name)
                    == b.layer().image.bitmap_dirty_ranges(name))

"""Compressed clusters written by corefmt: ``convert -c`` and compressed
writes (``io write -c``, RequestFlags.COMPRESSED), checked against qemu-img.

What qemu-img must see in corefmt's images: the content (qemu-img compare),
no corruption and no leak (qemu-img check), compressed clusters where the
data compressed (check's compressed-clusters), and the file laid out in
guest order with sizes within 1 % of qemu-img convert -c's own output."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import corefmt
from corefmt import CorefmtError, InvalidRequest, NotSupported, OptionError, RequestFlags, plugins
from corefmt.cli.main import main as corefmt_main
from corefmt.ops import convert as convert_module
from tests.qcow2.test_blkdebug import SURVIVOR_SEEDS, _spec

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024


def qemu(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=120)
    if check:
        assert result.returncode == 0, f"{args[:2]} failed: {result.stdout}{result.stderr}"
    return result


def text_like(length: int, seed: int) -> bytes:
    """Compressible bytes (words from a small vocabulary), different per seed."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(300)]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + b" "
    return bytes(out[:length])


def make_source(path: Path, size: int, seed: int = 1) -> None:
    """A raw disk: compressible extents, a random (incompressible) one, zero
    runs inside data, holes, and an odd-sized end."""
    rng = random.Random(seed)
    with open(path, "wb") as out:
        out.truncate(size)
        position = 0
        while position < size - 1:
            length = min(size - position, rng.randint(1, 300) * KiB + rng.randint(0, 511))
            kind = rng.random()
            out.seek(position)
            if kind < 0.6:
                out.write(text_like(length, rng.randrange(1 << 30)))
            elif kind < 0.7:
                out.write(rng.randbytes(length))
            elif kind < 0.8:
                out.write(bytes(length))  # allocated zeros
            position += length + rng.choice((0, 0, 64 * KiB, 200 * KiB))


def qemu_check(path: Path) -> dict:
    """qemu-img check (-U: corefmt may hold the image open, flushed)."""
    result = qemu(QEMU_IMG, "check", "-U", "--output=json", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr  # clean, no leaks
    return json.loads(result.stdout)


def host_offsets(path: Path) -> list[tuple[int, int]]:
    """(guest cluster, host offset) of every compressed cluster, from the L2
    tables (qemu-img map prints no offset for compressed data)."""
    from corefmt_qcow2.l2 import CompressedLayout
    from corefmt_qcow2.layout import OFLAG_COMPRESSED

    with corefmt.open(str(path), "qcow2", read_only=True) as disk:
        image = disk.layer().image
        layout = CompressedLayout(image.cluster_bits)
        found = []
        for cluster in range(-(-image.virtual_size // image.cluster_size)):
            entry, _ = image.entry(cluster)
            if entry & OFLAG_COMPRESSED:
                found.append((cluster, entry & layout.offset_mask))
    return found


# -- convert -c ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    "compression_type=zlib", "compression_type=zstd", "cluster_size=512",
    "cluster_size=4096,refcount_bits=1", "cluster_size=2M", "extended_l2=on",
    "compat=0.10"])
def test_convert_c_matches_qemu_img(tmp_path, options):
    source = tmp_path / "source.raw"
    make_source(source, 6 * MiB + 12345)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert corefmt_main(["convert", "-c", "-O", "qcow2", "-o", options,
                         str(source), str(ours)]) == 0
    qemu(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", options, source, theirs)
    qemu(QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", source, ours)
    ours_check, theirs_check = qemu_check(ours), qemu_check(theirs)
    assert ours_check["compressed-clusters"] == theirs_check["compressed-clusters"] > 0
    assert ours_check["allocated-clusters"] == theirs_check["allocated-clusters"]
    # Same packing as qemu-img: the file sizes agree within 1 %.
    assert abs(ours.stat().st_size / theirs.stat().st_size - 1) <= 0.01
    # Guest order: packed compressed clusters lie in the file in guest order.
    offsets = [host for _, host in host_offsets(ours)]
    assert offsets == sorted(offsets)


def test_convert_c_stores_in_guest_order_whatever_finishes_first(tmp_path, monkeypatch):
    """A worker that compresses its window late does not let later windows
    be stored before it."""
    source = tmp_path / "source.raw"
    source.write_bytes(b"".join(text_like(2 * MiB, seed) for seed in range(6)))
    prepare = convert_module._Copier.prepare_compressed
    first_window = threading.Event()

    def slow_first(self, offset, length, cluster):
        if offset == 0:
            time.sleep(0.3)
            first_window.set()
        return prepare(self, offset, length, cluster)

    monkeypatch.setattr(convert_module._Copier, "prepare_compressed", slow_first)
    target = tmp_path / "out.qcow2"
    corefmt.convert(str(source), str(target), target_format="qcow2", compress=True, workers=3)
    assert first_window.is_set()
    offsets = host_offsets(target)
    assert [cluster for cluster, _ in offsets] == list(range(len(offsets)))
    assert [host for _, host in offsets] == sorted(host for _, host in offsets)
    qemu(QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", source, target)


def test_convert_c_leaves_zero_clusters_unallocated_and_random_ones_uncompressed(tmp_path):
    cs = 64 * KiB
    source = tmp_path / "source.raw"
    source.write_bytes(text_like(cs, 1) + bytes(cs) + random.Random(2).randbytes(cs)
                       + text_like(cs, 3))
    target = tmp_path / "out.qcow2"
    corefmt.convert(str(source), str(target), target_format="qcow2", compress=True)
    mapping = json.loads(qemu(QEMU_IMG, "map", "--output=json", target).stdout)
    data = [(entry["start"], entry["length"], "offset" in entry)
            for entry in mapping if entry["data"]]
    # Only the random cluster has a host offset qemu can name: it is a normal one.
    assert data == [(0, cs, False), (2 * cs, cs, True), (3 * cs, cs, False)]
    assert qemu_check(target)["compressed-clusters"] == 2
    qemu(QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", source, target)


def test_convert_c_of_a_chain_and_of_a_qcow2_reads_the_chain(tmp_path):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(text_like(2 * MiB, 4))
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    qemu(QEMU_IO, "-c", "write -P 7 1M 64k", top)
    out = tmp_path / "out.qcow2"
    assert corefmt_main(["convert", "-c", "-O", "qcow2", str(top), str(out)]) == 0
    qemu(QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", top, out)
    assert "backing-filename" not in json.loads(
        qemu(QEMU_IMG, "info", "--output=json", out).stdout)


def test_convert_c_refuses_formats_that_cannot_compress(tmp_path, capsys):
    source = tmp_path / "source.raw"
    source.write_bytes(text_like(64 * KiB, 1))
    target = tmp_path / "out.raw"
    assert corefmt_main(["convert", "-c", "-O", "raw", str(source), str(target)]) == 1
    assert capsys.readouterr().err.strip() == (
        "corefmt: Compression not supported for this file format")
    assert not target.exists()
    with pytest.raises(OptionError):
        corefmt.convert(str(source), str(target), target_format="raw", compress=True)


def test_convert_c_with_an_external_data_file_is_refused_by_the_image(tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(text_like(64 * KiB, 1))
    with pytest.raises(NotSupported):
        corefmt.convert(str(source), str(tmp_path / "out.qcow2"), target_format="qcow2",
                        options={"data_file": str(tmp_path / "data.raw")}, compress=True)


def test_convert_c_progress_reaches_the_end(tmp_path):
    source = tmp_path / "source.raw"
    make_source(source, 3 * MiB)
    seen: list[tuple[int, int]] = []
    corefmt.convert(str(source), str(tmp_path / "out.qcow2"), target_format="qcow2",
                    compress=True, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3 * MiB) and seen[-1] == (3 * MiB, 3 * MiB)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


# -- compressed writes ---------------------------------------------------------------------
def corefmt_io(image: Path, command: str) -> subprocess.CompletedProcess[str]:
    return qemu(shutil.which("corefmt") or "corefmt", "io", "-c", command, image, check=False)


def test_io_write_c_is_read_by_qemu_and_refuses_what_qemu_io_refuses(tmp_path):
    image = tmp_path / "a.qcow2"
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", image, "1M")
    pattern = tmp_path / "pattern"
    pattern.write_bytes(text_like(128 * KiB, 9))
    assert corefmt_io(image, f"write -c -s {pattern} 0 128k").returncode == 0
    refused = corefmt_io(image, "write -c 4096 64k")
    assert "write failed: Invalid argument" in refused.stdout + refused.stderr
    assert qemu_check(image)["compressed-clusters"] == 2
    out = tmp_path / "read.raw"
    qemu(QEMU_IMG, "convert", "-O", "raw", image, out)
    assert out.read_bytes()[:128 * KiB] == pattern.read_bytes()
    # The image's last cluster may be short: it is padded, as qemu pads it.
    odd = tmp_path / "odd.qcow2"
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", odd, "100000")
    assert corefmt_io(odd, "write -c -P 3 65536 34816").returncode == 0
    qemu(QEMU_IO, "-c", "read -P 3 65536 34816", odd)
    qemu_check(odd)
    data_file = tmp_path / "d.qcow2"
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}",
         data_file, "1M")
    refused = corefmt_io(data_file, "write -c 0 64k")
    assert "write failed: Operation not supported" in refused.stdout + refused.stderr


def test_rewrites_of_compressed_clusters_free_what_they_held(tmp_path):
    """Packed compressed clusters share host clusters: each reference counts,
    and the host cluster is freed with the last (qemu-img check: no leak)."""
    image = tmp_path / "a.qcow2"
    corefmt.create(str(image), "qcow2", 4 * MiB)
    with corefmt.open(str(image), "qcow2") as disk:
        for index in range(16):
            disk.write(index * 64 * KiB, text_like(64 * KiB, index), RequestFlags.COMPRESSED)
        disk.flush()
        packed = qemu_check(image)
        assert packed["compressed-clusters"] == 16
        disk.write(0, text_like(64 * KiB, 50))                         # normal over compressed
        disk.write(64 * KiB, text_like(64 * KiB, 51), RequestFlags.COMPRESSED)  # again compressed
        disk.write_zeroes(2 * 64 * KiB, 64 * KiB)
        disk.discard(3 * 64 * KiB, 13 * 64 * KiB)
        disk.flush()
        after = qemu_check(image)
        assert after["compressed-clusters"] == 1
        with pytest.raises(InvalidRequest):
            disk.write(100, text_like(64 * KiB, 1), RequestFlags.COMPRESSED)
    expected = text_like(64 * KiB, 50) + text_like(64 * KiB, 51) + bytes(14 * 64 * KiB)
    with corefmt.open(str(image), "qcow2", read_only=True) as disk:
        assert disk.read(0, len(expected)) == expected
    # Everything the 16 packed clusters held but the one kept is free again.
    assert after["image-end-offset"] <= packed["image-end-offset"] + 64 * KiB


def test_a_full_refcount_starts_a_new_host_cluster(tmp_path):
    """refcount_bits=1: a host cluster takes one compressed cluster only."""
    image = tmp_path / "a.qcow2"
    corefmt.create(str(image), "qcow2", 1 * MiB, options="refcount_bits=1,cluster_size=4096")
    with corefmt.open(str(image), "qcow2") as disk:
        disk.write(0, text_like(64 * KiB, 3), RequestFlags.COMPRESSED)
    assert qemu_check(image)["compressed-clusters"] == 16
    qemu(QEMU_IO, "-c", "read 0 64k", image)


@pytest.mark.parametrize("event", ["cluster_alloc_bytes", "write_compressed", "l2_update",
                                   "refblock_update", "refblock_alloc"])
def test_a_power_cut_during_compressed_writes_loses_nothing_flushed(tmp_path, event):
    """The first event of each kind falls inside the compressed writes: a
    missing dependency (data, refcount, L2) shows as a corrupt image."""
    for seed in SURVIVOR_SEEDS:
        path = f"sim:{tmp_path.name}-{event}-{seed}"
        corefmt.create(path, "qcow2", 8 * MiB, options="cluster_size=4096")
        with corefmt.open(path, "qcow2") as disk:
            disk.write(0, text_like(64 * KiB, 1))  # flushed by close
        try:
            with corefmt.open(_spec(path, event, "powercut", seed)) as disk:
                for index in range(40):
                    disk.write(1 * MiB + index * 32 * KiB, text_like(32 * KiB, index),
                               RequestFlags.COMPRESSED)
                    if index % 8 == 7:
                        disk.flush()
                disk.write(1 * MiB, text_like(32 * KiB, 99))
                disk.discard(1 * MiB + 32 * KiB, 64 * KiB)
        except CorefmtError:
            pass
        below = plugins.registry().storage_for(path).disk(path)
        if below.dead:
            below.restore(below.crash_image or b"")
        copy = tmp_path / "crashed.qcow2"
        copy.write_bytes(bytes(below.current))
        result = qemu(QEMU_IMG, "check", "--output=json", copy, check=False)
        assert result.returncode in (0, 3), (event, seed, result.stdout + result.stderr)
        with corefmt.open(str(copy), "qcow2", read_only=True) as disk:
            assert disk.read(0, 64 * KiB) == text_like(64 * KiB, 1)
            for index in range(40):  # each compressed cluster reads as written or as before
                got = disk.read(1 * MiB + index * 32 * KiB, 32 * KiB)
                assert got in (text_like(32 * KiB, index), bytes(32 * KiB),
                               text_like(32 * KiB, 99)), (event, seed, index)


def test_a_stream_stored_where_a_freed_one_lay_is_read_fresh(tmp_path):
    """The same host offset and sector count give the same L2 entry: the
    cached decompressed cluster of the freed stream must not be served
    (found by corefmt stress, seed 27, refcount_bits=1)."""
    image = tmp_path / "a.qcow2"
    corefmt.create(str(image), "qcow2", 1 * MiB, options="refcount_bits=1,cluster_size=4096")
    with corefmt.open(str(image), "qcow2") as disk:
        disk.write(0, b"\x01" * 4096, RequestFlags.COMPRESSED)
        assert disk.read(0, 4096) == b"\x01" * 4096  # cached, decompressed
        disk.write(0, b"\x09" * 4096)                 # rewritten: the stream's cluster is freed
        disk.flush()                                   # ...and reusable after the flush
        disk.write(8192, b"\x02" * 4096, RequestFlags.COMPRESSED)
        assert disk.read(8192, 4096) == b"\x02" * 4096
    qemu(QEMU_IO, "-c", "read -P 2 8k 4k", image)


@pytest.mark.parametrize("args", [
    # A write that waited for the lock found the compressed cluster it meant to
    # copy already made normal by another request, and rewrote all of it from
    # a read: a third request's in-place write there was undone.
    "--seed 188",
    "--seed 105 --errors",
    # A stream stored where a freed one lay was read from the stale cache of
    # decompressed clusters (same L2 entry).
    "-o cluster_size=4096,refcount_bits=1 --base raw --seed 27 --crash --errors",
    # A failed write of the dirty bit left it set in memory only: the image
    # stayed clean on disk under lazy refcounts that were never written.
    "-o lazy_refcounts=on --seed 22 --crash --errors",
])
def test_stress_seeds_that_found_races_stay_clean(capsys, args):
    """Exact replays (the stress scheduler is deterministic) of seeds that
    found driver bugs with compressed writes racing normal ones."""
    assert corefmt_main(["stress", "--format", "qcow2", *args.split()]) == 0
    out = capsys.readouterr().out
    assert "mismatches 0, check failures 0" in out, out


def test_a_failed_dirty_bit_write_is_retried(tmp_path):
    """Lazy refcounts: the first allocation's header write fails; the next
    allocation must write the dirty bit, or a crash leaves the image clean
    on disk with refcounts that were never written."""
    path = str(tmp_path / "lazy.qcow2")
    corefmt.create(path, "qcow2", 1 * MiB, options="lazy_refcounts=on")
    with corefmt.open(_spec(path, "header_update", "error")) as disk:
        with pytest.raises(CorefmtError):
            disk.write(0, b"\x01" * 4096)
        disk.write(64 * 1024, b"\x02" * 4096)
        info = json.loads(qemu(QEMU_IMG, "info", "-U", "--output=json", path).stdout)
        assert info["dirty-flag"] is True

"""map_run's fast path (whole runs of L2 entries measured by memcmp,
corefmt_qcow2.l2.continuing_entries) against the entry-by-entry walk it
shortcuts: on tables full of every kind of entry, cut at table boundaries,
both must give the same (kind, host, length) for every start and end."""

from __future__ import annotations

import random
import struct

import pytest
from corefmt_qcow2.image import Qcow2Image
from corefmt_qcow2.layout import OFFSET_MASK as ENTRY_OFFSET_MASK

import corefmt
from corefmt import RequestFlags
from corefmt.ops.snapshot import create_snapshot

KiB = 1024


def _entry_by_entry(monkeypatch: pytest.MonkeyPatch):
    """map_run with the fast path switched off (the reference)."""
    def reference(image, offset, end, *, peek=False):
        with monkeypatch.context() as patch:
            patch.setattr(Qcow2Image, "_continuing_clusters", lambda *args: 0)
            return Qcow2Image.map_run(image, offset, end, peek=peek)
    return reference


def _scribble(disk, size: int, cluster: int, rng: random.Random) -> None:
    """Runs of every kind: data (contiguous and not), zeros, discards,
    compressed clusters, and a snapshot so that some clusters are shared."""
    for step in range(120):
        what = rng.random()
        start = rng.randrange(0, size // cluster) * cluster
        length = min(size - start, rng.randint(1, 12) * cluster)
        if what < 0.45:
            disk.write(start, bytes([step % 250 + 1]) * length)
        elif what < 0.6:
            disk.write_zeroes(start, length, unmap=rng.random() < 0.5)
        elif what < 0.7:
            disk.discard(start, length)
        elif what < 0.8:
            disk.write(start, bytes([7]) * cluster, RequestFlags.COMPRESSED)
        if step in (40, 80):
            create_snapshot(disk, f"at-{step}")  # what is there now is shared


@pytest.mark.parametrize("options", ["cluster_size=512", "cluster_size=4096",
                                     "cluster_size=512,compat=0.10"])
def test_fast_runs_equal_the_entry_by_entry_walk(tmp_path, monkeypatch, options):
    rng = random.Random(options)
    cluster = int(options.split(",")[0].split("=")[1])
    size = 256 * KiB  # several L2 tables with small clusters
    path = str(tmp_path / "image.qcow2")
    corefmt.create(path, "qcow2", size, options=options)
    reference = _entry_by_entry(monkeypatch)
    with corefmt.open(path, "qcow2") as disk:
        _scribble(disk, size, cluster, rng)
        image = disk.layer().image
        per_table = image.l2_entries * cluster
        # Every cluster start (the last cluster of a table above all) and
        # starts inside clusters.
        points = sorted({size, *range(0, size, cluster),
                         *(rng.randrange(size) for _ in range(60))})
        compared = 0
        for offset in points[:-1]:
            for end in (size, min(size, offset + rng.randint(1, 3 * per_table)),
                        min(size, (offset // per_table + 1) * per_table)):
                if end <= offset:
                    continue
                for peek in (False, True):
                    assert image.map_run(offset, end, peek=peek) == reference(
                        image, offset, end, peek=peek), (offset, end, peek)
                    compared += 1
        assert compared > 100


def test_a_run_stops_where_its_hosts_leave_the_file(tmp_path, monkeypatch):
    """Entries contiguous past the end of the image file (a hostile or
    truncated image): the fast path stops where the walk would, at the
    first host cluster that is not in the file."""
    cluster = 512
    path = tmp_path / "image.qcow2"
    corefmt.create(str(path), "qcow2", 64 * KiB, options=f"cluster_size={cluster}")
    with corefmt.open(str(path), "qcow2") as disk:
        disk.write(0, b"\x01" * cluster)
        image = disk.layer().image
        table = image.l1[0] & ENTRY_OFFSET_MASK
    raw = bytearray(path.read_bytes())
    first_host = len(raw) // cluster - 2  # two clusters in the file, six past it
    for index in range(8):
        struct.pack_into(">Q", raw, table + index * 8,
                         (first_host + index) * cluster | 1 << 63)
    path.write_bytes(raw)
    reference = _entry_by_entry(monkeypatch)
    with corefmt.open(str(path), "qcow2", read_only=True) as disk:
        image = disk.layer().image
        for offset in range(0, 8 * cluster, cluster):
            fast = image.map_run(offset, 16 * cluster, peek=True)
            assert fast == reference(image, offset, 16 * cluster, peek=True), offset
        assert image.map_run(0, 16 * cluster, peek=True)[2] < 8 * cluster

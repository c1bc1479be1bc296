"""Freed clusters are not handed out again before a flush has made the
references to them go away on disk (a crash could otherwise show one guest
cluster's new data under another's old L2 entry), and a long discard does
not keep every freed cluster in memory."""

from __future__ import annotations

from corefmt_qcow2.refcount import QUARANTINE_LIMIT

import corefmt
from tests.conftest import fill

KiB, MiB = 1024, 1024 * 1024


def _host(disk, offset: int) -> int:
    return disk.layer().image.block_status(offset, 512).host_offset


def test_a_freed_cluster_waits_for_a_flush(tmp_path):
    path = str(tmp_path / "q.qcow2")
    corefmt.create(path, "qcow2", 4 * MiB, options="cluster_size=4096")
    with corefmt.open(path, "qcow2") as disk:
        disk.write(0, fill(64 * KiB, 1))
        disk.flush()
        freed = {_host(disk, offset) for offset in range(0, 64 * KiB, 4096)}
        disk.discard(0, 64 * KiB)
        disk.write(1 * MiB, fill(64 * KiB, 2))  # new clusters, no flush in between
        taken = {_host(disk, 1 * MiB + offset) for offset in range(0, 64 * KiB, 4096)}
        assert not freed & taken
        disk.flush()
        disk.write(1536 * KiB, fill(64 * KiB, 3))  # after the flush they may be reused
        reused = {_host(disk, 1536 * KiB + offset) for offset in range(0, 64 * KiB, 4096)}
        assert freed & reused


def test_a_long_discard_keeps_the_quarantine_bounded(tmp_path):
    path = str(tmp_path / "q.qcow2")
    clusters = QUARANTINE_LIMIT + 1000
    corefmt.create(path, "qcow2", clusters * 512, options="cluster_size=512")
    with corefmt.open(path, "qcow2") as disk:
        disk.write(0, fill(clusters * 512, 4))
        disk.flush()
        disk.discard(0, clusters * 512)
        assert len(disk.layer().image.refcounts.quarantine) <= QUARANTINE_LIMIT
        assert disk.read(0, clusters * 512) == bytes(clusters * 512)

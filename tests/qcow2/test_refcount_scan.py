"""The search for free clusters skips used ones a refcount block at a time:
it must stop at exactly the first zero entry, also where zero bytes of
neighbouring entries line up into what looks like a zero entry."""

from __future__ import annotations

import random

import pytest
from corefmt_qcow2.refcount import Refcounts

import corefmt

MiB = 1024 * 1024


@pytest.mark.parametrize("bits", [1, 4, 8, 16, 32, 64])
def test_the_first_free_cluster_is_found_whatever_the_entry_width(tmp_path, bits):
    path = str(tmp_path / f"r{bits}.qcow2")
    corefmt.create(path, "qcow2", 64 * MiB, options={"refcount_bits": bits})
    with corefmt.open(path, "qcow2") as node:
        refcounts = node.image.refcounts
        reserved = refcounts.high_water  # the header, tables and blocks in use
        top = min(refcounts.max_refcount, 1 << 40)
        # Values with zero bytes at their edges: 0x0100 next to 0x0001 puts
        # "00 00" across two 16-bit entries.
        tricky = [value for value in (1, 1 << 8, 1 << 16, 1 << 24, 1 << 32, 1 << 40)
                  if value <= top]
        rng = random.Random(bits)
        for trial in range(40):
            length = rng.randrange(1, 300)
            values = [rng.choice(tricky) for _ in range(length)]
            start = reserved + 1
            for cluster, value in enumerate(values, start):
                refcounts.update(cluster, value - refcounts.get(cluster))
            free = start + length
            refcounts.update(free, -refcounts.get(free))
            refcounts.high_water = max(refcounts.high_water, free + 2)
            refcounts.free_index = start
            assert refcounts._find_free(1) == free, (trial, values)
            for cluster in (start, start + length // 2, free - 1, free):
                assert refcounts._used_run(cluster) == _used_run_one_by_one(refcounts, cluster)
            for cluster in range(start, free):  # back to free for the next trial
                refcounts.update(cluster, -refcounts.get(cluster))


def test_a_block_with_no_free_entry_is_skipped_whole(tmp_path):
    path = str(tmp_path / "full.qcow2")
    corefmt.create(path, "qcow2", 64 * MiB, options={"cluster_size": 512})
    with corefmt.open(path, "qcow2") as node:
        refcounts = node.image.refcounts
        per_block = refcounts.entries_per_block  # 256 with 512-byte clusters
        for cluster in range(per_block):
            if not refcounts.get(cluster):
                refcounts.update(cluster, 1 << 8)  # "01 00": zero bytes at every edge
        assert refcounts._used_run(0) == per_block == _used_run_one_by_one(refcounts, 0)
        assert refcounts._used_run(per_block - 3) == 3


def _used_run_one_by_one(refcounts, cluster: int) -> int:
    per_block = refcounts.entries_per_block
    end = (cluster // per_block + 1) * per_block
    run = 0
    while cluster + run < end and refcounts.get(cluster + run):
        run += 1
    return run


@pytest.mark.parametrize("bits", [1, 8, 16, 64])
def test_a_run_of_new_clusters_is_counted_across_refcount_blocks(tmp_path, bits, monkeypatch):
    """One multi-cluster write over many refcount blocks (512-byte clusters:
    a block counts 32 to 4096 clusters): every cluster counted once, whole
    blocks of whole-byte entries set at once rather than entry by entry."""
    path = str(tmp_path / f"run{bits}.qcow2")
    corefmt.create(path, "qcow2", 64 * MiB, options={"cluster_size": 512,
                                                     "refcount_bits": bits})
    updates: list[int] = []
    real_update = Refcounts.update

    def counting_update(self, cluster, delta):
        updates.append(cluster)
        return real_update(self, cluster, delta)

    monkeypatch.setattr(Refcounts, "update", counting_update)
    with corefmt.open(path, "qcow2") as node:
        refcounts = node.image.refcounts
        count = refcounts.entries_per_block + 44  # always over a block boundary
        start = refcounts.allocate(count) // 512
        counts = [refcounts.get(cluster) for cluster in range(start, start + count)]
        node.image.flush()
    assert counts == [1] * count
    data_updates = [cluster for cluster in updates if start <= cluster < start + count]
    assert len(data_updates) == (count if bits < 8 else 0)


def test_a_run_that_is_not_free_is_counted_up_not_overwritten(tmp_path, monkeypatch):
    """Were the search ever to hand out clusters in use, their counts go up
    (as one update each would do), never back to 1."""
    path = str(tmp_path / "used.qcow2")
    corefmt.create(path, "qcow2", 64 * MiB)
    with corefmt.open(path, "qcow2") as node:
        refcounts = node.image.refcounts
        monkeypatch.setattr(Refcounts, "_find_free", lambda self, count: 0)  # the header
        refcounts.allocate(2)
        assert [refcounts.get(0), refcounts.get(1)] == [2, 2]
        refcounts.update(0, -1)
        refcounts.update(1, -1)

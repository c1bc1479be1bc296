"""corefmt stress on qcow2 with compressed writes and internal snapshots
created and deleted during the workload (short): races, I/O errors and power
cuts, with qemu-img check and every snapshot read back after each reopen.
The runs must be clean and must have run the new operations."""

from __future__ import annotations

import random

import pytest

from corefmt.cli.main import main
from corefmt.stress.faults import SNAPSHOT_SPAN, plan_faults
from corefmt.stress.runner import StressConfig, run_seeds
from corefmt.stress.snapshots import harmless_copied_flags
from corefmt.stress.workload import COMPRESSED, SNAPSHOT_KINDS, generate

pytestmark = pytest.mark.interop

SEEDS, OPS = range(12), 40
#: Option sets with compression and snapshots (refcount_bits=1 takes no
#: snapshots: the run leaves them out there, and still writes compressed).
OPTION_SETS = ("", "cluster_size=4096", "cluster_size=512,refcount_bits=64",
               "cluster_size=65536,extended_l2=on", "lazy_refcounts=on", "compat=0.10")


@pytest.mark.parametrize("options", OPTION_SETS, ids=[o or "defaults" for o in OPTION_SETS])
def test_compressed_writes_and_snapshots_survive_crashes_and_errors(options):
    config = StressConfig(format="qcow2", options=options, crash=True, errors=True,
                          operations=OPS)
    summary = run_seeds(config, SEEDS)
    assert summary.ok, summary.failed_seeds
    assert summary.mismatches == summary.check_failures == 0
    assert summary.compressed_writes > len(SEEDS) and summary.two_phase_writes
    assert summary.snapshots_created >= 3 and summary.snapshots_deleted
    assert summary.snapshot_ops_failed and summary.snapshots_verified


def test_a_short_last_cluster_over_a_base(capsys):
    """An image that ends inside a cluster (compressed writes cover its
    short last one) over a raw base, with the counts on stderr."""
    status = main(["stress", "--format", "qcow2", "--base", "raw", "--crash", "--errors",
                   "--seeds", "8", "--ops", str(OPS), "--size", str(1024 * 1024 - 1536)])
    out, err = capsys.readouterr()
    assert status == 0, out
    assert "mismatches 0, check failures 0" in out
    assert "compressed writes" in err and "snapshots created" in err


def test_refcount_bits_1_writes_compressed_but_takes_no_snapshots():
    config = StressConfig(format="qcow2", options="cluster_size=4096,refcount_bits=1",
                          crash=True, errors=True, operations=OPS)
    summary = run_seeds(config, range(6))
    assert summary.ok, summary.failed_seeds
    assert summary.compressed_writes and not summary.snapshots_created


def test_the_new_kinds_leave_old_workloads_alone():
    """Off, the new kinds draw nothing: a seed's workload is what it was."""
    for seed in range(20):
        plain = generate(random.Random(seed), 1 << 20, OPS, 65536)
        off = generate(random.Random(seed), 1 << 20, OPS, 65536, compressed=False,
                       snapshots=False)
        assert plain == off
    ops = [op for seed in range(20)
           for batch in generate(random.Random(seed), 1 << 20, OPS, 65536, compressed=True,
                                 snapshots=True) for op in batch]
    compressed = [op for op in ops if op.kind == COMPRESSED]
    assert compressed and all(op.offset % 65536 == 0 and op.length % 65536 == 0
                              for op in compressed)
    assert any(op.kind in SNAPSHOT_KINDS for op in ops)


def test_snapshot_operations_run_alone_and_take_faults_inside():
    batches = generate(random.Random(4), 1 << 20, 200, 65536, snapshots=True)
    snapshot_batches = [batch for batch in batches
                        if any(op.kind in SNAPSHOT_KINDS for op in batch)]
    assert snapshot_batches and all(len(batch) == 1 for batch in snapshot_batches)
    tags = [batch[0].tag for batch in snapshot_batches]
    indices = {plan_faults(random.Random(seed), seed, 200, errors=False, crash_disk="d",
                           snapshot_tags=tags).crash_index for seed in range(60)}
    assert max(indices) > 1 and max(indices) <= SNAPSHOT_SPAN


def test_harmless_copied_flags():
    lines = ["ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2",
             "ERROR OFLAG_COPIED data cluster: l2_entry=60000 refcount=1",
             "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000070000 refcount=2",
             "Leaked cluster 5 refcount=2 reference=1"]
    # 5: set, leaked (one real reference); 6: clear, counted once; 7: set and shared.
    assert harmless_copied_flags(lines, 65536) == 2

"""What the stress tester must catch that it once let through: failed
flushes that drop data, faults in create/open/close, a changed size, driver
errors while reopening, failures nobody injected; and its real-files mode."""

from __future__ import annotations

import argparse
import errno
import random

import pytest

from corefmt import plugins
from corefmt.errors import OptionError, StorageError
from corefmt.storage import simulated
from corefmt.storage.simulated import SECTOR_SIZE, SimFault, SimStorageDriver, request_tag
from corefmt.stress import StressConfig, run_seed, run_seeds
from corefmt.stress.faults import ENOSPC_REQUESTS, plan_faults
from corefmt.stress.report import replay_command
from corefmt.stress.runner import check_config

OLD, NEW = b"o" * SECTOR_SIZE, b"n" * SECTOR_SIZE
#: Seeds of the drop test (failed flushes are rare: a few drop in these).
DROP_SEEDS = 30


@pytest.fixture
def sim() -> SimStorageDriver:
    driver = plugins.registry().storages["sim"]
    assert isinstance(driver, SimStorageDriver)
    return driver


def _failing_flush(drop: int | None):
    return lambda request: (SimFault(error=errno.EIO, drop_cache=drop)
                            if request.kind == "flush" and request.tag == 1 else None)


def _after_failed_flush(sim: SimStorageDriver, drop: int | None) -> tuple[bytes, bool]:
    """OLD flushed, NEW written, a failed flush, a flush through a new open,
    a power cut: returns what survives and whether the first open's next
    flush failed too."""
    storage = sim.create("sim:dropped")
    disk = sim.disk("sim:dropped")
    storage.write(0, OLD)
    storage.flush()
    storage.write(0, NEW)
    disk.policy = _failing_flush(drop)
    with request_tag(1), pytest.raises(StorageError):
        storage.flush()
    disk.policy = None
    try:
        storage.flush()
        sticky = False
    except StorageError:
        sticky = True
    sim.open("sim:dropped", read_only=False).flush()  # an open after the failure
    assert storage.read(0, SECTOR_SIZE) == NEW  # the page cache still serves it
    survived = bytes(disk.power_cut(random.Random(0))[:SECTOR_SIZE])
    sim.forget("sim:dropped")
    return survived, sticky


def test_a_failed_flush_keeps_the_dirty_data_or_drops_it(sim):
    assert _after_failed_flush(sim, None) == (NEW, False)  # kept: a later flush saves it
    survivors = {_after_failed_flush(sim, seed) for seed in range(12)}
    # dropped: marked clean, so no later flush writes it; this open's flushes
    # fail from then on, since nothing can say what was lost
    assert {survived for survived, _ in survivors} == {OLD, NEW}
    assert all(sticky for _, sticky in survivors)


def test_flushes_can_run_out_of_space_and_drop_their_data():
    assert "flush" in ENOSPC_REQUESTS
    plan = plan_faults(random.Random(1), 1, 2000, errors=True, crash_disk=None)
    faults = [plan(simulated.SimRequest("d", "flush", 0, 0, tag, planned.index))
              for tag, planned in plan.errors.items()]
    assert {fault.error for fault in faults} == {errno.EIO, errno.ENOSPC}
    drops = [fault.drop_cache is not None for fault in faults]
    assert any(drops) and not all(drops)


def test_runs_with_dropped_caches_pass(monkeypatch):
    drops: list[str] = []
    original = simulated.SimDisk._drop_cache
    monkeypatch.setattr(simulated.SimDisk, "_drop_cache",
                        lambda disk, rng: (drops.append(disk.name), original(disk, rng)))
    summary = run_seeds(StressConfig(format="raw", crash=True, errors=True), range(DROP_SEEDS))
    assert summary.ok, summary.line()
    assert drops


def test_a_storage_that_forgets_a_dropped_cache_is_caught(monkeypatch):
    """Without failing later flushes, a flush claims data that is gone: the
    model accepts old or new for writes a failed flush may have dropped,
    but never the loss of what a later successful flush confirmed."""
    monkeypatch.setattr(simulated.SimStorage, "flush",
                        lambda storage: storage._call("flush", storage.disk.flush))
    summary = run_seeds(StressConfig(format="raw", crash=True, errors=True), range(60))
    assert summary.failed_seeds and summary.mismatches


@pytest.mark.parametrize(("variant", "mode", "seeds"), [
    ("raw-dirtycreate", {"crash": True}, 10),  # a cut create leaves junk that opens
    ("raw-openwrite", {"crash": True}, 30),  # a cut open leaves junk: seeds 20, 25, 27
    ("raw-openswallow", {"errors": True}, 20),  # opens although a read failed
    ("raw-closewrite", {"crash": True}, 16),  # a cut close leaves junk: seeds 5, 12
    ("raw-grow", {}, 5),  # the image grows: its virtual size is checked
    ("raw-grow", {"crash": True}, 5),
    ("raw-flaky", {}, 5),  # fails writes nobody injected a fault into
])
def test_broken_lifecycles_are_caught(broken, variant, mode, seeds):
    summary = run_seeds(StressConfig(format=variant, **mode), range(seeds))
    assert summary.failed_seeds, f"{variant} slipped through: {summary.line()}"


def test_an_uninjected_failure_is_named_as_such(broken):
    result = next(result for seed in range(10)
                  if not (result := run_seed(StressConfig(format="raw-flaky"), seed)).ok)
    assert any("failed without an injected error" in line for line in result.mismatches)


def test_a_driver_error_while_reopening_fails_the_seed_not_the_run(broken, capsys):
    config = StressConfig(format="raw-reopenbug", crash=True)
    summary = run_seeds(config, range(6))  # seeds 2, 4 and 5 write the first sector
    assert summary.seeds == 6 and summary.check_failures >= len(summary.failed_seeds) >= 3
    assert _cli("--format", "raw-reopenbug", "--crash", "--seeds", "6") == 1
    out = capsys.readouterr().out.splitlines()
    fails = [line for line in out if line.startswith("FAIL seed ")]
    replays = [line for line in out if "replay: " in line]
    assert len(fails) == len(replays) == len(summary.failed_seeds)
    assert any("error" in line for line in out if line.startswith("  after the power cut"))
    assert out[-1].startswith("operations ") and "check failures 0" not in out[-1]


def test_lower_layers_lose_power_too_and_must_not_change(blockmap, monkeypatch):
    """A lower layer is read-only: a write that reaches one is caught."""
    original = simulated.SimDisk.read

    def read_and_scribble(disk, offset, buf):
        original(disk, offset, buf)
        if disk.name.endswith("-base0") and simulated.current_tag() >= 0:
            disk._apply_write(0, b"scribble")
    monkeypatch.setattr(simulated.SimDisk, "read", read_and_scribble)
    result = run_seed(StressConfig(format="blockmap", base="raw", crash=True), 1)
    assert any("lower layer" in line for line in result.check_failures)


def test_real_files_run_the_workload_buffered_and_direct(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    for direct in (False, True):
        config = StressConfig(format="raw", real_files=True, direct=direct)
        summary = run_seeds(config, range(4))
        assert summary.ok and summary.operations >= 4 * 20, summary.line()
        assert "--real-files" in replay_command(config, 0)
    assert not list(tmp_path.iterdir())  # each seed cleans up its files


def test_real_files_refuse_faults():
    with pytest.raises(OptionError):
        check_config(StressConfig(real_files=True, crash=True))
    with pytest.raises(OptionError):
        check_config(StressConfig(direct=True))
    assert _cli("--real-files", "--seeds", "2", "--ops", "10") == 0


def _cli(*words: str) -> int:
    from corefmt.cli.stress import add_stress_parser

    parser = argparse.ArgumentParser(prog="corefmt")
    add_stress_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["stress", *words])
    return args.run(args)

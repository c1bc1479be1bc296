"""Short stress runs of every installed driver, and proof that bugs are caught."""

from __future__ import annotations

import argparse

import attrs
import pytest

from corefmt.cli.stress import add_stress_parser
from corefmt.stress import StressConfig, run_seed, run_seeds, runner

SHORT = 60


def _run(config: StressConfig, seeds: int = SHORT):
    return run_seeds(config, range(seeds))


@pytest.mark.parametrize("mode", [{}, {"errors": True}, {"crash": True},
                                  {"crash": True, "errors": True}])
def test_raw_survives_races_errors_and_crashes(mode):
    summary = _run(StressConfig(format="raw", **mode))
    assert summary.ok, summary.line()
    assert summary.operations > SHORT * 10
    if mode.get("crash"):
        assert summary.crashes == SHORT
    if mode.get("errors"):
        assert summary.errors_injected > SHORT // 2


@pytest.mark.parametrize("mode", [{}, {"errors": True}])
def test_outside_format_in_a_chain_with_copy_on_read(blockmap, mode):
    summary = _run(StressConfig(format="blockmap", base="raw", **mode), seeds=25)
    assert summary.ok, summary.line()


@pytest.mark.parametrize("base", [None, "raw"])
def test_outside_format_survives_power_cuts(blockmap, base):
    summary = _run(StressConfig(format="blockmap", base=base, crash=True, errors=True), seeds=25)
    assert summary.ok, summary.line()
    assert summary.crashes == 25


@pytest.mark.parametrize(("variant", "mode", "seeds"), [
    ("raw-noflush", {"crash": True}, 20),
    ("raw-drop", {}, 5),
    ("raw-swallow", {"errors": True}, 20),
    ("raw-racy", {}, 12),  # two racing writes in one 4 KiB chunk: seeds 4 and 10
    ("raw-racy", {"delays": False}, 12),  # completing in issue order too: seeds 4 and 10
])
def test_broken_drivers_are_caught(broken, variant, mode, seeds):
    summary = _run(StressConfig(format=variant, **mode), seeds=seeds)
    assert summary.failed_seeds, f"{variant} slipped through: {summary.line()}"


def test_a_seed_replays_the_same_run():
    config = StressConfig(format="raw", errors=True, crash=True)
    first, again = run_seed(config, 11), run_seed(config, 11)
    assert (first.operations, first.errors_injected) == (again.operations, again.errors_injected)
    assert attrs.asdict(first) == attrs.asdict(again)


RACY_FAILING_SEED = 10
REPLAY_SEEDS = 12


def test_a_racy_failure_replays_exactly(broken):
    """The interleaving follows the seed: the same mismatches, message for message."""
    config = StressConfig(format="raw-racy")
    first, again = run_seed(config, RACY_FAILING_SEED), run_seed(config, RACY_FAILING_SEED)
    assert not first.ok and first.stalls == 0
    assert attrs.asdict(first) == attrs.asdict(again)


@pytest.mark.parametrize(("variant", "mode"), [
    ("raw-racy", {}), ("raw-noflush", {"crash": True}), ("raw", {"crash": True, "errors": True}),
])
def test_many_seeds_replay_exactly(broken, variant, mode):
    config = StressConfig(format=variant, **mode)
    runs = [[attrs.asdict(run_seed(config, seed)) for seed in range(REPLAY_SEEDS)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert attrs.asdict(_run(config, REPLAY_SEEDS)) == attrs.asdict(_run(config, REPLAY_SEEDS))


def test_a_chain_with_copy_on_read_replays_exactly(blockmap):
    config = StressConfig(format="blockmap", base="raw", errors=True)
    first = [attrs.asdict(run_seed(config, seed)) for seed in range(8)]
    assert first == [attrs.asdict(run_seed(config, seed)) for seed in range(8)]
    assert not any(result["stalls"] for result in first)


def test_a_lock_the_scheduler_cannot_see_does_not_hang(broken, monkeypatch):
    monkeypatch.setattr(runner, "STALL_SECONDS", 0.02)
    results = [run_seed(StressConfig(format="raw-plainlock"), seed) for seed in range(4)]
    assert all(result.ok for result in results)
    assert any(result.stalls for result in results)


def _cli(*words: str) -> int:
    parser = argparse.ArgumentParser(prog="corefmt")
    add_stress_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["stress", *words])
    return args.run(args)


def test_cli_prints_a_summary_and_exits_zero(capsys):
    assert _cli("--format", "raw", "--seeds", "5", "--crash") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("operations ") and ", crashes 5, " in out[-1]
    assert out[-1].endswith("mismatches 0, check failures 0")


def test_cli_prints_a_replay_command_that_fails_again(broken, capsys):
    assert _cli("--format", "raw-drop", "--seeds", "3") == 1
    out = capsys.readouterr().out
    replay = next(line for line in out.splitlines() if "replay: " in line)
    words = replay.split("replay: ")[1].split()
    assert words[:2] == ["corefmt", "stress"]
    assert _cli(*words[2:]) == 1
    again = capsys.readouterr().out.splitlines()
    assert again[0].startswith("FAIL seed ") and "mismatches 0" not in again[-1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{}, {"errors": True}, {"crash": True, "errors": True}])
def test_raw_long(mode):
    summary = _run(StressConfig(format="raw", **mode), seeds=2000)
    assert summary.ok, summary.line()


def test_stress_verb_from_the_command_line():
    from tests.conftest import run_cli

    result = run_cli("stress", "--format", "raw", "--seeds", "4", "--crash", "--errors")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("operations ") and ", crashes 4, " in last
    bad = run_cli("stress", "--format", "nosuch", "--seeds", "1")
    assert bad.returncode == 1 and bad.stderr.startswith("corefmt: Unknown file format")

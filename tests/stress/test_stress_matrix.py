"""The matrix mode: every installed format and chain, one table row each."""

from __future__ import annotations

from corefmt import plugins
from corefmt.cli.main import main
from corefmt.stress.report import StressSummary, format_table, total
from tests.conftest import run_cli


def test_matrix_covers_every_format_and_chain(blockmap):
    result = run_cli("stress", "--matrix", "--seeds", "3", "--ops", "20", "--crash", "--errors")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    header, rows, last = lines[0], lines[2:-1], lines[-1]
    assert header.split()[:3] == ["target", "seeds", "operations"]
    names = [row.split("  ")[0].strip() for row in rows]
    for name in ["blockmap", "raw", "blockmap <- blockmap", "raw <- blockmap",
                 "raw <- blockmap <- blockmap"]:
        assert name in names
    # Every installed format, with every option set its driver asks to be raced with.
    registry = plugins.registry()
    for format_name, driver in registry.formats.items():
        for option_set in driver.stress_option_sets:
            assert (f"{format_name} -o {option_set}" if option_set else format_name) in names
    for row in rows:
        cells = row.split()[-6:]
        assert cells[0] == "3" and cells[2] == "3"  # seeds, crash points
        assert cells[4:] == ["0", "0"]  # mismatches, check failures
    assert last.startswith("operations ") and f", crashes {3 * len(rows)}, " in last


def test_table_and_totals_add_up():
    first = StressSummary(seeds=2, operations=10, crashes=2, errors_injected=1)
    second = StressSummary(seeds=3, operations=5, mismatches=4, failed_seeds=[7])
    combined = total([first, second])
    assert (combined.seeds, combined.operations, combined.mismatches) == (5, 15, 4)
    assert not combined.ok and combined.failed_seeds == [7]
    table = format_table([("raw", first), ("raw <- qcow2", second)]).splitlines()
    assert table[2].split() == ["raw", "2", "10", "2", "1", "0", "0"]
    assert table[3].split()[-6:] == ["3", "5", "0", "0", "4", "0"]


def test_create_options_reach_the_image_and_the_replay_line(broken, capsys):
    assert main(["stress", "--format", "raw-drop", "-o", "preallocation=full",
                 "--seeds", "2"]) == 1
    replay = next(line for line in capsys.readouterr().out.splitlines() if "replay: " in line)
    assert "-o preallocation=full" in replay
    assert main(replay.split("replay: ")[1].split()[1:]) == 1
    assert "FAIL seed" in capsys.readouterr().out


def test_bad_create_options_are_refused_before_any_run():
    bad = run_cli("stress", "--format", "raw", "-o", "preallocation=bogus", "--seeds", "1")
    assert bad.returncode == 1 and "preallocation" in bad.stderr and not bad.stdout
    matrix = run_cli("stress", "--matrix", "-o", "preallocation=full", "--seeds", "1")
    assert matrix.returncode == 1 and "--matrix" in matrix.stderr
    fuzz = run_cli("fuzz", "--format", "raw", "-o", "nope=1")
    assert fuzz.returncode == 1 and "Invalid parameter 'nope'" in fuzz.stderr


def test_fuzz_takes_create_options():
    result = run_cli("fuzz", "--format", "raw", "-o", "preallocation=falloc", "--examples", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("cases 20, opened 20")


def test_matrix_runs_each_option_set_a_driver_declares(monkeypatch):
    from corefmt import plugins
    from corefmt.cli.stress import matrix_targets
    from corefmt.stress import StressConfig
    from corefmt.stress.report import target_name

    raw = plugins.registry().format("raw")
    monkeypatch.setattr(type(raw), "stress_option_sets", ("", "preallocation=full"))
    names = [target_name(config) for config in matrix_targets(StressConfig(crash=True))]
    assert "raw" in names and "raw -o preallocation=full" in names


def test_three_image_chain_reads_every_layer_and_survives_crashes(blockmap):
    from corefmt.stress import StressConfig, run_seeds

    config = StressConfig(format="blockmap", base="raw,blockmap", crash=True, errors=True)
    summary = run_seeds(config, range(15))
    assert summary.ok, summary.line()
    assert summary.crashes == 15 and summary.operations > 150


def test_chain_formats_are_validated(blockmap):
    chained = run_cli("stress", "--format", "raw", "--base", "raw,blockmap", "--seeds", "1")
    assert chained.returncode == 1 and "Format raw does not support backing" in chained.stderr
    middle = run_cli("stress", "--format", "blockmap", "--base", "blockmap,raw", "--seeds", "1")
    assert middle.returncode == 1 and "Format raw does not support backing" in middle.stderr

"""What the per-format stress tests share: one ``corefmt stress --crash
--errors`` run (or ``--errors`` alone) that must end with no mismatch and
no check failure."""

from __future__ import annotations

from corefmt.cli.main import main


def assert_stress_clean(capsys, format: str, options: str = "", base: str = "", *,
                        seeds: str, ops: str, crash: bool = True) -> None:
    args = ["stress", "--format", format, *(["--crash"] if crash else []), "--errors",
            "--seeds", seeds, "--ops", ops]
    if options:
        args += ["-o", options]
    if base:
        args += ["--base", base]
    status = main(args)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "mismatches 0, check failures 0" in out, out

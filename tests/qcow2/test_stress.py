"""corefmt stress on qcow2 in the default run (short): races, I/O errors and
power cuts over every option set the driver lists, alone and over raw and
qcow2 bases, with qemu-img check after each power cut. ``tox -e stress-long``
runs the long version."""

from __future__ import annotations

import pytest
from corefmt_qcow2.driver import Qcow2Driver

from corefmt.cli.main import main

pytestmark = pytest.mark.interop

SEEDS, OPS = "30", "40"
OPTION_SETS = Qcow2Driver.stress_option_sets


@pytest.mark.parametrize("base", ["", "raw", "qcow2"], ids=["alone", "over-raw", "over-qcow2"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=[o or "defaults" for o in OPTION_SETS])
def test_stress_crash_errors(options, base, capsys):
    args = ["stress", "--format", "qcow2", "--crash", "--errors", "--seeds", SEEDS,
            "--ops", OPS]
    if options:
        args += ["-o", options]
    if base:
        args += ["--base", base]
    status = main(args)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "mismatches 0, check failures 0" in out, out

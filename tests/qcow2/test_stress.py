"""corefmt stress on qcow2 in the default run (short): races, I/O errors and
power cuts over every option set the driver lists, alone and over raw and
qcow2 bases, with qemu-img check after each power cut. ``tox -e stress-long``
runs the long version."""

from __future__ import annotations

import pytest
from corefmt_qcow2.driver import Qcow2Driver

from tests.stressing import assert_stress_clean

pytestmark = pytest.mark.interop

SEEDS, OPS = "30", "40"
OPTION_SETS = Qcow2Driver.stress_option_sets


@pytest.mark.parametrize("base", ["", "raw", "qcow2"], ids=["alone", "over-raw", "over-qcow2"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=[o or "defaults" for o in OPTION_SETS])
def test_stress_crash_errors(options, base, capsys):
    assert_stress_clean(capsys, "qcow2", options, base, seeds=SEEDS, ops=OPS)


@pytest.mark.parametrize("base", ["", "raw"], ids=["alone", "over-raw"])
def test_stress_errors_without_power_cuts(base, capsys):
    """A close that fails on an injected error has flushed nothing for sure:
    the reopen may find what it did not flush gone (a failed fsync may drop
    it), as after a power cut."""
    assert_stress_clean(capsys, "qcow2", "", base, seeds="30", ops=OPS, crash=False)

"""`corefmt check`: qemu-img check's output and exit status over the check
interface; formats without one are refused as qemu-img refuses them."""

from __future__ import annotations

import json

import pytest
from corefmt_raw.driver import RawDriver, RawImage

import corefmt
from corefmt import hookimpl, plugins
from corefmt.capabilities import CheckFix, CheckResult
from corefmt.cli.main import main

MiB = 1024 * 1024


class _LeakyImage(RawImage):
    """raw with a check that finds two leaks until repaired (state in a class
    attribute: each check opens the image anew)."""

    leaks = 2

    def check(self, fix: CheckFix) -> CheckResult:
        found = _LeakyImage.leaks
        fixed = found if fix & CheckFix.LEAKS else 0
        _LeakyImage.leaks -= fixed
        return CheckResult(leaks=found - fixed, leaks_fixed=fixed, image_end_offset=65536,
                           total_clusters=16, allocated_clusters=4,
                           messages=[f"Leaked cluster {n} refcount=1 reference=0"
                                     for n in range(found - fixed)])


class _LeakyDriver(RawDriver):
    name = "leaky"

    def probe(self, head, path):
        return 0

    def open(self, storage, context):
        return _LeakyImage(storage, context)


class _Plugin:
    @hookimpl
    def corefmt_register(self, registry):
        registry.add_format(_LeakyDriver())


@pytest.fixture
def leaky(tmp_path):
    plugin = _Plugin()
    plugins.register_plugin(plugin)
    _LeakyImage.leaks = 2
    path = str(tmp_path / "img")
    corefmt.create(path, "leaky", MiB)
    yield path
    plugins.unregister_plugin(plugin)


def test_leaks_are_reported_as_qemu_img_reports_them(leaky, capsys):
    assert main(["check", "-f", "leaky", leaky]) == 3
    out, err = capsys.readouterr()
    assert out == ("\n2 leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n"
                   "4/16 = 25.00% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
                   "Image end offset: 65536\n")
    assert err.splitlines() == ["Leaked cluster 0 refcount=1 reference=0",
                                "Leaked cluster 1 refcount=1 reference=0"]


def test_json_output_has_qemu_img_keys(leaky, capsys):
    assert main(["check", "--output=json", "-f", "leaky", leaky]) == 3
    document = json.loads(capsys.readouterr().out)
    assert document == {"image-end-offset": 65536, "total-clusters": 16, "check-errors": 0,
                        "allocated-clusters": 4, "leaks": 2, "filename": leaky,
                        "format": "leaky"}


def test_repair_then_double_check(leaky, capsys):
    assert main(["check", "-r", "leaks", "-f", "leaky", leaky]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    2 leaked clusters\n    0 corruptions\n\n"
                          "Double checking the fixed image now...\n"
                          "No errors were found on the image.\n")


@pytest.mark.interop
def test_a_format_without_check_answers_as_qemu_img(corefmt, qemu_img, tmp_path):
    assert qemu_img("create", "-f", "raw", "a.raw", "1M").returncode == 0
    ours, theirs = corefmt("check", "-f", "raw", "a.raw"), qemu_img("check", "-f", "raw", "a.raw")
    assert ours.returncode == theirs.returncode == 63
    assert ours.stderr.replace("corefmt:", "qemu-img:") == theirs.stderr
    bad = corefmt("check", "-r", "bogus", "a.raw")
    assert bad.returncode == 1 and "expecting 'leaks' or 'all'" in bad.stderr

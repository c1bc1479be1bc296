"""An overlay remembers which version of its remote base it was made over.

A local overlay lives for days; the base on the server may be replaced in
the meantime (a new cloud image under the same name). Reading the overlay
over the new base would mix the guest's old blocks with the new image's:
corefmt records the base's version (size, ETag) in the overlay when it is
made and refuses the base on every later open once it is another version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.remote.conftest import Served

ALLOW = ("--allow-protocol", "http")
DAY = 86400


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def _replace_on_server(served: Served, name: str) -> None:
    """The same bytes as a new version (nginx's ETag is mtime-size): a day
    older than the one it replaces."""
    local = served.local(name)
    newer = local.with_suffix(".new")
    shutil.copyfile(local, newer)
    older = local.stat().st_mtime - DAY
    os.utime(newer, (older, older))
    os.replace(newer, local)


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_an_overlay_refuses_its_base_once_replaced_on_the_server(
        served: Served, fmt: str, tmp_path: Path):
    name = f"base-for-{fmt}.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / f"overlay.{fmt}"
    run_cli("create", "-f", fmt, "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    run_cli("io", *ALLOW, "-c", "write -P 0x5a 0 4096", str(overlay), check=True)
    before = overlay.read_bytes()
    reference = str(served.local("disk.qcow2"))
    # the overlay differs from the base where it was written, and reads
    same = run_cli("compare", *ALLOW, str(overlay), reference)
    assert same.returncode == 1 and "offset 0" in same.stdout, same.stdout + same.stderr

    _replace_on_server(served, name)
    for command in (("compare", *ALLOW, str(overlay), reference),
                    ("map", *ALLOW, str(overlay)),
                    ("io", *ALLOW, "-c", "read 0 4096", str(overlay))):
        line = _one_line(run_cli(*command))
        assert f"'{served.url(name)}'" in line and "changed since" in line, line
        assert "ETag" in line
    assert overlay.read_bytes() == before  # refused before anything was written
    # A name without a recorded version (made with -u) is not checked.
    unsafe = tmp_path / f"unsafe.{fmt}"
    run_cli("create", "-f", fmt, "-u", "-b", served.url(name), "-F", "qcow2", str(unsafe),
            "16M", check=True)
    assert run_cli("map", *ALLOW, str(unsafe)).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_a_rebase_onto_the_new_version_records_it(served: Served, fmt: str, tmp_path: Path):
    """The user who knows the new base is right says so with a (safe) rebase:
    what differs is copied into the overlay and the new version recorded."""
    name = f"base-for-rebase-{fmt}.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / f"overlay.{fmt}"
    run_cli("create", "-f", fmt, "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    _replace_on_server(served, name)
    assert run_cli("map", *ALLOW, str(overlay)).returncode != 0
    # rebase -u: the version on the server now is the one to check from now on
    run_cli("rebase", *ALLOW, "-u", "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    assert run_cli("map", *ALLOW, str(overlay)).returncode == 0
    _replace_on_server(served, name)
    assert "changed since" in _one_line(run_cli("map", *ALLOW, str(overlay)))
    run_cli("rebase", *ALLOW, "-u", "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    run_cli("rebase", *ALLOW, "-b", served.url(name), "-F", "qcow2", str(overlay), check=True)
    assert run_cli("map", *ALLOW, str(overlay)).returncode == 0
    _replace_on_server(served, name)
    assert "changed since" in _one_line(run_cli("map", *ALLOW, str(overlay)))


@pytest.mark.interop
def test_qemu_keeps_the_record_and_a_renamed_base_makes_it_stale(served: Served,
                                                                 tmp_path: Path):
    """The record is a qcow2 header extension qemu does not know: qemu-img
    opens and checks the overlay, keeps the record when it rewrites the
    header, and a backing renamed by qemu-img leaves it stale (ignored)."""
    name = "base-for-qemu.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / "overlay.qcow2"
    run_cli("create", "-f", "qcow2", "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    checked = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(overlay)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "lazy_refcounts=on",
                    str(overlay)], check=True, capture_output=True)
    _replace_on_server(served, name)
    assert "changed since" in _one_line(run_cli("map", *ALLOW, str(overlay)))
    shutil.copyfile(served.local(name), tmp_path / "local.qcow2")
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "local.qcow2", "-F",
                    "qcow2", str(overlay)], check=True, capture_output=True)
    mapped = run_cli("map", "--output=json", str(overlay))
    assert mapped.returncode == 0 and json.loads(mapped.stdout), mapped.stderr


def test_a_json_backing_is_checked_too(served: Served, tmp_path: Path):
    name = "base-for-json.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / "overlay.qcow2"
    spec = "json:" + json.dumps({"driver": "qcow2", "file": served.url(name)})
    run_cli("create", "-f", "qcow2", "-b", spec, "-F", "qcow2", str(overlay), check=True)
    allow = ("--allow-protocol", "json,http")
    assert run_cli("map", *allow, str(overlay)).returncode == 0
    _replace_on_server(served, name)
    assert "changed since" in _one_line(run_cli("map", *allow, str(overlay)))


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_a_base_replaced_by_another_format_is_told_by_its_version(
        served: Served, fmt: str, tmp_path: Path):
    """A new object of another format under the old name: the refusal says
    the base changed (the real cause), not that it is not a qcow2 image."""
    name = f"base-for-format-{fmt}.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / f"overlay.{fmt}"
    run_cli("create", "-f", fmt, "-b", served.url(name), "-F", "qcow2", str(overlay),
            check=True)
    replacement = served.local(name).with_suffix(".new")
    shutil.copyfile(served.local("disk.fvd"), replacement)
    os.replace(replacement, served.local(name))
    line = _one_line(run_cli("map", *ALLOW, str(overlay)))
    assert f"'{served.url(name)}'" in line and "changed since" in line, line


@pytest.mark.parametrize(("maker", "fmt"), [("qemu-img", "qcow2"), ("create -u", "qcow2"),
                                           ("create -u", "fvd")])
def test_an_overlay_without_a_record_records_its_first_read_write_open(
        served: Served, maker: str, fmt: str, tmp_path: Path):
    """Trust on first use: an overlay qemu-img made (or ``create -u``) holds
    no version; a read-only open leaves it so, the first read-write open
    records the base it meets, and a later replacement is refused."""
    name = f"base-for-first-use-{maker.replace(' ', '')}-{fmt}.qcow2"
    shutil.copyfile(served.local("disk.qcow2"), served.local(name))
    overlay = tmp_path / f"overlay.{fmt}"
    if maker == "qemu-img":
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", served.url(name),
                        "-F", "qcow2", str(overlay), "16M"], check=True, capture_output=True)
    else:
        run_cli("create", "-f", fmt, "-u", "-b", served.url(name), "-F", "qcow2",
                str(overlay), "16M", check=True)
    made = overlay.read_bytes()
    assert run_cli("map", *ALLOW, str(overlay)).returncode == 0
    assert overlay.read_bytes() == made  # read-only: nothing written
    # Verbs that open read-write but refuse to act leave it as it was, as qemu-img does.
    for refused in (("rebase", *ALLOW, "-b", str(tmp_path / "missing.qcow2"), "-F", "qcow2",
                     str(overlay)),
                    ("resize", *ALLOW, str(overlay), "-1G")):
        assert run_cli(*refused).returncode != 0, refused
        assert overlay.read_bytes() == made, refused
    run_cli("io", *ALLOW, "-c", "write -P 0x33 0 4096", str(overlay), check=True)
    checked = (subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True,
                              text=True) if fmt == "qcow2"
               else run_cli("check", *ALLOW, str(overlay)))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    _replace_on_server(served, name)
    line = _one_line(run_cli("map", *ALLOW, str(overlay)))
    assert f"'{served.url(name)}'" in line and "changed since" in line, line

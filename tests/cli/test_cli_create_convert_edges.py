"""Edge cases of create and convert that once lost data or surprised."""

from __future__ import annotations

import os

import corefmt
from tests.conftest import run_cli

MiB = 1024 * 1024


def test_convert_ignores_a_size_option_as_qemu_img_does(tmp_path):
    source = str(tmp_path / "a.raw")
    corefmt.create(source, "raw", MiB)
    for size in ("4k", "2M"):
        target = str(tmp_path / f"out-{size}.raw")
        run_cli("convert", "-O", "raw", "-o", f"size={size}", source, target, check=True)
        assert os.path.getsize(target) == MiB


def test_a_failed_create_through_a_symlink_keeps_the_link_and_removes_what_it_made(tmp_path):
    link = tmp_path / "link.raw"
    target = tmp_path / "target.raw"
    link.symlink_to(target)  # dangling: create makes the target
    result = run_cli("create", "-f", "raw", "-o", "preallocation=full", str(link), "100T")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert link.is_symlink() and not target.exists()

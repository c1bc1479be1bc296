"""`corefmt map` (human table) against `qemu-img map` on qcow2 images: the
same table, and for compressed clusters the same refusal after the lines
before them (stdout, stderr after the program name, exit status)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)


def _image(tmp_path, compressed: bool) -> str:
    _run(QEMU_IMG, "create", "-q", "-f", "raw", "src.raw", "2M", cwd=tmp_path)
    _run(QEMU_IO, "-f", "raw", "-c", "write -P 5 64k 128k", "-c", "write -P 6 1M 64k",
         "src.raw", cwd=tmp_path)
    made = _run(QEMU_IMG, "convert", *(["-c"] if compressed else []), "-f", "raw", "-O",
                "qcow2", "src.raw", "image.qcow2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    if compressed:  # one plain cluster after the compressed ones
        _run(QEMU_IO, "-c", "write -P 7 1536k 64k", "image.qcow2", cwd=tmp_path)
    return "image.qcow2"


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_human_map_is_qemus(tmp_path, compressed, monkeypatch):
    name = _image(tmp_path, compressed)
    theirs = _run(QEMU_IMG, "map", name, cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    ours = run_cli("map", name)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert ours.stderr.replace("corefmt:", "qemu-img:") == theirs.stderr
    assert ours.returncode == (1 if compressed else 0)

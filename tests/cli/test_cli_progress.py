"""Progress, three ways (corefmt/cli/progress.py): ``-p`` byte for byte as
qemu-img prints it (scripts parse it), ``--progress=bar`` for people,
``--progress=json`` lines for programs."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corefmt.cli.progress import JSON_INTERVAL, JsonProgress, QemuProgress

QEMU_IMG = shutil.which("qemu-img")
QEMU_LINE = re.compile(rb"(    \(\d{1,3}\.\d\d/100%\)\r)+\n")
MiB = 1024 * 1024


def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in args], capture_output=True, timeout=120, check=False)


def corefmt_cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return run(sys.executable, "-m", "corefmt.cli.main", *args)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        for index in range(8):
            f.seek(index * MiB)
            f.write(bytes([index + 1]) * (256 * 1024))
    return path


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_dash_p_prints_qemu_img_s_line(tmp_path, image):
    ours = corefmt_cli("convert", "-p", "-O", "qcow2", image, tmp_path / "ours.qcow2")
    theirs = run(QEMU_IMG, "convert", "-p", "-O", "qcow2", image, tmp_path / "theirs.qcow2")
    for result in (ours, theirs):
        assert result.returncode == 0, result.stderr
        assert QEMU_LINE.fullmatch(result.stdout), result.stdout
        assert result.stdout.startswith(b"    (0.00/100%)\r")
        assert result.stdout.endswith(b"    (100.00/100%)\r\n")
    assert ours.stderr == b""


def test_progress_bar_goes_to_stderr(tmp_path, image):
    result = corefmt_cli("convert", "--progress=bar", "-O", "raw", image, tmp_path / "o.raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert b"100%" in result.stderr


def test_json_lines_for_programs(tmp_path, image):
    result = corefmt_cli("convert", "--progress=json", "-O", "raw", image, tmp_path / "o.raw")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert records[0]["done"] == 0 and records[-1]["done"] == records[-1]["total"] == 8 * MiB
    assert {record["phase"] for record in records} == {"convert"}
    assert all(set(record) == {"phase", "done", "total", "percent", "rate"}
               for record in records)
    assert records[-1]["percent"] == 100.0


def test_quiet_silences_every_style(tmp_path, image):
    for style in ("-p", "--progress=bar", "--progress=json"):
        result = corefmt_cli("convert", style, "-q", "-O", "raw", image, tmp_path / "o.raw")
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), style


def test_qemu_style_prints_each_point_once():
    out = io.StringIO()
    shown = QemuProgress(out)
    for done in range(0, 1001):
        shown(done, 1000)
    shown.end()
    values = [float(v) for v in re.findall(r"\((\d+\.\d\d)/100%\)", out.getvalue())]
    assert values[0] == 0.0 and values[-1] == 100.0
    assert all(later - earlier > 1.0 for earlier, later in itertools.pairwise(values[1:-1]))
    assert out.getvalue().endswith("\r\n")


def test_json_lines_are_rate_limited_but_keep_the_last():
    now = [0.0]
    out = io.StringIO()
    shown = JsonProgress("copy", out, clock=lambda: now[0])
    for done in range(100):
        now[0] += JSON_INTERVAL / 10
        shown(done, 200)
    shown.end()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert 5 <= len(records) <= 12
    assert records[-1]["done"] == 99


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_a_failing_operation_prints_what_qemu_img_prints(tmp_path):
    ours = corefmt_cli("convert", "-p", tmp_path / "missing.raw", tmp_path / "never.raw")
    theirs = run(QEMU_IMG, "convert", "-p", tmp_path / "missing.raw", tmp_path / "never.raw")
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout == b"    (0.00/100%)\r\n"

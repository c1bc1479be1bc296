"""log: one exact line per request, the outcome included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from corefmt.block.chain import open_graph
from corefmt.errors import OptionError, RangeError, StorageError
from corefmt.filters import log
from corefmt.flags import RequestFlags
from tests.conftest import run_cli
from tests.filters.helpers import FakeClock, blkdebug_spec, make_raw, raw_spec

#: Every request takes this long: the fake clock moves this much per reading.
DURATION = 0.00025
LINE = re.compile(r"^(read|write|write_zeroes|discard|flush|truncate) offset=\d+ length=\d+ "
                  r"flags=[A-Z_|]+ duration=\d+\.\d{6} (ok|error: .+)$")


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(step=DURATION)
    monkeypatch.setattr(log, "CLOCK", fake)
    return fake


def logged(log_path: Path, below: dict) -> object:
    return open_graph({"driver": "log", "path": str(log_path), "file": below})


def test_every_request_is_one_exact_line(tmp_path):
    image = make_raw(tmp_path / "disk.raw")
    log_path = tmp_path / "requests.log"
    with logged(log_path, raw_spec(image)) as node:
        node.write(4096, b"a" * 512, RequestFlags.FUA)
        assert node.read(4096, 512) == b"a" * 512
        node.write_zeroes(8192, 1024, unmap=True)
        node.write_zeroes(0, 512, flags=RequestFlags.FUA | RequestFlags.NO_FALLBACK)
        node.discard(16384, 4096)
        node.flush()
        node.truncate(128 * 1024)
    assert log_path.read_text().splitlines() == [
        "write offset=4096 length=512 flags=FUA duration=0.000250 ok",
        "read offset=4096 length=512 flags=NONE duration=0.000250 ok",
        "write_zeroes offset=8192 length=1024 flags=MAY_UNMAP duration=0.000250 ok",
        "write_zeroes offset=0 length=512 flags=FUA|NO_FALLBACK duration=0.000250 ok",
        "discard offset=16384 length=4096 flags=NONE duration=0.000250 ok",
        "flush offset=0 length=0 flags=NONE duration=0.000250 ok",
        "truncate offset=0 length=131072 flags=NONE duration=0.000250 ok",
    ]


def test_a_failed_request_is_logged_with_its_error_and_still_fails(tmp_path):
    image = make_raw(tmp_path / "disk.raw", data=b"d" * 512)  # data: holes are not read
    log_path = tmp_path / "requests.log"
    rules = [{"event": "read_aio", "once": True}]
    with logged(log_path, blkdebug_spec(image, rules)) as node:
        with pytest.raises(StorageError):
            node.read(0, 512)
        node.read(0, 512)
    assert log_path.read_text().splitlines() == [
        f"read offset=0 length=512 flags=NONE duration=0.000250 error: {image}: read failed: "
        "Input/output error",
        "read offset=0 length=512 flags=NONE duration=0.000250 ok",
    ]


def test_requests_refused_before_the_filter_are_not_logged(tmp_path):
    image = make_raw(tmp_path / "disk.raw", 4096)
    log_path = tmp_path / "requests.log"
    with logged(log_path, raw_spec(image)) as node, pytest.raises(RangeError):
        node.read(4096, 1)  # past the end: the node refuses it
    assert log_path.read_text() == ""


def test_lines_are_appended_across_opens(tmp_path):
    image = make_raw(tmp_path / "disk.raw")
    log_path = tmp_path / "requests.log"
    log_path.write_text("earlier line\n")
    for offset in (0, 512):
        with logged(log_path, raw_spec(image)) as node:
            node.write(offset, b"x" * 512)
    assert log_path.read_text().splitlines() == [
        "earlier line",
        "write offset=0 length=512 flags=NONE duration=0.000250 ok",
        "write offset=512 length=512 flags=NONE duration=0.000250 ok",
    ]


def test_path_is_required_and_must_be_writable(tmp_path):
    image = make_raw(tmp_path / "disk.raw")
    with pytest.raises(OptionError, match="needs a 'path' option"):
        open_graph({"driver": "log", "file": raw_spec(image)})
    with pytest.raises(OptionError, match="Could not open log file"):
        logged(tmp_path / "no" / "such" / "dir.log", raw_spec(image))


def test_the_cli_logs_through_a_json_spec(tmp_path):
    image = make_raw(tmp_path / "disk.raw")
    log_path = tmp_path / "cli.log"
    spec = {"driver": "log", "path": str(log_path), "file": raw_spec(image)}
    result = run_cli("io", "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k",
                     f"json:{json.dumps(spec)}")
    assert result.returncode == 0, result.stderr
    lines = log_path.read_text().splitlines()
    assert [line.split(" duration=")[0] for line in lines[:2]] == [
        "write offset=0 length=4096 flags=NONE", "read offset=0 length=4096 flags=NONE"]
    assert all(LINE.match(line) for line in lines), lines

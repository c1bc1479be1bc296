"""The request queue keeps requests in flight and reports their errors."""

from __future__ import annotations

import threading

import pytest

import corefmt
from corefmt.block.queue import RequestQueue
from corefmt.errors import RangeError

KiB = 1024


def test_queue_runs_requests_concurrently_and_drains(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", 256 * KiB)
    with corefmt.open(path, "raw") as disk:
        with RequestQueue(depth=4) as queue:
            for index in range(64):
                queue.write(disk, index * 4 * KiB, bytes([index]) * 4 * KiB)
        buffers = [memoryview(bytearray(4 * KiB)) for _ in range(64)]
        with RequestQueue(depth=4) as queue:
            for index, buf in enumerate(buffers):
                queue.read(disk, index * 4 * KiB, buf)
        assert all(bytes(buf) == bytes([index]) * 4 * KiB for index, buf in enumerate(buffers))


def test_queue_overlaps_requests():
    both_running = threading.Barrier(2, timeout=5)
    with RequestQueue(depth=2) as queue:
        # each request waits for the other: only possible if they overlap
        first = queue.submit(both_running.wait)
        second = queue.submit(both_running.wait)
    assert {first.result(), second.result()} == {0, 1}


def test_queue_reports_the_first_error(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", 4 * KiB)
    with corefmt.open(path, "raw") as disk:
        queue = RequestQueue(depth=2)
        queue.write(disk, 0, b"ok")
        queue.write(disk, 4 * KiB, b"past the end")
        with pytest.raises(RangeError):
            queue.drain()
        queue.close()
        assert disk.read(0, 2) == b"ok"

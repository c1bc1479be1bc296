"""Safe rebase reads the chains on a thread of its own while it writes: the
copy is the same as in turn, progress comes in order, and a failure on
either side ends the rebase with its error (no hang, nothing re-pointed)."""

from __future__ import annotations

import threading
import time

import pytest

import corefmt
from corefmt.block.image_node import ImageNode
from corefmt.errors import CorefmtError
from corefmt.ops import rebase as rebase_module
from corefmt.ops.rebase import rebase
from tests.conftest import fill

MiB = 1024 * 1024
SIZE = 24 * MiB


def _chain(tmp_path):
    """top over mid over base; mid holds data in many chunks."""
    base, mid, top = (str(tmp_path / name) for name in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    corefmt.create(base, "qcow2", SIZE)
    corefmt.create(mid, "qcow2", SIZE, backing=base, backing_format="qcow2")
    with corefmt.open(mid, "qcow2") as node:
        for index, offset in enumerate(range(0, SIZE, 3 * MiB)):
            node.write(offset, fill(MiB + 4096, index))
    corefmt.create(top, "qcow2", SIZE, backing=mid, backing_format="qcow2")
    with corefmt.open(top, "qcow2") as node:
        node.write(MiB, fill(MiB, 99))
    with corefmt.open(top, "qcow2", read_only=True) as node:
        expected = node.read(0, SIZE)
    return base, top, expected


def test_the_pipelined_copy_keeps_the_guest_view_and_reports_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(rebase_module, "COMPARE_CHUNK", 512 * 1024)  # many chunks in flight
    base, top, expected = _chain(tmp_path)
    seen: list[int] = []
    copied = rebase(top, base, "qcow2", progress=lambda done, total: seen.append(done))
    assert copied > 0 and seen == sorted(seen) and seen[-1] == SIZE
    with corefmt.open(top, "qcow2", read_only=True) as node:
        assert node.read(0, SIZE) == expected
        assert node.layer().backing.filename == base


@pytest.mark.parametrize("side", ["read", "write"])
def test_a_failure_on_either_side_ends_the_rebase_with_its_error(tmp_path, monkeypatch, side):
    monkeypatch.setattr(rebase_module, "COMPARE_CHUNK", 64 * 1024)  # the reader far ahead
    base, top, _ = _chain(tmp_path)
    calls = {"n": 0}
    method = "readinto" if side == "read" else "write"
    original = getattr(ImageNode, method)

    def failing(self, *args, **kwargs):
        if self.filename.endswith("mid.qcow2" if side == "read" else "top.qcow2"):
            calls["n"] += 1
            if calls["n"] == (5 if side == "read" else 1):
                raise CorefmtError(f"injected {side} error")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageNode, method, failing)
    with pytest.raises(CorefmtError, match=f"injected {side} error"):
        rebase(top, base, "qcow2")
    monkeypatch.setattr(ImageNode, method, original)
    with corefmt.open(top, "qcow2", read_only=True) as node:
        assert node.layer().backing.filename.endswith("mid.qcow2")  # not re-pointed


def test_a_progress_callback_that_raises_stops_the_reader_too(tmp_path, monkeypatch):
    """The caller gives up between chunks (its progress callback raises, as
    Ctrl-C would in ready.get): no buffer is being compared then, so only
    the wake-up in run's cleanup frees a reader waiting for one."""
    monkeypatch.setattr(rebase_module, "COMPARE_CHUNK", 64 * 1024)  # the reader far ahead
    base, top, _ = _chain(tmp_path)

    class GiveUp(Exception):
        pass

    def give_up(done, total):
        time.sleep(0.5)  # the reader meanwhile fills every buffer and waits for one
        raise GiveUp

    outcome: list[BaseException] = []

    def run():
        try:
            rebase(top, base, "qcow2", progress=give_up)
        except BaseException as error:  # reported below
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the rebase hung: its reader waits for a buffer"
    assert len(outcome) == 1 and isinstance(outcome[0], GiveUp)
    with corefmt.open(top, "qcow2", read_only=True) as node:
        assert node.layer().backing.filename.endswith("mid.qcow2")  # not re-pointed

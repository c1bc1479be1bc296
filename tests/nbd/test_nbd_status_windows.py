"""Block status of an export is asked of the chain a window at a time.

qemu's NBD client asks with REQ_ONE from each extent to the end of the
disk; answering from the whole range each time made a convert's status
cost grow with the square of the extents (a 1 GiB image converted at 0.05
of qemu-nbd's speed). The answers must not change: runs longer than a
window, and runs that start in one window and end in another, give the
same descriptors as one query of the whole range.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corefmt.block.chain import open_chain
from corefmt.nbd.export import STATUS_WINDOW, Export
from corefmt.nbd.protocol import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH

MiB = 1024 * 1024
SIZE = 3 * STATUS_WINDOW + 8 * MiB
#: Data runs: one across the first window boundary, one longer than a window.
DATA = ((STATUS_WINDOW - MiB, 2 * MiB), (STATUS_WINDOW + 4 * MiB, STATUS_WINDOW + 8 * MiB),
        (3 * STATUS_WINDOW + MiB, 4096))


@pytest.fixture
def export(tmp_path: Path):
    path = tmp_path / "windows.raw"
    with open(path, "wb") as stream:
        stream.truncate(SIZE)
        for offset, length in DATA:
            stream.seek(offset)
            stream.write(b"\x07" * length)
    with open_chain(str(path), "raw", read_only=True) as node:
        yield Export(node, read_only=True)


def _whole(export: Export, context: str, offset: int) -> list[tuple[int, int]]:
    """The descriptors from one query of the whole range (the old way)."""
    runs: list[tuple[int, int]] = []
    for extent in export.node.block_status(offset, SIZE - offset):
        start, end = max(extent.offset, offset), min(extent.end, SIZE)
        if end <= start:
            continue
        if context == BASE_ALLOCATION:
            value = 0 if extent.data else 3
        else:
            value = 0 if extent.node is None else extent.depth + 1
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + end - start, value)
        else:
            runs.append((end - start, value))
    return runs


@pytest.mark.parametrize("context", [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH])
def test_windowed_answers_equal_one_query_of_the_whole_range(export, context):
    starts = sorted({0, STATUS_WINDOW - MiB, STATUS_WINDOW, STATUS_WINDOW + MiB,
                     STATUS_WINDOW + 4 * MiB, 2 * STATUS_WINDOW, 2 * STATUS_WINDOW + 12 * MiB,
                     3 * STATUS_WINDOW + MiB})
    for offset in starts:
        expected = _whole(export, context, offset)
        assert export.status(context, offset, SIZE - offset, one=False) == expected, offset
        assert export.status(context, offset, SIZE - offset, one=True) == expected[:1], offset


def test_req_one_asks_the_chain_for_no_more_than_it_needs(export, monkeypatch):
    asked: list[int] = []
    status = export.node.block_status

    def counted(offset: int, length: int):
        asked.append(length)
        return status(offset, length)

    monkeypatch.setattr(export.node, "block_status", counted)
    export.status(BASE_ALLOCATION, 0, SIZE, one=True)  # a 63 MiB hole first
    assert sum(asked) <= 2 * STATUS_WINDOW < SIZE
    asked.clear()
    export.status(BASE_ALLOCATION, STATUS_WINDOW + 4 * MiB, SIZE - STATUS_WINDOW - 4 * MiB,
                  one=True)  # a run longer than a window: asked until it ends
    assert sum(asked) <= 2 * STATUS_WINDOW < SIZE - STATUS_WINDOW - 4 * MiB

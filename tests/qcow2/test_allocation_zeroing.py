"""New cluster runs of at least ZERO_BEFORE_WRITE_MIN are zeroed by the
filesystem just before their data is written, exactly over the range
written; smaller runs are not (the call would cost more than it saves),
nor anything in an external data file, whose bytes there may be a raw
image's."""

from __future__ import annotations

import pytest
from corefmt_qcow2.image import ZERO_BEFORE_WRITE_MIN

import corefmt
from corefmt.storage.file import FileStorage

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def recorded(monkeypatch):
    """(path, offset, length) of every zero_before_write and data write."""
    zeroed: list[tuple[str, int, int]] = []
    written: list[tuple[str, int, int]] = []
    real_zero, real_write = FileStorage.zero_before_write, FileStorage._write

    def zero(self, offset, length):
        zeroed.append((self.path, offset, length))
        return real_zero(self, offset, length)

    def write(self, offset, data):
        written.append((self.path, offset, len(data)))
        return real_write(self, offset, data)

    monkeypatch.setattr(FileStorage, "zero_before_write", zero)
    monkeypatch.setattr(FileStorage, "_write", write)
    return zeroed, written


@pytest.mark.parametrize("options", [{}, {"extended_l2": True}], ids=["plain", "extended L2"])
def test_a_new_run_is_zeroed_exactly_where_its_data_goes(tmp_path, recorded, options):
    path = str(tmp_path / "a.qcow2")
    corefmt.create(path, "qcow2", 16 * MiB, options=options)
    zeroed, written = recorded
    payload = bytes(range(256)) * (1 * MiB // 256)
    with corefmt.open(path, "qcow2") as node:
        zeroed.clear()
        written.clear()
        node.write(2 * MiB + 12 * KiB, payload)  # partial first and last clusters
        runs = list(zeroed)
    assert runs, "no new cluster run was zeroed"
    for run in runs:
        assert run in written, run  # the same range, then written in full
    with corefmt.open(path, "qcow2", read_only=True) as node:
        assert node.read(2 * MiB + 12 * KiB, len(payload)) == payload
        assert node.read(2 * MiB, 12 * KiB) == bytes(12 * KiB)


def test_an_external_data_file_is_not_zeroed(tmp_path, recorded):
    path, data = str(tmp_path / "d.qcow2"), str(tmp_path / "d.raw")
    corefmt.create(path, "qcow2", 16 * MiB, options={"data_file": data})
    zeroed, _ = recorded
    with corefmt.open(path, "qcow2") as node:
        node.write(MiB, b"\x07" * 256 * KiB)
    assert zeroed == []


def test_a_run_shorter_than_the_minimum_is_not_zeroed(tmp_path, recorded):
    path = str(tmp_path / "s.qcow2")
    corefmt.create(path, "qcow2", 16 * MiB, options={"cluster_size": 4096})
    zeroed, _ = recorded
    with corefmt.open(path, "qcow2") as node:
        zeroed.clear()
        node.write(MiB, b"\x05" * 4096)  # one new 4 KiB cluster
        node.write(4 * MiB, b"\x06" * ZERO_BEFORE_WRITE_MIN)  # a run at the minimum
    assert [length for _path, _offset, length in zeroed] == [ZERO_BEFORE_WRITE_MIN]

"""convert's cache modes decide whether the target is ever flushed: unsafe
never (as qemu-img's default: its close does not flush either), the others
before convert returns."""

from __future__ import annotations

import os

import pytest

import corefmt

MiB = 1024 * 1024


@pytest.mark.parametrize(("cache", "flushed"), [("unsafe", False), ("writeback", True)])
def test_the_target_is_flushed_only_when_the_cache_mode_says(tmp_path, monkeypatch, cache,
                                                             flushed):
    source = str(tmp_path / "a.raw")
    corefmt.create(source, "raw", MiB)
    with corefmt.open(source, "raw") as disk:
        disk.write(0, b"x" * 65536)
    target = str(tmp_path / "b.raw")
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    corefmt.convert(source, target, source_format="raw", target_format="raw", cache=cache)
    assert bool(synced) is flushed
    assert corefmt.compare(source, target).identical


def test_cache_no_flush_makes_flush_and_close_do_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "c.raw")
    corefmt.create(path, "raw", MiB)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    with corefmt.open({"driver": "raw", "file": path, "cache": {"no-flush": True}}) as disk:
        disk.write(0, b"y" * 512)
        disk.flush()
    assert synced == []
    with corefmt.open(path, "raw") as disk:
        disk.write(0, b"z" * 512)
        disk.flush()
    assert synced


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_cache_no_flush_reaches_the_formats_own_ordering_flushes(tmp_path, monkeypatch, fmt):
    """As in qemu, the file child inherits cache.no-flush: the format's
    internal flushes (qcow2's refcounts before L2, FVD's journal) do nothing
    either, so allocating writes over new tables make no fdatasync."""
    path = str(tmp_path / f"d.{fmt}")
    corefmt.create(path, fmt, 64 * MiB)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    with corefmt.open({"driver": fmt, "file": path, "cache": {"no-flush": True}}) as disk:
        for offset in range(0, 64 * MiB, 4 * MiB):
            disk.write(offset, b"w" * 4096)
            disk.flush()
    assert synced == []
    with corefmt.open(path, fmt) as disk:
        assert disk.read(60 * MiB, 4096) == b"w" * 4096
        disk.write(61 * MiB, b"v" * 4096)
        disk.flush()
    assert synced


def test_unsafe_convert_to_qcow2_flushes_no_more_than_creating_it(tmp_path, monkeypatch):
    source = str(tmp_path / "e.raw")
    corefmt.create(source, "raw", 16 * MiB)
    with corefmt.open(source, "raw") as disk:
        for offset in range(0, 16 * MiB, MiB):
            disk.write(offset, b"s" * 65536)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    corefmt.create(str(tmp_path / "probe.qcow2"), "qcow2", 16 * MiB)
    creating = len(synced)
    synced.clear()
    target = str(tmp_path / "e.qcow2")
    corefmt.convert(source, target, source_format="raw", target_format="qcow2", cache="unsafe")
    assert len(synced) <= creating
    assert corefmt.compare(source, target).identical


def test_a_backings_no_flush_does_not_reach_a_reopen_of_the_top(tmp_path, monkeypatch):
    """cache.no-flush given for the backing node only: the top, reopened
    read-write later (as commit and rebase do), still flushes for real."""
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")
    corefmt.create(base, "raw", MiB)
    corefmt.create(top, "qcow2", MiB, backing=base, backing_format="raw")
    spec = {"driver": "qcow2", "file": top,
            "backing": {"driver": "raw", "file": base, "cache": {"no-flush": True}}}
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    with corefmt.open(spec, read_only=True) as node:
        node.reopen(read_only=False)
        node.write(0, b"t" * 65536)
        node.flush()
    assert synced

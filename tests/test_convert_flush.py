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

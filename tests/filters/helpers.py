"""Helpers of the filter tests: raw images on disk and specs over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import corefmt

KiB = 1024
IMAGE_SIZE = 64 * KiB


def make_raw(path: Path, size: int = IMAGE_SIZE, data: bytes = b"", at: int = 0) -> str:
    """A raw image file, optionally with ``data`` at ``at``; its absolute path."""
    corefmt.create(str(path), "raw", size)
    if data:
        with corefmt.open(str(path), "raw") as disk:
            disk.write(at, data)
    return str(path.resolve())


def raw_spec(filename: str, **file_options: Any) -> dict[str, Any]:
    """``{"driver": "raw", "file": {...}}`` over a plain file."""
    return {"driver": "raw", "file": {"driver": "file", "filename": filename, **file_options}}


def blkdebug_spec(filename: str, rules: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """raw over blkdebug over a file: the shape qemu takes."""
    return {"driver": "raw",
            "file": {"driver": "blkdebug", "inject-error": rules, **options,
                     "image": {"driver": "file", "filename": filename}}}


class FakeClock:
    """A clock that moves only when slept on (or told to): no real waiting."""

    def __init__(self, start: float = 0.0, step: float = 0.0):
        self.now = start
        #: Added on every reading: a fixed duration for whatever is timed.
        self.step = step
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @property
    def slept(self) -> float:
        return sum(self.sleeps)

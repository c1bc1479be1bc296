"""Fixtures of the locking tests: the test registry, a 64 MiB qcow2 image
(qemu-io opens it as qcow2 or raw, corefmt as lockmeta or raw), and one
corefmt holder process for a whole module."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corefmt.registry import Registry
from tests.locking.helpers import QEMU_IMG, QEMU_IO, CorefmtHolder
from tests.locking.holder import lock_registry

IMAGE_SIZE = 64 * 1024 * 1024


@pytest.fixture(autouse=True)
def _skip_interop_without_qemu(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("interop") and not (QEMU_IMG and QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed (Debian: apt-get install qemu-utils)")


@pytest.fixture(scope="session")
def registry() -> Registry:
    return lock_registry()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB file: a qcow2 image if qemu-img is there, else zeros."""
    path = tmp_path / "disk.qcow2"
    if QEMU_IMG:
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), str(IMAGE_SIZE)],
                       check=True)
    else:
        with open(path, "wb") as file:
            file.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def corefmt_holder() -> Iterator[CorefmtHolder]:
    holder = CorefmtHolder()
    try:
        yield holder
    finally:
        holder.stop()

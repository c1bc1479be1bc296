"""Runners for the probing tests: corefmt, qemu-img and qemu-io as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.probing.images import QEMU_IMG, QEMU_IO, TIMEOUT, environment

Runner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bytecode for the corefmt subprocesses, compiled once for the session."""
    return tmp_path_factory.mktemp("probing-pycache")


def _runner(program: list[str], default_cwd: Path, extra_env: dict[str, str]) -> Runner:
    def run(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*program, *map(str, args)], cwd=cwd or default_cwd,
                              capture_output=True, text=True,
                              env={**environment(), **extra_env}, timeout=TIMEOUT, check=False)

    return run


@pytest.fixture
def cli(tmp_path: Path, pycache: Path) -> Runner:
    """cli(*args, cwd=tmp_path): `python -m corefmt.cli.main *args`."""
    return _runner([sys.executable, "-m", "corefmt.cli.main"], tmp_path,
                   {"PYTHONPYCACHEPREFIX": str(pycache)})


@pytest.fixture
def qemu_io(tmp_path: Path) -> Runner:
    if not (QEMU_IMG and QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed (Debian: apt-get install qemu-utils)")
    return _runner([QEMU_IO], tmp_path, {})


@pytest.fixture
def qemu_img(tmp_path: Path) -> Runner:
    if not QEMU_IMG:
        pytest.skip("qemu-img not installed (Debian: apt-get install qemu-utils)")
    return _runner([QEMU_IMG], tmp_path, {})

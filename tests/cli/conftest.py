"""Fixtures for the command-line tests: run corefmt (and qemu-img/qemu-io) as a
user does, in a subprocess, from a fresh temporary directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from corefmt_cli_helpers import QEMU_IMG, QEMU_IO, Runner, runner, use_pycache


@pytest.fixture(scope="session", autouse=True)
def _subprocess_bytecode(request: pytest.FixtureRequest,
                         tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = getattr(request.config, "cache", None)
    use_pycache(cache.mkdir("corefmt-cli-pycache") if cache is not None
                else tmp_path_factory.mktemp("pycache"))


@pytest.fixture(autouse=True)
def _skip_interop_without_qemu(request: pytest.FixtureRequest) -> None:
    """Interop tests need qemu-img and qemu-io; CI installs them (qemu-utils)."""
    if request.node.get_closest_marker("interop") and not (QEMU_IMG and QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed (Debian: apt-get install qemu-utils)")


@pytest.fixture
def corefmt(tmp_path: Path) -> Runner:
    """corefmt(*args, cwd=tmp_path): `python -m corefmt.cli.main *args`, as a user runs it."""
    return runner([sys.executable, "-m", "corefmt.cli.main"], tmp_path)


@pytest.fixture
def qemu_img(tmp_path: Path) -> Runner:
    return runner([QEMU_IMG or "qemu-img"], tmp_path)


@pytest.fixture
def qemu_io(tmp_path: Path) -> Runner:
    return runner([QEMU_IO or "qemu-io"], tmp_path)

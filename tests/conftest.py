"""Shared fixtures: the outside test plugin, installed the way pip would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corefmt import plugins

OUTSIDE_PLUGIN_SOURCE = Path(__file__).parent / "outside_plugin"
ENTRY_POINTS = "[corefmt]\nblockmap = corefmt_blockmap.plugin\n"
METADATA = "Metadata-Version: 2.1\nName: corefmt-blockmap-test\nVersion: 0.1\n"


def install_distribution(site: Path, package_dir: Path, dist_info: str, metadata: str,
                         entry_points: str) -> Path:
    """Lay out a test plugin in ``site`` as an installed distribution
    (package + .dist-info with entry_points.txt), as pip would."""
    shutil.copytree(package_dir, site / package_dir.name,
                    ignore=shutil.ignore_patterns("__pycache__"))
    info = site / dist_info
    info.mkdir()
    (info / "METADATA").write_text(metadata)
    (info / "entry_points.txt").write_text(entry_points)
    return site


def install_outside_plugin(site: Path) -> Path:
    """The blockmap test plugin, installed in ``site``."""
    return install_distribution(site, OUTSIDE_PLUGIN_SOURCE / "corefmt_blockmap",
                                "corefmt_blockmap_test-0.1.dist-info", METADATA, ENTRY_POINTS)


@pytest.fixture(scope="session")
def outside_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_outside_plugin(tmp_path_factory.mktemp("site"))


@pytest.fixture
def blockmap(outside_site: Path, monkeypatch: pytest.MonkeyPatch):
    """The blockmap format, found through its entry point on sys.path."""
    monkeypatch.syspath_prepend(str(outside_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(outside_site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    plugins.reset()
    yield plugins.registry().format("blockmap")
    for name in [m for m in sys.modules if m.startswith("corefmt_blockmap")]:
        del sys.modules[name]
    monkeypatch.undo()
    plugins.reset()


def run_cli(*args: str, check: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the corefmt CLI as a user would."""
    result = subprocess.run([sys.executable, "-m", "corefmt.cli.main", *args],
                            capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"corefmt {' '.join(args)} failed: {result.stderr}")
    return result


def fill(length: int, seed: int) -> bytes:
    """Deterministic, non-repeating test data."""
    import random

    return random.Random(seed).randbytes(length)

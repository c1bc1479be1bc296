"""Fixtures of the tablemap tests: the outside tablemap plugin installed the
way pip would (a package plus a .dist-info with its entry point), and its
deliberately broken variants registered as a plugin."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corefmt import plugins
from tests.conftest import install_distribution

SOURCE = Path(__file__).parent.parent / "outside_tablemap"
PACKAGE = "corefmt_tablemap"
ENTRY_POINTS = f"[corefmt]\ntablemap = {PACKAGE}.plugin\n"
METADATA = "Metadata-Version: 2.1\nName: corefmt-tablemap-test\nVersion: 0.1\n"
BROKEN_MODULE = "tests.tablemap.broken_tablemap"


def install_tablemap(site: Path) -> Path:
    return install_distribution(site, SOURCE / PACKAGE, "corefmt_tablemap_test-0.1.dist-info",
                                METADATA, ENTRY_POINTS)


@pytest.fixture(scope="session")
def tablemap_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_tablemap(tmp_path_factory.mktemp("tablemap-site"))


def _forget_modules() -> None:
    for name in [m for m in sys.modules if m.startswith(PACKAGE) or m == BROKEN_MODULE]:
        del sys.modules[name]


@pytest.fixture
def tablemap(tablemap_site: Path):
    """The tablemap format, found through its entry point on sys.path (its own
    MonkeyPatch, so it composes with the ``blockmap`` fixture in any order)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tablemap_site))
        patch.setenv("PYTHONPATH", os.pathsep.join(
            [str(tablemap_site), *filter(None, [os.environ.get("PYTHONPATH")])]))
        plugins.reset()
        yield plugins.registry().format("tablemap")
        _forget_modules()
    plugins.reset()


@pytest.fixture
def broken_tablemap(tablemap) -> Iterator[object]:
    """The broken variants (``tablemap-nodirty``, ``-l1first``, ``-nobarrier``)."""
    module = importlib.import_module(BROKEN_MODULE)
    plugins.register_plugin(module)
    yield module
    plugins.unregister_plugin(module)

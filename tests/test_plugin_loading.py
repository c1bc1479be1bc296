"""Plugin loading: one broken plugin is reported and skipped, the others work.

Each fake plugin is laid out as an installed distribution (package +
NAME.dist-info with METADATA and entry_points.txt) on a sys.path entry, as
tests/conftest.py does for the blockmap plugin; subprocesses get it through
PYTHONPATH.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import corefmt
from corefmt import PluginWarning, hookimpl, plugins
from corefmt.registry import Registry
from tests.conftest import OUTSIDE_PLUGIN_SOURCE, run_cli

RAW_VERSION = metadata.version("corefmt-raw")
CORE_VERSION = metadata.version("corefmt")
RAW_ORIGIN = f"plugin corefmt-raw {RAW_VERSION} (entry point raw = corefmt_raw.plugin)"

#: A module that fails to import.
BROKEN_IMPORT = """
from corefmt import hookimpl
import corefmt_no_such_module  # noqa: F401

@hookimpl
def corefmt_register(registry):
    raise AssertionError("never reached")
"""

#: Registers one format, then fails: the format must not stay.
HALFWAY = """
from corefmt import hookimpl
from corefmt_raw.driver import RawDriver

class HalfwayDriver(RawDriver):
    name = "halfway"

@hookimpl
def corefmt_register(registry):
    registry.add_format(HalfwayDriver())
    raise RuntimeError("disk on fire\\nsecond line")
"""

#: Claims raw's format name and the core's 'file' storage, and one name of its own.
TWIN = """
from corefmt import hookimpl
from corefmt.storage.file import FileStorageDriver
from corefmt_raw.driver import RawDriver

class TwinRawDriver(RawDriver):
    pass  # name = "raw"

class TwinDriver(RawDriver):
    name = "twin"

@hookimpl
def corefmt_register(registry):
    registry.add_format(TwinRawDriver())
    registry.add_storage(FileStorageDriver())
    registry.add_format(TwinDriver())
"""


class FakeSite:
    """A sys.path entry holding fake installed distributions."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.packages: list[str] = []
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def add(self, dist: str, package: str, source: str, entry_point: str = "main",
            version: str = "0.1") -> str:
        """Install ``package.plugin`` (``source``) as distribution ``dist``;
        the entry point's description as warnings show it."""
        (self.root / package).mkdir()
        (self.root / package / "__init__.py").write_text("")
        (self.root / package / "plugin.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(
            f"[corefmt]\n{entry_point} = {package}.plugin\n")
        self.packages.append(package)
        importlib.invalidate_caches()
        plugins.reset()
        return f"plugin {dist} {version} (entry point {entry_point} = {package}.plugin)"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeSite(tmp_path / "site", monkeypatch)
    fake.root.mkdir()
    plugins.reset()
    yield fake
    for name in [m for m in sys.modules if m.split(".")[0] in fake.packages]:
        del sys.modules[name]
    monkeypatch.undo()
    importlib.invalidate_caches()
    plugins.reset()


def plugin_warnings(recorded: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in recorded if issubclass(w.category, PluginWarning)]


def build_registry() -> tuple[Registry, list[str]]:
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        registry = plugins.registry()
    return registry, plugin_warnings(recorded)


def assert_raw_works(tmp_path: Path) -> None:
    from corefmt_raw.driver import RawDriver

    assert type(plugins.registry().format("raw")) is RawDriver
    path = str(tmp_path / "still.raw")
    corefmt.create(path, "raw", 65536)
    with corefmt.open(path, "raw") as disk:
        disk.write(512, b"still works")
        assert disk.read(512, 11) == b"still works"


def cli_formats(*expected_in_warning: str) -> subprocess.CompletedProcess:
    """``corefmt formats`` succeeds, lists raw, and warns once, without a traceback."""
    result = run_cli("formats")
    assert result.returncode == 0, result.stderr
    assert "raw" in result.stdout.splitlines()[0].split()
    assert "Traceback" not in result.stderr
    assert result.stderr.count("PluginWarning") + result.stderr.count("warning:") == 1, \
        result.stderr
    for text in expected_in_warning:
        assert result.stderr.count(text) == 1, result.stderr
    return result


# -- a plugin that fails to import ------------------------------------------------------
def test_plugin_failing_to_import_is_reported_and_skipped(site, tmp_path):
    origin = site.add("corefmt-broken-import-test", "corefmt_broken_import", BROKEN_IMPORT,
                      entry_point="broken")
    registry, messages = build_registry()
    assert messages == [f"{origin} could not be imported, skipped: "
                        "ModuleNotFoundError: No module named 'corefmt_no_such_module'"]
    assert {"raw", "copy-on-read"} <= set(registry.formats) | set(registry.filters)
    assert {"file", "memory"} <= set(registry.storages)
    assert_raw_works(tmp_path)


def test_entry_point_naming_a_missing_module(site, tmp_path):
    origin = site.add("corefmt-missing-test", "corefmt_missing", "", entry_point="gone")
    (site.root / "corefmt_missing" / "plugin.py").unlink()
    importlib.invalidate_caches()
    _, messages = build_registry()
    assert messages == [f"{origin} could not be imported, skipped: ModuleNotFoundError: "
                        "No module named 'corefmt_missing.plugin'"]
    assert_raw_works(tmp_path)


def test_cli_with_a_plugin_failing_to_import(site):
    site.add("corefmt-broken-import-test", "corefmt_broken_import", BROKEN_IMPORT,
             entry_point="broken")
    cli_formats("corefmt-broken-import-test 0.1", "broken = corefmt_broken_import.plugin",
                "No module named 'corefmt_no_such_module'")


# -- a plugin whose registration raises -------------------------------------------------
def test_registration_that_raises_is_rolled_back(site, tmp_path):
    origin = site.add("corefmt-halfway-test", "corefmt_halfway", HALFWAY, entry_point="halfway")
    registry, messages = build_registry()
    assert messages == [f"{origin} failed to register its drivers, skipped: "
                        "RuntimeError: disk on fire second line"]
    assert "halfway" not in registry.formats  # registered before the error: rolled back
    assert not plugins.plugin_manager().has_plugin("halfway")  # its other hooks are off too
    assert_raw_works(tmp_path)


def test_cli_with_a_registration_that_raises(site):
    site.add("corefmt-halfway-test", "corefmt_halfway", HALFWAY, entry_point="halfway")
    result = cli_formats("corefmt-halfway-test 0.1", "halfway = corefmt_halfway.plugin",
                         "RuntimeError: disk on fire second line")
    assert "halfway" not in result.stdout


# -- a plugin registering names that are taken ------------------------------------------
def test_duplicate_names_are_skipped_and_the_first_plugin_keeps_them(site, tmp_path):
    # The twin comes first on sys.path: the name still stays with raw, whose
    # distribution is registered first whatever the order of sys.path.
    origin = site.add("corefmt-twin-raw-test", "corefmt_twin_raw", TWIN, entry_point="twin")
    registry, messages = build_registry()
    core_storage = f"plugin corefmt {CORE_VERSION} (entry point storage = corefmt.storage.plugin)"
    assert messages == [
        f"format 'raw' of {origin} is already registered by {RAW_ORIGIN}; skipped",
        f"storage 'file' of {origin} is already registered by {core_storage}; skipped",
    ]
    assert "twin" in registry.formats  # the plugin's own name is kept
    assert_raw_works(tmp_path)


def test_cli_with_a_duplicate_name(site):
    site.add("corefmt-twin-raw-test", "corefmt_twin_raw", TWIN, entry_point="twin")
    result = run_cli("formats")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert {"raw", "twin"} <= set(result.stdout.splitlines()[0].split())
    assert result.stderr.count(f"format 'raw' of plugin corefmt-twin-raw-test 0.1 (entry "
                               f"point twin = corefmt_twin_raw.plugin) is already registered "
                               f"by {RAW_ORIGIN}; skipped") == 1, result.stderr


def test_a_format_name_taken_by_a_filter(tmp_path):
    from corefmt_raw.driver import RawDriver

    class Shadow(RawDriver):
        name = "copy-on-read"

    class ShadowPlugin:
        @hookimpl
        def corefmt_register(self, registry):
            registry.add_format(Shadow())

    plugin = ShadowPlugin()
    plugins.register_plugin(plugin)
    try:
        registry, messages = build_registry()
        assert messages == [
            "format 'copy-on-read' of plugin tests.test_plugin_loading.test_a_format_name_taken_"
            "by_a_filter.<locals>.ShadowPlugin (registered by hand) is already "
            f"registered by plugin corefmt {CORE_VERSION} (entry point filters = "
            "corefmt.filters.plugin); skipped"]
        assert "copy-on-read" not in registry.formats
    finally:
        plugins.unregister_plugin(plugin)


# -- plugins added by hand --------------------------------------------------------------
def test_hand_registered_plugins_are_isolated_the_same_way(tmp_path):
    from corefmt_raw.driver import RawDriver

    class Good(RawDriver):
        name = "by-hand"

    class Failing:
        @hookimpl
        def corefmt_register(self, registry):
            registry.add_format(type("Early", (RawDriver,), {"name": "early"})())
            plugins.registry()  # re-entering the loader is an error, not a recursion

    class Working:
        @hookimpl
        def corefmt_register(self, registry):
            registry.add_format(Good())

    failing, working = Failing(), Working()
    plugins.register_plugin(failing)
    plugins.register_plugin(working)
    try:
        registry, messages = build_registry()
        assert len(messages) == 1
        assert messages[0].startswith(
            "plugin tests.test_plugin_loading.test_hand_registered_plugins_are_isolated_the_"
            "same_way.<locals>.Failing (registered by hand) failed to register its drivers, "
            "skipped: CorefmtError: plugins are still being loaded")
        assert "early" not in registry.formats and "by-hand" in registry.formats
        assert_raw_works(tmp_path)
    finally:
        plugins.unregister_plugin(failing)
        plugins.unregister_plugin(working)
    assert "by-hand" not in plugins.registry().formats


def test_reset_rescans_entry_points(site):
    assert "halfway" not in plugins.registry().formats
    site.add("corefmt-fine-test", "corefmt_fine", HALFWAY.replace("raise RuntimeError", "#"),
             entry_point="fine")
    assert "halfway" in plugins.registry().formats  # add() reset the plugins


# -- the CLI shows a plugin warning as one line -----------------------------------------
def test_cli_prints_the_warning_as_one_line(site):
    origin = site.add("corefmt-broken-import-test", "corefmt_broken_import", BROKEN_IMPORT,
                      entry_point="broken")
    result = run_cli("formats")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"corefmt: warning: {origin} could not be imported, skipped: "
        "ModuleNotFoundError: No module named 'corefmt_no_such_module'"]


# -- the public API ---------------------------------------------------------------------
def test_everything_in_all_imports():
    assert len(set(corefmt.__all__)) == len(corefmt.__all__)
    for name in corefmt.__all__:
        namespace: dict = {}
        exec(f"from corefmt import {name}", namespace)
        assert namespace[name] is getattr(corefmt, name)
    star: dict = {}
    exec("from corefmt import *", star)
    assert set(corefmt.__all__) <= set(star)
    assert issubclass(corefmt.PluginWarning, UserWarning)


def test_import_stays_cheap():
    """Plugins are found on first use, not when corefmt is imported."""
    code = "import sys, corefmt; print('importlib.metadata' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# -- the outside plugin, installed by pip -----------------------------------------------
def _can_build_without_isolation() -> bool:
    """setuptools >= 70.1 builds wheels on its own; older ones need ``wheel``."""
    try:
        major, minor = (int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    if (major, minor) >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_fast_fixture_matches_the_pyproject():
    """tests/conftest.py lays out by hand what pip installs from the pyproject."""
    import tomllib

    from tests.conftest import ENTRY_POINTS, METADATA

    project = tomllib.loads((OUTSIDE_PLUGIN_SOURCE / "pyproject.toml").read_text())["project"]
    assert f"Name: {project['name']}\nVersion: {project['version']}\n" in METADATA
    points = "".join(f"{name} = {value}\n"
                     for name, value in project["entry-points"]["corefmt"].items())
    assert f"[corefmt]\n{points}" == ENTRY_POINTS
    assert project["dependencies"] == ["corefmt"]


def test_outside_plugin_installs_with_pip(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(OUTSIDE_PLUGIN_SOURCE, source,  # pip builds in the source tree
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "target"
    # Offline when this environment can build the wheel; else pip fetches setuptools.
    isolation = (["--no-build-isolation", "--no-index"] if _can_build_without_isolation()
                 else [])
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
         "--target", str(target), str(source)],
        capture_output=True, text=True, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    assert install.returncode == 0, install.stdout + install.stderr
    assert (target / "corefmt_blockmap" / "plugin.py").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = run_cli("formats", env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "blockmap" in result.stdout.splitlines()[0].split()
    metadata_dir = next(target.glob("corefmt_blockmap_test-0.1*.dist-info"))
    assert "blockmap = corefmt_blockmap.plugin" in (metadata_dir / "entry_points.txt").read_text()

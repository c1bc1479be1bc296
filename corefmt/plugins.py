"""The plugin manager: finds plugins through the ``corefmt`` entry points.

Loading never lets one plugin break the others. Each entry point of the
``corefmt`` group is imported on its own, and each plugin's
``corefmt_register`` runs on its own against a staging copy of the registry
that is committed only when the hook returns. A plugin that fails to import,
or whose registration raises, is reported as a :class:`PluginWarning` and
skipped, together with everything it registered; its other hooks are not
called either. A driver whose name (format or filter, which share qemu's
``driver`` namespace, or storage) is already taken is reported naming both
plugins and skipped; the plugin that had the name keeps it.

Plugins are registered in a fixed order, independent of the order in which
the file system lists ``site-packages``: the core distribution's own entry
points first, then the other distributions by name (then entry point name),
then the plugins added with :func:`register_plugin`, in the order they were
added. ``tryfirst``/``trylast`` on a ``corefmt_register`` implementation move
it to the front or the back. When a distribution is found more than once on
``sys.path``, the first copy wins, as it does for imports.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from corefmt import hookspecs
from corefmt.errors import CorefmtError
from corefmt.registry import Registry

if TYPE_CHECKING:
    from importlib.metadata import Distribution, EntryPoint

#: The distribution whose entry points are registered before any other's.
CORE_DISTRIBUTION = "corefmt"

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None
_building = False
_extra_plugins: list[object] = []


class PluginWarning(UserWarning):
    """A plugin, or one of the names it registers, was skipped."""


class PluginOrigin:
    """Where a plugin comes from, as its warnings name it.

    The distribution's metadata is read only when a warning needs it."""

    def __init__(self, name: str, dist: Distribution | None = None,
                 entry_point: str | None = None) -> None:
        self.name = name  #: the plugin's name in the pluggy manager, or its label
        self.dist = dist
        self.entry_point = entry_point  #: ``name = value``

    @functools.cached_property
    def distribution(self) -> tuple[str, str | None] | None:
        """The distribution's name and version (None if unknown), None if by hand."""
        return None if self.dist is None else _describe(self.dist)

    def renamed(self, name: str) -> PluginOrigin:
        return PluginOrigin(name, self.dist, self.entry_point)

    def __str__(self) -> str:
        if self.distribution is None:
            return f"plugin {self.name} (registered by hand)"
        name, version = self.distribution
        return f"plugin {name}{f' {version}' if version else ''} (entry point {self.entry_point})"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=2)


# -- finding and importing entry points ----------------------------------------------
def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _describe(dist: Distribution) -> tuple[str, str | None]:
    """A distribution's name and version, as far as its metadata tells."""
    try:
        metadata = dist.metadata
        name, version = metadata["Name"], metadata["Version"]
    except Exception:
        name = version = None
    if not name:
        name = str(getattr(dist, "_path", None) or dist)
    return name, version or None


def _key(dist: Distribution) -> str:
    """The distribution's canonical name; from its folder's name where it can
    (no metadata to parse for the many distributions that are no plugin)."""
    name = getattr(dist, "_normalized_name", None) or _describe(dist)[0]
    return _canonical(name)


def _entry_points() -> list[tuple[EntryPoint, PluginOrigin]]:
    """The ``corefmt`` entry points of every distribution, in registration order."""
    from importlib import metadata

    found: list[tuple[tuple, EntryPoint, PluginOrigin]] = []
    seen: set[str] = set()
    for dist in metadata.distributions():
        try:
            key = _key(dist)
            if key in seen:
                continue  # shadowed by an earlier copy on sys.path
            seen.add(key)
            points = list(dist.entry_points.select(group=hookspecs.PROJECT_NAME))
        except Exception as error:
            name, version = _describe(dist)
            _warn(f"distribution {name}{f' {version}' if version else ''}: its entry points "
                  f"cannot be read, skipped: {_one_line(error)}")
            continue
        for point in points:
            origin = PluginOrigin(point.name, dist, f"{point.name} = {point.value}")
            found.append(((key != CORE_DISTRIBUTION, key, point.name), point, origin))
    found.sort(key=lambda item: item[0])
    return [(point, origin) for _, point, origin in found]


def _load_plugins(manager: pluggy.PluginManager) -> dict[str, PluginOrigin]:
    """Import and register every plugin that imports; the origin of each, by name."""
    origins: dict[str, PluginOrigin] = {}
    for point, origin in _entry_points():
        try:
            plugin = point.load()
        except Exception as error:
            _warn(f"{origin} could not be imported, skipped: {_one_line(error)}")
            continue
        name = point.name
        if manager.has_plugin(name):  # two distributions chose the same entry point name
            name = f"{_key(origin.dist)}:{point.name}" if origin.dist else point.name
        _register(manager, plugin, origin.renamed(name), origins)
    for plugin in _extra_plugins:
        if not manager.is_registered(plugin):
            label = (plugin.__name__ if isinstance(plugin, ModuleType)
                     else f"{type(plugin).__module__}.{type(plugin).__qualname__}")
            _register(manager, plugin, PluginOrigin(label), origins, by_hand=True)
    return origins


def _register(manager: pluggy.PluginManager, plugin: object, origin: PluginOrigin,
              origins: dict[str, PluginOrigin], by_hand: bool = False) -> None:
    try:
        name = manager.register(plugin, None if by_hand else origin.name)
    except Exception as error:
        _warn(f"{origin} could not be registered, skipped: {_one_line(error)}")
        return
    if name is not None:
        origins[name] = origin


# -- registration ---------------------------------------------------------------------
class _Staging(Registry):
    """What one plugin registers, kept apart until its hook returns."""

    def __init__(self, base: Registry, owners: dict[tuple[str, str], PluginOrigin],
                 origin: PluginOrigin) -> None:
        super().__init__()
        self._tables = [name for name, value in vars(base).items() if isinstance(value, dict)]
        for table in self._tables:
            setattr(self, table, dict(getattr(base, table)))
        self._owners = owners
        self._claimed: dict[tuple[str, str], PluginOrigin] = {}
        self._origin = origin
        self.duplicates: list[str] = []

    def _claim(self, kind: str, driver: object) -> bool:
        name = getattr(driver, "name", None)
        if not name:
            return True  # the registry's own check reports it
        key = ("storage" if kind == "storage" else "driver", name)
        owner = self._owners.get(key) or self._claimed.get(key)
        if owner is None:
            self._claimed[key] = self._origin
            return True
        self.duplicates.append(
            f"{kind} '{name}' of {self._origin} is already registered by {owner}; skipped")
        return False

    def add_format(self, driver: Any) -> None:
        if self._claim("format", driver):
            super().add_format(driver)

    def add_filter(self, driver: Any) -> None:
        if self._claim("filter", driver):
            super().add_filter(driver)

    def add_storage(self, driver: Any) -> None:
        if self._claim("storage", driver):
            super().add_storage(driver)

    def commit(self, base: Registry) -> None:
        for table in self._tables:
            target = getattr(base, table)
            target.clear()
            target.update(getattr(self, table))
        self._owners.update(self._claimed)


def _build_registry(manager: pluggy.PluginManager, origins: dict[str, PluginOrigin]) -> Registry:
    built = Registry()
    owners: dict[tuple[str, str], PluginOrigin] = {}
    order = {name: index for index, name in enumerate(origins)}
    impls = sorted(manager.hook.corefmt_register.get_hookimpls(),
                   key=lambda impl: (0 if impl.tryfirst else 2 if impl.trylast else 1,
                                     order.get(impl.plugin_name, len(order))))
    for impl in impls:
        origin = origins.get(impl.plugin_name) or PluginOrigin(impl.plugin_name)
        if impl.hookwrapper or impl.wrapper:
            _warn(f"{origin}: corefmt_register cannot be a hook wrapper, skipped")
            continue
        staging = _Staging(built, owners, origin)
        try:
            impl.function(*[{"registry": staging}[arg] for arg in impl.argnames])
        except Exception as error:
            _warn(f"{origin} failed to register its drivers, skipped: {_one_line(error)}")
            if manager.is_registered(impl.plugin):
                manager.unregister(impl.plugin)  # none of its other hooks run either
            continue
        staging.commit(built)
        for message in staging.duplicates:
            _warn(message)
    return built


# -- the process-wide state -----------------------------------------------------------
def _load() -> None:
    global _manager, _registry, _building
    if _building:
        raise CorefmtError("plugins are still being loaded: corefmt_register must use "
                           "the registry it is given")
    _building = True
    try:
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        origins = _load_plugins(manager)
        registry = _build_registry(manager, origins)
        _manager, _registry = manager, registry
    finally:
        _building = False


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager: every plugin that imported and registered."""
    with _lock:
        if _manager is None:
            _load()
        assert _manager is not None
        return _manager


def registry() -> Registry:
    """Drivers from every plugin, built once."""
    with _lock:
        if _registry is None:
            _load()
        assert _registry is not None
        return _registry


def register_plugin(plugin: ModuleType | object) -> None:
    """Add a plugin by hand (embedding, tests); entry points need no call."""
    with _lock:
        _extra_plugins.append(plugin)
        reset()


def unregister_plugin(plugin: ModuleType | object) -> None:
    with _lock:
        if plugin in _extra_plugins:
            _extra_plugins.remove(plugin)
        reset()


def reset() -> None:
    """Forget loaded plugins so the next use rescans entry points."""
    global _manager, _registry
    with _lock:
        _manager = None
        _registry = None

"""The plugin manager: finds plugins through the ``corefmt`` entry points."""

from __future__ import annotations

import threading
from types import ModuleType

import pluggy

from corefmt import hookspecs
from corefmt.registry import Registry

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None
_extra_plugins: list[object] = []


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, loading entry points on first use."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            manager.add_hookspecs(hookspecs)
            manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
            for plugin in _extra_plugins:
                if not manager.is_registered(plugin):
                    manager.register(plugin)
            _manager = manager
        return _manager


def registry() -> Registry:
    """Drivers from every plugin, built once."""
    global _registry
    with _lock:
        if _registry is None:
            built = Registry()
            plugin_manager().hook.corefmt_register(registry=built)
            _registry = built
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

"""The plugin contract: every hook a corefmt plugin can implement.

A plugin is a module (found through the ``corefmt`` entry-point group)
whose functions are marked ``@corefmt.hookimpl``. Registration follows
tox 4's ``tox_register_tox_env(register)``: one hook receives the registry
and adds drivers to it. The other hooks carry cross-cutting behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode
    from corefmt.registry import Registry

PROJECT_NAME = "corefmt"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def corefmt_register(registry: Registry) -> None:
    """Add format drivers (``registry.add_format``) and storage drivers
    (``registry.add_storage``)."""


@hookspec(firstresult=True)
def corefmt_copy_on_read(node: BlockNode, offset: int, length: int) -> bool | None:
    """Decide whether data read from below ``node`` is copied into it.

    Return True or False to decide, None to leave it to the next plugin and
    finally to the node's own ``copy_on_read`` setting.
    """


@hookspec
def corefmt_observe_request(node: BlockNode, operation: str, offset: int, length: int) -> None:
    """Called before each request a node runs (read, write, write_zeroes,
    discard, flush, copy_on_read). For logging, tracing and statistics;
    must not change the request."""

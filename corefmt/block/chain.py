"""Opening an image with its whole backing chain.

Backing paths are resolved relative to the overlay; a recorded backing
format is used as it is (never probed away); only an unrecorded one is
probed. Loops and over-deep chains are refused; a missing backing file is
reported by name.
"""

from __future__ import annotations

import os

from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.driver import FormatDriver, ImageContext
from corefmt.errors import BackingChainError, CorefmtError
from corefmt.registry import PROBE_HEAD_SIZE, Registry
from corefmt.storage.base import Storage

#: qemu has no fixed limit; this keeps recursion-free code and memory bounded.
MAX_CHAIN_DEPTH = 1000


def probe_format(storage: Storage, registry: Registry) -> FormatDriver:
    head = storage.read(0, min(PROBE_HEAD_SIZE, max(storage.size(), 0)))
    return registry.probe(head, storage.path)


def printable(path: str) -> str:
    """A path read from an image, safe to put in a one-line message: control
    and other non-printable characters are shown as escapes."""
    if path.isprintable():
        return path
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in path)


def _identity(path: str) -> str:
    """What makes two references the same image (for loop detection)."""
    return os.path.realpath(path) if os.path.exists(path) else path


def open_node(path: str, format: str | None = None, *, read_only: bool = False,
              direct: bool = False, registry: Registry | None = None) -> BlockNode:
    """Open one image without its backing chain."""
    registry = registry or plugins.registry()
    storage_driver = registry.storage_for(path)
    storage = storage_driver.open(path, read_only=read_only, direct=direct)
    try:
        driver = registry.format(format) if format else probe_format(storage, registry)
        node = BlockNode(storage=storage, driver=driver, filename=path, read_only=read_only,
                         hooks=plugins.plugin_manager().hook)
        context = ImageContext(path=path, read_only=read_only, read_below=node.read_below)
        node.attach(driver.open(storage, context))
    except BaseException:
        storage.close()
        raise
    return node


def open_chain(path: str, format: str | None = None, *, read_only: bool = False,
               backing: bool = True, copy_on_read: bool = False, direct: bool = False,
               registry: Registry | None = None,
               max_depth: int = MAX_CHAIN_DEPTH) -> BlockNode:
    """Open ``path`` and (unless ``backing`` is False) every image below it."""
    registry = registry or plugins.registry()
    top = open_node(path, format, read_only=read_only, direct=direct, registry=registry)
    top.copy_on_read = copy_on_read
    if not backing:
        return top
    try:
        _open_backing_chain(top, registry, max_depth, direct)
    except BaseException:
        top.close()
        raise
    return top


def _open_backing_chain(top: BlockNode, registry: Registry, max_depth: int,
                        direct: bool) -> None:
    seen = {_identity(top.filename)}
    node = top
    depth = 0
    while node._image.backing is not None:
        reference = node._image.backing
        depth += 1
        if depth > max_depth:
            raise BackingChainError(
                f"{top.filename}: backing chain is deeper than {max_depth} images"
            )
        storage_driver = registry.storage_for(reference.path)
        target = storage_driver.resolve(reference.path, node.filename)
        if _identity(target) in seen:
            raise BackingChainError(
                f"{node.filename}: backing file '{printable(reference.path)}' "
                "makes a loop in the chain"
            )
        if not registry.storage_for(target).exists(target):
            raise BackingChainError(
                f"Could not open backing file '{printable(target)}' of '{node.filename}': "
                "No such file or directory"
            )
        try:
            below = open_node(target, reference.format, read_only=True, direct=direct,
                              registry=registry)
        except BackingChainError:
            raise
        except CorefmtError as error:
            raise BackingChainError(
                f"Could not open backing file '{printable(target)}' of '{node.filename}': {error}"
            ) from error
        seen.add(_identity(target))
        node.set_backing(below)
        node = below

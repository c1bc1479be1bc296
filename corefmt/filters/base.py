"""What a filter plugin implements: a FilterDriver and the Filter it opens.

A filter sits on one edge of the graph and sees every request on its way
to its child, without changing the data the child holds (QEMU's rule for
filters). Node filters (copy-on-read, throttle, verify, log) wrap a node;
storage filters (blkdebug) wrap the Storage an image lives on, so they
see the driver's own metadata I/O and the debug events it emits, as
QEMU's blkdebug sits between a format and its file.

Registration goes through the same hook as formats::

    @corefmt.hookimpl
    def corefmt_register(registry):
        registry.add_filter(MyFilterDriver())

Every Filter method defaults to passing the request through, so a filter
overrides only what it changes. Block status always passes through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from corefmt.flags import RequestFlags
from corefmt.options import NoOptions

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode
    from corefmt.storage.base import Storage

LAYER_NODE = "node"
LAYER_STORAGE = "storage"


@attrs.frozen
class FilterContext:
    """What a filter gets besides its child and options."""

    read_only: bool
    #: Further node children by role (blkverify's ``raw`` reference).
    children: Mapping[str, BlockNode] = attrs.field(factory=dict)


class Filter:
    """One open node filter; ``child`` is the node it passes requests to."""

    def __init__(self, child: BlockNode, options: Any, context: FilterContext):
        self.child = child
        self.options = options
        self.context = context

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        self.child.readinto(offset, buf, flags)

    def write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        self.child.write(offset, data, flags)

    def write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self.child.write_zeroes(offset, length, flags=flags)

    def discard(self, offset: int, length: int) -> None:
        self.child.discard(offset, length)

    def flush(self) -> None:
        self.child.flush()

    def truncate(self, size: int) -> None:
        self.child.truncate(size)

    def graph_complete(self) -> None:
        """The whole graph is open, backing chains included (they open after
        the nodes above them): start background work here."""

    def close(self) -> None:
        """Stop background work; the child is closed by the graph."""

    def info(self) -> dict[str, Any]:
        return {}


class FilterDriver:
    """Opens one kind of node filter."""

    name: str = ""
    layer: str = LAYER_NODE
    #: attrs class of the filter's options (``json:``/``--image-opts`` keys).
    open_options: type = NoOptions
    #: The key under which the filtered child is given (QEMU: ``file`` for
    #: copy-on-read and throttle, ``image`` for blkdebug, ``test`` for blkverify).
    child_key: str = "file"
    #: Further node children the filter needs, by key (blkverify: ``raw``).
    extra_children: tuple[str, ...] = ()
    #: The Filter class ``open`` makes (override ``open`` for anything else).
    filter_class: type[Filter] = Filter

    def open(self, child: BlockNode, options: Any, context: FilterContext) -> Filter:
        return self.filter_class(child, options, context)


class StorageFilterDriver:
    """Opens one kind of storage filter (it wraps the Storage below a format)."""

    name: str = ""
    layer: str = LAYER_STORAGE
    open_options: type = NoOptions
    child_key: str = "image"
    extra_children: tuple[str, ...] = ()

    def wrap(self, storage: Storage, options: Any) -> Storage:
        """A Storage that passes requests to ``storage`` (and may fail them)."""
        return storage

"""FilterNode: a node whose requests go through a Filter to one child.

A filter does not change guest-visible data, so block status passes
through unchanged, except that extents the child itself serves are
reported as served by this node: an overlay reading a range from this
layer then goes through the filter, not around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from corefmt.block.node import PREALLOCATION_OFF, ROLE_FILTERED, BlockNode
from corefmt.errors import NotSupported
from corefmt.extents import ChainExtent
from corefmt.flags import RequestFlags
from corefmt.limits import Limits

if TYPE_CHECKING:
    import pluggy

    from corefmt.driver import Image
    from corefmt.filters.base import Filter, FilterDriver
    from corefmt.storage.base import Storage


class FilterNode(BlockNode):
    def __init__(self, *, driver: FilterDriver, child: BlockNode, read_only: bool,
                 hooks: pluggy.HookRelay | None = None, node_name: str | None = None):
        super().__init__(filename=child.filename, read_only=read_only, hooks=hooks,
                         node_name=node_name)
        self.driver = driver
        self.filter: Filter | None = None
        self.add_child(ROLE_FILTERED, child)

    def attach(self, filter: Filter) -> None:
        self.filter = filter

    @property
    def child(self) -> BlockNode:
        return self.children[ROLE_FILTERED]  # type: ignore[return-value]

    @property
    def _filter(self) -> Filter:
        if self.filter is None or self._closed:
            from corefmt.errors import CorefmtError

            raise CorefmtError(f"{self.filename}: {self.driver_name} filter is closed")
        return self.filter

    # -- graph ------------------------------------------------------------------
    def layer(self) -> BlockNode:
        node: BlockNode = self
        while isinstance(node, FilterNode):  # stacked filters, without recursion
            node = node.child
        return node

    @property
    def driver_name(self) -> str:
        return self.driver.name

    @property
    def image(self) -> Image | None:
        return getattr(self.layer(), "image", None)

    @property
    def storage(self) -> Storage:
        return self.layer().storage  # type: ignore[attr-defined]

    @property
    def virtual_size(self) -> int:
        return self.child.virtual_size

    @property
    def limits(self) -> Limits:
        return self.child.limits

    def emit(self, event: str) -> None:
        self.layer().emit(event)  # type: ignore[attr-defined]

    # -- requests ------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[ChainExtent]:
        child = self.child
        return [attrs.evolve(extent, node=self) if extent.node is child else extent
                for extent in child.block_status(offset, length)]

    def readinto(self, offset: int, buf: bytearray | memoryview,
                 flags: RequestFlags | int = 0) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if view:  # filters see RequestFlags (the core passes plain ints)
            self._filter.readinto(offset, view, RequestFlags(flags))

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              flags: RequestFlags | int = 0) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if view:
            self._filter.write(offset, view, RequestFlags(flags))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     flags: RequestFlags | int = 0) -> None:
        self._check_writable()
        self._check_range(offset, length)
        flags = RequestFlags(flags)
        if unmap:
            flags |= RequestFlags.MAY_UNMAP
        if length:
            self._filter.write_zeroes(offset, length, flags)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._filter.discard(offset, length)

    def flush(self) -> None:
        if not self.read_only:
            self._filter.flush()

    def truncate(self, size: int, preallocation: str = PREALLOCATION_OFF) -> None:
        self._check_writable()
        if preallocation != PREALLOCATION_OFF:  # filters pass plain resizes only
            raise NotSupported(f"Unsupported preallocation mode: {preallocation}")
        self._filter.truncate(size)

    def info(self) -> dict[str, Any]:
        return self._filter.info()

    # -- lifetime -------------------------------------------------------------------
    def _release(self) -> None:
        if self.filter is not None:
            self.filter.close()

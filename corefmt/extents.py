"""Block status: what a range of an image holds, as extents."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode


@attrs.frozen(slots=True)
class Extent:
    """One run of bytes with the same status in one layer.

    ``allocated`` means this layer decides the content (it does not fall
    through to the backing image); ``zero`` means reads return zeros;
    ``data`` means the bytes are stored (they may still happen to be zero).
    ``host_offset`` is where the data lives, if that is a simple mapping,
    in the child named by ``host_child`` (``file``, or ``data_file`` for an
    image with an external data file). ``compressed`` data has no simple
    mapping (qemu-img map prints no offset for it).
    """

    offset: int
    length: int
    data: bool
    zero: bool
    allocated: bool = True
    host_offset: int | None = None
    compressed: bool = False
    host_child: str = "file"

    @property
    def end(self) -> int:
        return self.offset + self.length

    def same_kind(self, other: Extent) -> bool:
        """Whether two extents can be reported as one run."""
        if (self.data, self.zero, self.allocated, self.compressed, self.host_child) != (
                other.data, other.zero, other.allocated, other.compressed, other.host_child):
            return False
        if self.host_offset is None or other.host_offset is None:
            return self.host_offset is None and other.host_offset is None
        return self.host_offset + self.length == other.host_offset


@attrs.frozen(slots=True)
class ChainExtent:
    """Block status merged over a backing chain.

    ``node`` is the node whose request path reads the content: the layer
    that holds it, or the filter on the edge to it (None past the end of
    every layer: reads as zero); ``depth`` counts layers from the top
    (0 = top; filters are not layers).
    """

    offset: int
    length: int
    data: bool
    zero: bool
    depth: int
    node: BlockNode | None
    host_offset: int | None = None
    compressed: bool = False
    host_child: str = "file"

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def present(self) -> bool:
        return self.node is not None

    def same_kind(self, other: ChainExtent) -> bool:
        if (self.data, self.zero, self.depth, self.node, self.compressed, self.host_child) != (
            other.data, other.zero, other.depth, other.node, other.compressed, other.host_child
        ):
            return False
        if self.host_offset is None or other.host_offset is None:
            return self.host_offset is None and other.host_offset is None
        return self.host_offset + self.length == other.host_offset

    def clip(self, start: int, end: int) -> ChainExtent:
        """The part of this extent inside [start, end) (itself if all of it:
        cached status is looked up often, and a copy costs a few µs)."""
        if start <= self.offset and self.offset + self.length <= end:
            return self
        new_start = max(start, self.offset)
        new_end = min(end, self.end)
        host = None if self.host_offset is None else self.host_offset + (new_start - self.offset)
        return ChainExtent(new_start, new_end - new_start, self.data, self.zero, self.depth,
                           self.node, host, self.compressed, self.host_child)


def merge_runs(extents: list) -> list:
    """Join neighbours of the same kind so callers see the fewest runs."""
    merged: list = []
    for extent in extents:
        if extent.length == 0:
            continue
        if merged and merged[-1].end == extent.offset and merged[-1].same_kind(extent):
            merged[-1] = attrs.evolve(merged[-1], length=merged[-1].length + extent.length)
        else:
            merged.append(extent)
    return merged

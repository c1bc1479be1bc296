"""A chain's block status walked in growing windows: what convert, compare,
map and measure iterate over (their own module, so that a command imports
only the verb it runs)."""

from __future__ import annotations

from collections.abc import Iterator

from corefmt.block.node import BlockNode
from corefmt.extents import ChainExtent

#: Block status is asked for in windows, the first of this size. A window
#: that comes back with at most SPARSE_WINDOW_EXTENTS extents doubles the
#: next one, so a hole of any size is crossed in a number of requests that
#: grows with the log of its size, not with the size (each request is an
#: lseek or a table lookup per extent); one with more than
#: DENSE_WINDOW_EXTENTS starts again from this size (bounds the extent list).
STATUS_WINDOW = 1024 * 1024 * 1024
SPARSE_WINDOW_EXTENTS = 64
DENSE_WINDOW_EXTENTS = 4096


def chain_extents(node: BlockNode, start: int = 0, end: int | None = None, *,
                  base: BlockNode | None = None) -> Iterator[ChainExtent]:
    """The chain's block status over [start, end), asked for in windows that
    grow over sparse ranges (see STATUS_WINDOW): the cost follows the number
    of extents, not the virtual size. With ``base``, only the layers above
    it (ranges none of them decides have ``node`` None and are not zero)."""
    end = node.virtual_size if end is None else end
    window = STATUS_WINDOW
    position = start
    while position < end:
        window_end = min(end, position + window)
        extents = (node.block_status(position, window_end - position) if base is None
                   else node.block_status_above(base, position, window_end - position))
        yield from extents
        position = window_end
        if len(extents) <= SPARSE_WINDOW_EXTENTS:
            window *= 2
        elif len(extents) > DENSE_WINDOW_EXTENTS:
            window = STATUS_WINDOW

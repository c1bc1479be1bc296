"""Comparing the guest-visible content of two images (any formats, any chains)."""

from __future__ import annotations

import attrs

from corefmt.block.node import BlockNode

COMPARE_BUFFER_SIZE = 2 * 1024 * 1024
#: Mismatches are reported at sector granularity, as qemu-img does.
SECTOR_SIZE = 512


@attrs.frozen
class CompareResult:
    identical: bool
    mismatch_offset: int | None = None
    size_mismatch: bool = False


def first_difference(a: memoryview, b: memoryview) -> int | None:
    """Offset of the first differing sector start, or None if equal."""
    if a == b:
        return None
    low, high = 0, len(a)
    # Binary search on prefixes: memcmp does the work, Python only the halving.
    while high - low > SECTOR_SIZE:
        middle = low + (high - low) // 2
        middle -= middle % SECTOR_SIZE
        if middle <= low:
            break
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low - low % SECTOR_SIZE


def _zero_offset(node: BlockNode, start: int, end: int) -> int | None:
    """First non-zero sector of node in [start, end), or None."""
    buf = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    zeros = memoryview(bytes(COMPARE_BUFFER_SIZE))
    for extent in node.block_status(start, end - start):
        if extent.zero or extent.node is None:
            continue
        position = extent.offset
        while position < extent.end:
            step = min(COMPARE_BUFFER_SIZE, extent.end - position)
            node.readinto(position, buf[:step])
            found = first_difference(buf[:step], zeros[:step])
            if found is not None:
                return position + found
            position += step
    return None


def compare_nodes(a: BlockNode, b: BlockNode, strict: bool = False) -> CompareResult:
    """qemu-img compare's semantics: a larger image's extra part must be zeros."""
    size_a, size_b = a.virtual_size, b.virtual_size
    if strict and size_a != size_b:
        return CompareResult(False, None, size_mismatch=True)
    common = min(size_a, size_b)
    buf_a = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    buf_b = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    position = 0
    while position < common:
        window = min(COMPARE_BUFFER_SIZE, common - position)
        status_a = a.block_status(position, window)
        status_b = b.block_status(position, window)
        zero_a = all(e.zero or e.node is None for e in status_a)
        zero_b = all(e.zero or e.node is None for e in status_b)
        if not (zero_a and zero_b):
            a.readinto(position, buf_a[:window])
            b.readinto(position, buf_b[:window])
            found = first_difference(buf_a[:window], buf_b[:window])
            if found is not None:
                return CompareResult(False, position + found, size_a != size_b)
        position += window
    if size_a != size_b:
        longer = a if size_a > size_b else b
        found = _zero_offset(longer, common, max(size_a, size_b))
        if found is not None:
            return CompareResult(False, found, size_mismatch=True)
    return CompareResult(True, None, size_mismatch=size_a != size_b)

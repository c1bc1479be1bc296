"""Read-modify-write for requests that are not aligned to what a layer needs.

One helper serves every layer that has an alignment (image nodes, O_DIRECT
storage): the head and tail blocks are read, patched and written back, the
aligned middle goes straight through without a copy.
"""

from __future__ import annotations

from collections.abc import Callable

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes | memoryview], None]


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def aligned_range(offset: int, length: int, alignment: int) -> tuple[int, int]:
    """The smallest aligned [start, end) that covers [offset, offset+length)."""
    return align_down(offset, alignment), align_up(offset + length, alignment)


def is_aligned(offset: int, length: int, alignment: int) -> bool:
    return offset % alignment == 0 and length % alignment == 0


def write_unaligned(
    offset: int, data: bytes | memoryview, alignment: int, read: ReadFn, write: WriteFn
) -> None:
    """Write ``data`` at ``offset`` using only aligned writes."""
    view = memoryview(data)
    if is_aligned(offset, len(view), alignment):
        write(offset, view)
        return
    end = offset + len(view)
    head_start = align_down(offset, alignment)
    tail_end = align_up(end, alignment)
    if tail_end - head_start <= 2 * alignment:
        # Small request: one merged buffer covers it all.
        block = bytearray(read(head_start, tail_end - head_start))
        block[offset - head_start:end - head_start] = view
        write(head_start, block)
        return
    middle_start = align_up(offset, alignment)
    middle_end = align_down(end, alignment)
    if head_start != offset:
        head = bytearray(read(head_start, alignment))
        head[offset - head_start:] = view[: middle_start - offset]
        write(head_start, head)
    if middle_end > middle_start:
        write(middle_start, view[middle_start - offset: middle_end - offset])
    if tail_end != end:
        tail = bytearray(read(middle_end, alignment))
        tail[: end - middle_end] = view[middle_end - offset:]
        write(middle_end, tail)

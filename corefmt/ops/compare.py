"""Comparing the guest-visible content of two images (any formats, any chains).

Failures carry qemu-img compare's exit statuses and messages (its man
page): 3 when block status (allocation) cannot be found, 4 when data
cannot be read; 2, an image that cannot be opened, is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import attrs

from corefmt.block.node import BlockNode
from corefmt.buffers import first_difference
from corefmt.errors import CorefmtError, StorageError
from corefmt.ops.status_walk import chain_extents

COMPARE_BUFFER_SIZE = 2 * 1024 * 1024
#: qemu-img compare's exit statuses for failures after both images opened.
EXIT_STATUS_FAILED = 3
EXIT_READ_FAILED = 4
ProgressFn = Callable[[int, int], None]
Item = TypeVar("Item")


@attrs.frozen
class CompareResult:
    identical: bool
    mismatch_offset: int | None = None
    size_mismatch: bool = False
    #: Strict mode only: the images differ in block status (allocation, zero
    #: or data) at ``mismatch_offset``, as qemu-img compare -s reports.
    status_mismatch: bool = False


class CompareError(CorefmtError):
    """A comparison that could not be completed, with qemu-img's exit status;
    ``template`` names the image as ``{name}`` (qemu-img: as it was given)."""

    def __init__(self, template: str, node: BlockNode, exit_status: int):
        super().__init__(template.format(name=_name(node)))
        self.template = template
        self.node = node
        self.exit_status = exit_status

    def naming(self, name: str) -> str:
        return self.template.format(name=name)


def _name(node: BlockNode) -> str:
    return str(getattr(node.layer(), "filename", None) or node)


def _checked_status(node: BlockNode, runs: Iterable[Item]) -> Iterator[Item]:
    """``runs`` (computed from node's block status), a failure as qemu-img's 3."""
    try:
        yield from runs
    except CompareError:
        raise
    except CorefmtError as error:
        raise CompareError("Sector allocation test failed for {name}", node,
                           EXIT_STATUS_FAILED) from error


def _read(node: BlockNode, offset: int, buf: memoryview) -> None:
    """node.readinto, a failure as qemu-img's 4."""
    try:
        node.readinto(offset, buf)
    except CorefmtError as error:
        reason = (error.os_error.strerror or str(error.os_error)
                  if isinstance(error, StorageError) else str(error))
        reason = reason.replace("{", "{{").replace("}", "}}")
        raise CompareError(f"Error while reading offset {offset} of {{name}}: {reason}", node,
                           EXIT_READ_FAILED) from error


def _zero_offset(node: BlockNode, start: int, end: int,
                 moved: Callable[[int], None] = lambda _done: None) -> int | None:
    """First non-zero sector of node in [start, end), or None; ``moved(offset)``
    after each extent or chunk checked, as qemu-img's progress."""
    buf = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    zeros = memoryview(bytes(COMPARE_BUFFER_SIZE))
    for extent in _checked_status(node, chain_extents(node, start, end)):
        if extent.zero or extent.node is None:
            moved(extent.end)
            continue
        position = extent.offset
        while position < extent.end:
            step = min(COMPARE_BUFFER_SIZE, extent.end - position)
            _read(node, position, buf[:step])
            found = first_difference(buf[:step], zeros[:step])
            if found is not None:
                return position + found
            position += step
            moved(position)
    return None


def _status_runs(node: BlockNode, size: int) -> Iterator[tuple[int, tuple[bool, bool, bool]]]:
    """(end, status) of maximal runs of one block status, over [0, size)."""
    run_end, status = 0, None
    for extent in chain_extents(node, 0, size):
        key = (extent.data, extent.zero, extent.node is not None)
        if status is not None and key != status:
            yield run_end, status
        status, run_end = key, extent.end
    if status is not None:
        yield run_end, status


def status_difference(a: BlockNode, b: BlockNode) -> int | None:
    """First offset where two images of one size differ in block status.

    qemu-img compare -s compares the status bdrv_block_status_above returns
    for the rest of the image from each offset: data, zero, allocated, and
    whether that run reaches the end of the image.
    """
    size = a.virtual_size
    runs_a = _checked_status(a, _status_runs(a, size))
    runs_b = _checked_status(b, _status_runs(b, size))
    end_a, status_a = next(runs_a, (size, None))
    end_b, status_b = next(runs_b, (size, None))
    position = 0
    while position < size:
        if (status_a, end_a == size) != (status_b, end_b == size):
            return position
        position = min(end_a, end_b)
        if end_a == position:
            end_a, status_a = next(runs_a, (size, None))
        if end_b == position:
            end_b, status_b = next(runs_b, (size, None))
    return None


def _zero_runs(node: BlockNode, end: int) -> Iterator[tuple[int, bool]]:
    """(run end, reads as zeros) over [0, end), neighbours of one kind joined."""
    run_end, zero = 0, None
    for extent in chain_extents(node, 0, end):
        is_zero = extent.zero or extent.node is None
        if zero is not None and is_zero != zero:
            yield run_end, zero
        zero, run_end = is_zero, extent.end
    if zero is not None:
        yield run_end, zero


def _ranges_to_read(a: BlockNode, b: BlockNode, end: int) -> Iterator[tuple[int, int]]:
    """Ranges of [0, end) where either image may hold non-zero data: all that
    must be read to compare them (holes on both sides cost nothing)."""
    runs_a = _checked_status(a, _zero_runs(a, end))
    runs_b = _checked_status(b, _zero_runs(b, end))
    end_a, zero_a = next(runs_a, (end, True))
    end_b, zero_b = next(runs_b, (end, True))
    position = 0
    while position < end:
        step_end = min(end_a, end_b)
        if not (zero_a and zero_b):
            yield position, step_end
        position = step_end
        if end_a == position:
            end_a, zero_a = next(runs_a, (end, True))
        if end_b == position:
            end_b, zero_b = next(runs_b, (end, True))


def compare_nodes(a: BlockNode, b: BlockNode, strict: bool = False, *,
                  progress: ProgressFn | None = None,
                  on_size_mismatch: Callable[[], None] | None = None) -> CompareResult:
    """qemu-img compare's semantics: a larger image's extra part must be zeros;
    ``strict`` also fails on different sizes and on different block status.

    ``progress(done, total)`` follows qemu-img's (bytes of the larger size
    compared, after each 2 MiB); ``on_size_mismatch`` is called where
    qemu-img prints its size warning: once the common part matched.
    Raises CompareError when status or data cannot be read.
    """
    size_a, size_b = a.virtual_size, b.virtual_size
    if strict and size_a != size_b:
        return CompareResult(False, None, size_mismatch=True)
    total = max(size_a, size_b)
    shown = [0]  # progress starts at 0 (the caller shows that)

    def moved(done: int) -> None:
        if progress is not None and done > shown[0]:
            shown[0] = done
            progress(done, total)

    status_offset = status_difference(a, b) if strict else None
    common = min(size_a, size_b) if status_offset is None else status_offset
    buf_a = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    buf_b = memoryview(bytearray(COMPARE_BUFFER_SIZE))
    for start, end in _ranges_to_read(a, b, common):
        position = start
        while position < end:
            window = min(COMPARE_BUFFER_SIZE, end - position)
            _read(a, position, buf_a[:window])
            _read(b, position, buf_b[:window])
            found = first_difference(buf_a[:window], buf_b[:window])
            if found is not None:
                # qemu-img warns of a size mismatch only once the common part matched
                return CompareResult(False, position + found)
            position += window
            moved(position)
    if status_offset is not None:
        return CompareResult(False, status_offset, status_mismatch=True)
    moved(common)
    if size_a != size_b:
        if on_size_mismatch is not None:
            on_size_mismatch()
        longer = a if size_a > size_b else b
        found = _zero_offset(longer, common, total, moved)
        if found is not None:
            return CompareResult(False, found, size_mismatch=True)
    moved(total)
    return CompareResult(True, None, size_mismatch=size_a != size_b)

"""One NBD export: what a node offers and how each NBD command maps onto the
block layer (flags, discard and detect-zeroes policies, error codes).

Kept apart from the wire handling so the policies (qemu-nbd's) are in one
place and the server only moves bytes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import attrs

from corefmt.block.filter_node import FilterNode
from corefmt.block.node import BlockNode
from corefmt.buffers import is_zero
from corefmt.driver import supports
from corefmt.errors import (
    CorefmtError,
    InvalidRequest,
    NotSupported,
    RangeError,
    ReadOnlyError,
    StorageError,
)
from corefmt.extents import ChainExtent
from corefmt.flags import RequestFlags
from corefmt.nbd.bitmaps import DirtyBitmap, find_bitmap
from corefmt.nbd.protocol import (
    BASE_ALLOCATION,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    QEMU_ALLOCATION_DEPTH,
    QEMU_DIRTY_BITMAP,
    Error,
)
from corefmt.nbd.protocol import TransmissionFlags as TF

DISCARD_IGNORE, DISCARD_UNMAP = "ignore", "unmap"
DISCARD_MODES = (DISCARD_IGNORE, DISCARD_UNMAP)
DETECT_OFF, DETECT_ON, DETECT_UNMAP = "off", "on", "unmap"
DETECT_ZEROES_MODES = (DETECT_OFF, DETECT_ON, DETECT_UNMAP)

#: Largest READ/WRITE payload (qemu-nbd's NBD_MAX_BUFFER_SIZE): bounds memory.
MAX_PAYLOAD = 32 * 1024 * 1024
PREFERRED_BLOCK_SIZE = 4096
#: Minimum block size advertised when the image's alignment is above one byte.
SECTOR = 512
#: NBD_CMD_CACHE reads through the image in pieces this large.
CACHE_CHUNK = 4 * 1024 * 1024
#: Filters under which NBD_CMD_CACHE fills the top image from its backing.
FILL_FILTERS = ("copy-on-read", "prefetch")
#: Block status is asked of the chain this much at first, doubling up to
#: STATUS_WINDOW at a time (see Export._extents).
FIRST_STATUS_WINDOW = 1024 * 1024
STATUS_WINDOW = 64 * 1024 * 1024
#: A BLOCK_STATUS reply stops after this many descriptors (the client asks again).
MAX_DESCRIPTORS = 65536
#: Largest 32-bit descriptor length, kept block-aligned.
MAX_DESCRIPTOR_LENGTH = 0xFFFFFFFF & ~(SECTOR - 1)

#: Ids of the fixed metadata contexts (depth only with -A, as qemu-nbd);
#: -B bitmaps are numbered from FIRST_BITMAP_CONTEXT_ID in the order offered.
CONTEXT_IDS = {BASE_ALLOCATION: 1, QEMU_ALLOCATION_DEPTH: 2}
FIRST_BITMAP_CONTEXT_ID = 3


class NbdRequestError(Exception):
    """A request refused with an NBD error code (the connection goes on)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def error_code(error: BaseException) -> int:
    """The NBD error for an exception from the block layer."""
    if isinstance(error, NbdRequestError):
        return error.code
    if isinstance(error, ReadOnlyError):
        return Error.NBD_EPERM
    if isinstance(error, (RangeError, InvalidRequest)):
        return Error.NBD_EINVAL
    if isinstance(error, NotSupported):
        return Error.NBD_ENOTSUP
    number = getattr(error, "errno", None)
    if isinstance(error, (StorageError, OSError)) and number in (errno.ENOSPC, errno.EDQUOT):
        return Error.NBD_ENOSPC
    if isinstance(error, MemoryError):
        return Error.NBD_ENOMEM
    return Error.NBD_EIO


@attrs.define
class Export:
    """A node served under a name, with qemu-nbd's policies."""

    node: BlockNode
    name: str = ""
    description: str = ""
    read_only: bool = False
    discard: str = DISCARD_IGNORE
    detect_zeroes: str = DETECT_OFF
    #: -e: how many clients may be connected at once (>1 advertises multi-conn).
    shared: int = 1
    #: Offer qemu:allocation-depth. On by default in the API, as before -A
    #: existed; the CLI offers it only with -A, as qemu-nbd.
    allocation_depth: bool = True
    #: -B: persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME.
    bitmaps: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: --cache=writethrough/directsync: every write is FUA (no write cache).
    writethrough: bool = False
    #: Context name -> id, filled from the options above.
    contexts: dict[str, int] = attrs.field(init=False, factory=dict)
    _bitmaps: dict[str, DirtyBitmap] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.discard not in DISCARD_MODES:
            raise CorefmtError(f"Invalid discard mode '{self.discard}'")
        if self.detect_zeroes not in DETECT_ZEROES_MODES:
            raise CorefmtError(f"Invalid detect-zeroes mode '{self.detect_zeroes}'")
        if self.detect_zeroes == DETECT_UNMAP and self.discard != DISCARD_UNMAP:
            raise CorefmtError("--detect-zeroes=unmap can only be used if --discard=unmap")
        self.read_only = self.read_only or self.node.read_only
        self.contexts[BASE_ALLOCATION] = CONTEXT_IDS[BASE_ALLOCATION]
        if self.allocation_depth:
            self.contexts[QEMU_ALLOCATION_DEPTH] = CONTEXT_IDS[QEMU_ALLOCATION_DEPTH]
        # qemu-nbd offers a repeated -B once, and the last -B first (it prepends).
        for name in reversed(dict.fromkeys(self.bitmaps)):
            self._bitmaps[QEMU_DIRTY_BITMAP + name] = find_bitmap(self.node, name)
            self.contexts[QEMU_DIRTY_BITMAP + name] = FIRST_BITMAP_CONTEXT_ID + len(
                self._bitmaps) - 1

    @property
    def size(self) -> int:
        return self.node.virtual_size

    def transmission_flags(self, structured: bool) -> int:
        flags = TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_FLUSH | TF.NBD_FLAG_SEND_FUA
        flags |= TF.NBD_FLAG_SEND_CACHE
        if self.read_only:
            flags |= TF.NBD_FLAG_READ_ONLY
        else:
            flags |= (TF.NBD_FLAG_SEND_TRIM | TF.NBD_FLAG_SEND_WRITE_ZEROES
                      | TF.NBD_FLAG_SEND_FAST_ZERO)
        if structured:  # DF only means something with structured replies
            flags |= TF.NBD_FLAG_SEND_DF
        if self.shared > 1:  # every connection shares one node: flushes are consistent
            flags |= TF.NBD_FLAG_CAN_MULTI_CONN
        return int(flags)

    def block_sizes(self, client_asked: bool) -> tuple[int, int, int]:
        """(minimum, preferred, maximum). A client that did not ask for block
        sizes may send any alignment: the block layer aligns for it, so 1."""
        minimum = 1 if not client_asked or self.node.request_alignment == 1 else SECTOR
        return minimum, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD

    # -- commands ---------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise NbdRequestError(Error.NBD_EINVAL,
                                  f"request {offset}+{length} is beyond the export's "
                                  f"end ({self.size})")

    def check_writable(self) -> None:
        if self.read_only:
            raise NbdRequestError(Error.NBD_EPERM, "the export is read-only")

    def read_pieces(self, offset: int, length: int, holes: bool
                    ) -> Iterator[tuple[int, int, memoryview | None]]:
        """The range as (offset, length, data) pieces; data None where the chain
        reads as zeros (only with ``holes``: structured replies can say so)."""
        if not holes:
            buf = bytearray(length)
            self.node.readinto(offset, buf)
            yield offset, length, memoryview(buf)
            return
        runs: list[tuple[int, int, bool]] = []
        for extent in self.node.block_status(offset, length):
            start = max(extent.offset, offset)
            end = min(extent.end, offset + length)
            if end <= start:
                continue
            zero = extent.zero or extent.node is None
            if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end - runs[-1][0], zero)
            else:
                runs.append((start, end - start, zero))
        for start, run_length, zero in runs:
            if zero:
                yield start, run_length, None
            else:
                buf = bytearray(run_length)
                self.node.readinto(start, buf)
                yield start, run_length, memoryview(buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.check_writable()
        flags = RequestFlags.FUA if fua or self.writethrough else RequestFlags.NONE
        if self.detect_zeroes != DETECT_OFF and is_zero(data):
            self.node.write_zeroes(offset, len(data), unmap=self.detect_zeroes == DETECT_UNMAP,
                                   flags=flags)
            return
        self.node.write(offset, data, flags)

    def write_zeroes(self, offset: int, length: int, *, fua: bool, no_hole: bool,
                     fast: bool) -> None:
        self.check_writable()
        flags = RequestFlags.FUA if fua or self.writethrough else RequestFlags.NONE
        if fast:
            flags |= RequestFlags.NO_FALLBACK
        unmap = not no_hole and self.discard == DISCARD_UNMAP
        self.node.write_zeroes(offset, length, unmap=unmap, flags=flags)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.check_writable()
        if self.discard == DISCARD_UNMAP:
            self.node.discard(offset, length)
            if fua or self.writethrough:
                self.node.flush()

    def flush(self) -> None:
        self.node.flush()

    def cache(self, offset: int, length: int) -> None:
        """Read the range through the image; with copy-on-read or prefetch on,
        fill it into the top image instead, as a prefetch step: FVD's async
        copy-on-read would drop most fills of a large range, and a cache that
        completes the image marks it self-contained (the base not needed)."""
        layer = self._fill_layer()
        if layer is not None:
            from corefmt.ops.prefetch import Prefetcher

            prefetcher = Prefetcher(layer, throttle=False)
            prefetcher.copy_range(offset, length)
            if supports(getattr(layer, "image", None), "mark_self_contained") \
                    and prefetcher.complete():
                layer.persist_fills()
                layer.mark_self_contained()
            return
        buf = bytearray(min(length, CACHE_CHUNK))
        position, end = offset, offset + length
        while position < end:
            step = min(len(buf), end - position)
            self.node.readinto(position, memoryview(buf)[:step])
            position += step

    def _fill_layer(self) -> BlockNode | None:
        """The top image when a copy-on-read or prefetch filter is above it
        and it still needs a backing to fill from; else None. (Once marked
        self-contained the image records no backing, though the open node
        keeps its child until closed.)"""
        node = self.node
        filling = False
        while isinstance(node, FilterNode):
            filling = filling or node.driver_name in FILL_FILTERS
            node = node.child
        if not filling or self.read_only or node.read_only or node.backing is None:
            return None
        image = getattr(node, "image", None)
        if image is not None and getattr(image, "backing", None) is None:
            return None
        return node

    def status(self, context: str, offset: int, length: int, one: bool
               ) -> list[tuple[int, int]]:
        """(length, flags) descriptors of one metadata context for the range."""
        descriptors: list[tuple[int, int]] = []
        for start, end, value in self._runs(context, offset, length):
            if descriptors and descriptors[-1][1] == value:
                start -= descriptors.pop()[0]
            while end - start > MAX_DESCRIPTOR_LENGTH:
                descriptors.append((MAX_DESCRIPTOR_LENGTH, value))
                start += MAX_DESCRIPTOR_LENGTH
            descriptors.append((end - start, value))
            if len(descriptors) >= MAX_DESCRIPTORS or (one and len(descriptors) > 1):
                break  # with REQ_ONE the first descriptor is whole once another starts
        if one:
            return descriptors[:1]
        return descriptors[:MAX_DESCRIPTORS]

    def _extents(self, offset: int, length: int) -> Iterator[ChainExtent]:
        """The chain's status over the range, asked STATUS_WINDOW at a time so
        a caller that stops early pays for what it used: qemu's client asks
        with REQ_ONE from every extent to the end of the disk, and asking for
        all of it each time made a convert's status cost grow with the
        square of the extents."""
        end, window = offset + length, FIRST_STATUS_WINDOW
        while offset < end:
            yield from self.node.block_status(offset, min(window, end - offset))
            offset += window
            window = min(2 * window, STATUS_WINDOW)

    def _runs(self, context: str, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, flags) of one context, in order, covering the range."""
        bitmap = self._bitmaps.get(context)
        if bitmap is not None:
            for start, end, dirty in bitmap.runs(offset, length):
                yield start, end, NBD_STATE_DIRTY if dirty else 0
            return
        for extent in self._extents(offset, length):
            start, end = max(extent.offset, offset), min(extent.end, offset + length)
            if end <= start:
                continue
            if context == BASE_ALLOCATION:
                value = ((0 if extent.data and extent.node is not None else NBD_STATE_HOLE)
                         | (NBD_STATE_ZERO if extent.zero or extent.node is None else 0))
            else:  # qemu:allocation-depth: 0 unallocated, 1 the top layer, ...
                value = 0 if extent.node is None else extent.depth + 1
            yield start, end, value

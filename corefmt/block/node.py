"""BlockNode: one image in a graph, with its backing node below it.

The node, not the driver, owns the chain: reads are split by the image's
block status, unallocated ranges come from the backing node (any format),
and ranges past the backing's end read as zeros. The node also does
alignment (read-modify-write), tracked requests, copy-on-read and the
emulation of optional driver capabilities.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from corefmt.block.align import aligned_range, write_unaligned
from corefmt.block.status_cache import ChainStatusCache
from corefmt.block.tracked import RequestTracker
from corefmt.driver import FormatDriver, Image, has_capability
from corefmt.errors import CorefmtError, ImageError, RangeError, ReadOnlyError
from corefmt.extents import ChainExtent, Extent, merge_runs
from corefmt.storage.base import Storage

if TYPE_CHECKING:
    import pluggy

    from corefmt.fileview import ImageIO

#: Largest zero buffer the write_zeroes emulation writes at once.
ZERO_WRITE_CHUNK = 1024 * 1024
_ZEROS = bytes(ZERO_WRITE_CHUNK)


class BlockNode:
    """An open image plus the node below it; the Python API's image object."""

    def __init__(self, *, storage: Storage, driver: FormatDriver, filename: str,
                 read_only: bool, hooks: pluggy.HookRelay | None = None):
        self.storage = storage
        self.driver = driver
        self.filename = filename
        self.read_only = read_only
        self.image: Image | None = None
        self.backing: BlockNode | None = None
        self.copy_on_read = False
        self._hooks = hooks
        self._tracker = RequestTracker()
        self._overlays: weakref.WeakSet[BlockNode] = weakref.WeakSet()
        self._status_cache = (
            ChainStatusCache(self._walk_chain, lambda: self.virtual_size)
            if read_only else None
        )
        self._closed = False
        self._close_lock = threading.Lock()

    # -- graph ------------------------------------------------------------------
    def attach(self, image: Image) -> None:
        self.image = image

    def set_backing(self, backing: BlockNode | None) -> None:
        previous = self.backing
        if previous is not None:
            previous._overlays.discard(self)
        self.backing = backing
        if backing is not None:
            backing._overlays.add(self)
        if previous is not None:
            # Only a re-pointed chain can have cached status that depends on it.
            self._invalidate_status()

    def chain(self) -> list[BlockNode]:
        """This node and every backing node below it, top first."""
        nodes: list[BlockNode] = []
        node: BlockNode | None = self
        while node is not None:
            nodes.append(node)
            node = node.backing
        return nodes

    @property
    def format_name(self) -> str:
        return self.driver.name

    @property
    def virtual_size(self) -> int:
        return self._image.virtual_size

    @property
    def request_alignment(self) -> int:
        return max(self._image.request_alignment, 1)

    @property
    def _image(self) -> Image:
        if self.image is None or self._closed:
            raise CorefmtError(f"{self.filename}: image is closed")
        return self.image

    # -- block status ---------------------------------------------------------
    def own_status(self, offset: int, length: int) -> list[Extent]:
        """The image's own block status over a range, merged into runs."""
        image = self._image
        extents: list[Extent] = []
        position, end = offset, offset + length
        while position < end:
            extent = image.block_status(position, end - position)
            if extent.offset != position or not 0 < extent.length <= end - position:
                raise ImageError(self.filename, "block status", position,
                                 f"driver returned an invalid extent {extent}")
            extents.append(extent)
            position += extent.length
        return merge_runs(extents)

    def block_status(self, offset: int, length: int) -> list[ChainExtent]:
        """Status merged over the whole chain, covering [offset, offset+length)."""
        self._check_range(offset, length)
        if length == 0:
            return []
        if self._status_cache is not None:
            return self._status_cache.lookup(offset, length)
        result: list[ChainExtent] = []
        for extent in self.own_status(offset, length):
            if extent.allocated:
                result.append(ChainExtent(extent.offset, extent.length, extent.data,
                                          extent.zero, 0, self, extent.host_offset))
            elif self.backing is not None and self.backing._status_cache is not None:
                result.extend(self._status_below(extent.offset, extent.length))
            else:
                result.extend(self._walk_chain(extent.offset, extent.length, skip_self=True))
        return merge_runs(result)

    def _status_below(self, offset: int, length: int) -> list[ChainExtent]:
        """Status of a range this node leaves to its (cached) backing node."""
        below = self.backing
        assert below is not None
        end = offset + length
        below_end = min(end, below.virtual_size)
        result: list[ChainExtent] = []
        if offset < below_end:
            for extent in below.block_status(offset, below_end - offset):
                result.append(ChainExtent(extent.offset, extent.length, extent.data, extent.zero,
                                          extent.depth + 1, extent.node, extent.host_offset))
        if end > max(offset, below_end):
            start = max(offset, below_end)
            result.append(ChainExtent(start, end - start, False, True, 0, None))
        return result

    def _walk_chain(self, offset: int, length: int, skip_self: bool = False) -> list[ChainExtent]:
        """Merged status computed layer by layer, without recursion (chains may
        be hundreds of images deep)."""
        result: list[ChainExtent] = []
        pending = [(offset, length)]
        node: BlockNode = self
        depth = 0
        if skip_self:
            if self.backing is None:
                return [ChainExtent(offset, length, False, True, 0, None)]
            node, depth = self.backing, 1
            pending = self._clip_to(node, pending, result, 0)
        while pending:
            unallocated: list[tuple[int, int]] = []
            for start, run in pending:
                for extent in node.own_status(start, run):
                    if extent.allocated:
                        result.append(ChainExtent(extent.offset, extent.length, extent.data,
                                                  extent.zero, depth, node, extent.host_offset))
                    else:
                        unallocated.append((extent.offset, extent.length))
            below = node.backing
            if below is None:
                result.extend(ChainExtent(start, run, False, True, depth, None)
                              for start, run in unallocated)
                break
            pending = self._clip_to(below, unallocated, result, depth)
            node, depth = below, depth + 1
        result.sort(key=lambda extent: extent.offset)
        return merge_runs(result)

    @staticmethod
    def _clip_to(below: BlockNode, ranges: list[tuple[int, int]], result: list[ChainExtent],
                 depth: int) -> list[tuple[int, int]]:
        """Ranges inside ``below``; the parts past its end read as zeros."""
        size = below.virtual_size
        inside: list[tuple[int, int]] = []
        for start, run in ranges:
            end = start + run
            if start < size:
                inside.append((start, min(end, size) - start))
            if end > max(start, size):
                tail = max(start, size)
                result.append(ChainExtent(tail, end - tail, False, True, depth, None))
        return inside

    def _invalidate_status(self) -> None:
        """Forget cached chain status here and in every overlay above."""
        pending = [self]
        while pending:
            node = pending.pop()
            if node._status_cache is not None:
                node._status_cache.clear()
            pending.extend(node._overlays)

    # -- reads ------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if length == 0:
            return
        self._observe("read", offset, length)
        start, end = aligned_range(offset, length, self.request_alignment)
        with self._tracker.track(start, end, exclusive=False):
            extents = self._read_extents(offset, view)
        below = [e for e in extents if e.depth > 0 and e.node is not None]
        if below and self._wants_copy_on_read(offset, length):
            for extent in below:
                self._copy_up(extent, view[extent.offset - offset:extent.end - offset])

    def _read_extents(self, offset: int, view: memoryview) -> list[ChainExtent]:
        """Fill ``view`` from the chain; the caller holds the tracked range."""
        extents = self.block_status(offset, len(view))
        for extent in extents:
            part = view[extent.offset - offset:extent.end - offset]
            if extent.node is None or extent.zero:
                part[:] = bytes(len(part))
            else:
                extent.node._image.readinto(extent.offset, part)
        return extents

    def _read_untracked(self, offset: int, length: int) -> bytes:
        """Read for read-modify-write: an aligned block may run past the end
        of an image whose size is not a multiple of the alignment (zeros)."""
        buf = bytearray(length)
        inside = max(0, min(length, self.virtual_size - offset))
        if inside:
            self._read_extents(offset, memoryview(buf)[:inside])
        return bytes(buf)

    def read_below(self, offset: int, length: int) -> bytes:
        """What the backing chain holds for a range (zeros where nothing does)."""
        buf = bytearray(length)
        below = self.backing
        if below is not None:
            available = max(0, min(offset + length, below.virtual_size) - offset)
            if available:
                below.readinto(offset, memoryview(buf)[:available])
        return bytes(buf)

    # -- copy-on-read -------------------------------------------------------------
    def _wants_copy_on_read(self, offset: int, length: int) -> bool:
        if self.read_only:
            return False
        decision = None
        if self._hooks is not None and self._hooks.corefmt_copy_on_read.get_hookimpls():
            decision = self._hooks.corefmt_copy_on_read(node=self, offset=offset, length=length)
        return self.copy_on_read if decision is None else bool(decision)

    def _copy_up(self, extent: ChainExtent, data: memoryview) -> None:
        """Write data read from below into this node, unless a write got there first."""
        self._observe("copy_on_read", extent.offset, extent.length)
        start, end = aligned_range(extent.offset, extent.length, self.request_alignment)
        with self._tracker.track(start, end, exclusive=True):
            for own in self.own_status(extent.offset, extent.length):
                if own.allocated:
                    continue  # a guest write landed meanwhile: it wins
                part = data[own.offset - extent.offset:own.end - extent.offset]
                if extent.zero and has_capability(self._image, "write_zeroes"):
                    self._zero_with_driver(own.offset, own.length, False)
                else:
                    self._write_aligned(own.offset, part)
        self._invalidate_status()

    # -- writes -------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if not view:
            return
        self._observe("write", offset, len(view))
        start, end = aligned_range(offset, len(view), self.request_alignment)
        with self._tracker.track(start, end, exclusive=True):
            self._write_aligned(offset, view)
        self._invalidate_status()

    def _write_aligned(self, offset: int, view: memoryview) -> None:
        write_unaligned(offset, view, self.request_alignment,
                        self._read_untracked, self._image.write)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make a range read as zeros (drivers without the capability get zeros written)."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        self._observe("write_zeroes", offset, length)
        alignment = self.request_alignment
        start, end = aligned_range(offset, length, alignment)
        with self._tracker.track(start, end, exclusive=True):
            if has_capability(self._image, "write_zeroes"):
                self._zero_with_driver(offset, length, unmap)
            else:
                self._write_zero_bytes(offset, length)
        self._invalidate_status()

    def _zero_with_driver(self, offset: int, length: int, unmap: bool) -> None:
        alignment = self.request_alignment
        end = offset + length
        inner_start, inner_end = (-(-offset // alignment) * alignment,
                                  end - end % alignment)
        if inner_end <= inner_start:
            self._write_zero_bytes(offset, length)
            return
        if inner_start > offset:
            self._write_zero_bytes(offset, inner_start - offset)
        self._image.write_zeroes(inner_start, inner_end - inner_start, unmap)
        if end > inner_end:
            self._write_zero_bytes(inner_end, end - inner_end)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        position, end = offset, offset + length
        while position < end:
            step = min(ZERO_WRITE_CHUNK, end - position)
            self._write_aligned(position, memoryview(_ZEROS)[:step])
            position += step

    def discard(self, offset: int, length: int) -> None:
        """Tell the image a range is unused; a no-op for drivers that cannot."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0 or not has_capability(self._image, "discard"):
            return
        self._observe("discard", offset, length)
        alignment = self.request_alignment
        inner_start = -(-offset // alignment) * alignment
        inner_end = (offset + length) - (offset + length) % alignment
        if inner_end <= inner_start:
            return
        with self._tracker.track(inner_start, inner_end, exclusive=True):
            self._image.discard(inner_start, inner_end - inner_start)
        self._invalidate_status()

    def flush(self) -> None:
        if self.read_only:
            return
        self._observe("flush", 0, 0)
        self._image.flush()

    def truncate(self, size: int) -> None:
        self._check_writable()
        if size < 0:
            raise RangeError(f"{self.filename}: size must not be negative")
        if not has_capability(self._image, "truncate"):
            raise CorefmtError(f"{self.filename}: format {self.format_name} cannot be resized")
        with self._tracker.track(0, max(size, self.virtual_size) + 1, exclusive=True):
            self._image.truncate(size)
        self._invalidate_status()

    # -- checks -----------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise RangeError(f"{self.filename}: negative offset or length ({offset}, {length})")
        size = self.virtual_size
        if offset + length > size:
            raise RangeError(
                f"{self.filename}: request at offset {offset} length {length} is beyond "
                f"the end of the image ({size} bytes)"
            )

    def _observe(self, operation: str, offset: int, length: int) -> None:
        hooks = self._hooks
        if hooks is not None and hooks.corefmt_observe_request.get_hookimpls():
            hooks.corefmt_observe_request(node=self, operation=operation,
                                          offset=offset, length=length)

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Close this node and its whole backing chain (flushing writable ones)."""
        first_error: BaseException | None = None
        for node in self.chain():
            try:
                node._close_one()
            except BaseException as error:  # close the rest, then report the first
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def _close_one(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.image is not None:
                self.image.close()
            else:
                self.storage.close()
        finally:
            self.storage.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def io(self) -> ImageIO:
        """A file-like (io.RawIOBase) view of the guest-visible bytes."""
        from corefmt.fileview import ImageIO

        return ImageIO(self)

    def __repr__(self) -> str:
        return f"<BlockNode {self.format_name} {self.filename!r}>"

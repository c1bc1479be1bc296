"""ImageNode: a node holding one open Image of some format.

It does what is not specific to a format: merged block status over the
chain (iteratively: chains may be hundreds of images deep), reads split by
it, alignment (read-modify-write), request splitting to the driver's
limits, tracked requests, copy-on-read fills, request flags for drivers
that predate them, and the emulation of optional capabilities (or of a
request the driver declines with NotSupported).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from corefmt.block.align import align_down, align_up, aligned_range, write_unaligned
from corefmt.block.node import PREALLOCATION_OFF, ROLE_FILE, BlockNode
from corefmt.block.status_cache import ChainStatusCache
from corefmt.buffers import is_zero
from corefmt.driver import FormatDriver, Image, ImageContext, accepts_keyword, supports
from corefmt.errors import CorefmtError, ImageError, NotSupported, RangeError
from corefmt.extents import ChainExtent, Extent, merge_runs
from corefmt.flags import RequestFlags
from corefmt.limits import Limits
from corefmt.storage import locking

if TYPE_CHECKING:
    import pluggy

    from corefmt.storage.base import Storage

#: Largest zero buffer the write_zeroes emulation writes at once.
ZERO_WRITE_CHUNK = 1024 * 1024
_ZEROS = bytes(ZERO_WRITE_CHUNK)

#: Request flags as plain ints: IntFlag operators run in Python, and every
#: request tests a few of them.
_OWN_DATA, _COPY_ON_READ = int(RequestFlags.OWN_DATA), int(RequestFlags.COPY_ON_READ)
_FUA, _COMPRESSED = int(RequestFlags.FUA), int(RequestFlags.COMPRESSED)
_FILL, _MAY_UNMAP = int(RequestFlags.FILL), int(RequestFlags.MAY_UNMAP)
_NO_FALLBACK = int(RequestFlags.NO_FALLBACK)

#: A tracked range that covers any request (reopen excludes them all).
WHOLE_IMAGE = 1 << 63
#: How far past a range's start a chain walk asks a layer about its status
#: (own_status_over): far enough that one answer covers the many small gaps
#: the layers above leave, bounded so a layer is not made to read metadata
#: (qcow2 L2 tables) of much that the layers above already decide.
STATUS_QUERY_SPAN = 1024 * 1024 * 1024


@attrs.frozen
class Reopener:
    """Opens an image node's storage and driver context in a given mode."""

    storage: Callable[[bool], Storage]
    context: Callable[[bool], ImageContext]


#: Debug events the core emits for every format (QEMU's names, as its raw
#: driver emits them), so fault injection works on formats that emit none.
EVENT_READ = "read_aio"
EVENT_WRITE = "write_aio"
EVENT_FLUSH = "flush_to_disk"


class ImageNode(BlockNode):
    """An open image plus its children (storage, backing, data file)."""

    def __init__(self, *, storage: Storage, driver: FormatDriver, filename: str,
                 read_only: bool, hooks: pluggy.HookRelay | None = None,
                 node_name: str | None = None):
        super().__init__(filename=filename, read_only=read_only, hooks=hooks,
                         node_name=node_name)
        self.children[ROLE_FILE] = storage
        self.driver = driver
        self.image: Image | None = None
        self._limits = Limits()
        self._write_takes_flags = self._zeroes_take_flags = False
        self._event_sinks: list[Any] = []
        #: How to open this node's storage and context again (set by the graph
        #: builder; None: the node cannot be reopened).
        self._reopener: Reopener | None = None
        #: Changes made through this node, and how many a flush has covered.
        self._write_generation = self._flushed_generation = 0
        #: qemu's cache.no-flush (cache=unsafe): flush and close never flush.
        self.no_flush = False
        if read_only:
            self._status_cache = self._new_status_cache()

    def _new_status_cache(self) -> ChainStatusCache:
        return ChainStatusCache(self._walk_chain, lambda: self.virtual_size,
                                lambda: self.status_generation)

    # -- graph ------------------------------------------------------------------
    def attach(self, image: Image) -> None:
        """Adopt the driver's Image and learn what it takes."""
        self.image = image
        self._limits = image.limits
        self._write_takes_flags = accepts_keyword(image.write, "flags")
        zeroes = getattr(image, "write_zeroes", None)
        self._zeroes_take_flags = zeroes is not None and accepts_keyword(zeroes, "flags")
        self._event_sinks = [child for child in self.children.values()
                             if callable(getattr(child, "debug_event", None))]

    def add_child(self, role: str, child: Any) -> None:
        super().add_child(role, child)
        if callable(getattr(child, "debug_event", None)):
            self._event_sinks.append(child)

    @property
    def storage(self) -> Storage:
        return self.children[ROLE_FILE]  # type: ignore[return-value]

    @property
    def driver_name(self) -> str:
        return self.driver.name

    @property
    def virtual_size(self) -> int:
        return self._image.virtual_size

    @property
    def limits(self) -> Limits:
        self._image  # noqa: B018 - a closed node has no limits
        return self._limits

    @property
    def request_alignment(self) -> int:
        return self._limits.request_alignment  # asked on every request

    @property
    def _image(self) -> Image:
        if self.image is None or self._closed:
            raise CorefmtError(f"{self.filename}: image is closed")
        return self.image

    def emit(self, event: str) -> None:
        """A named point in a request or a driver's update sequence: fault
        injection filters on the storage below act on it."""
        for sink in self._event_sinks:
            sink.debug_event(event)

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

    def _decide(self, pending: list[tuple[int, int]], depth: int, entry: BlockNode,
                result: list[ChainExtent], hosts: dict[int, Extent]) -> list[tuple[int, int]]:
        """One step of a chain walk: this layer's status over the ranges no
        layer above decides (sorted, disjoint). What it allocates goes to
        ``result`` (read through ``entry`` at ``depth``); the ranges it leaves
        to its backing are returned, and those of them with a host place
        noted in ``hosts``.

        The driver is asked from a range's start to as far as
        ``STATUS_QUERY_SPAN`` past it (never past the last range), not just
        to the range's end, so one answer may cover many ranges, and ranges
        an unallocated answer covers are passed on as they are. The layers
        above may leave one gap each: asked range by range, a chain of n
        overlays costs n * n / 2 driver calls; this way about one per extent,
        and never more calls than range by range (each answer ends no
        earlier than the clipped one would)."""
        image = self._image
        unallocated: list[tuple[int, int]] = []
        starts = [start for start, _ in pending]
        last_end = pending[-1][0] + pending[-1][1]
        index, count = 0, len(pending)
        position = pending[0][0]
        while index < count:
            start, run = pending[index]
            end = start + run
            if position < start:
                position = start
            query_end = min(last_end, max(end, position + STATUS_QUERY_SPAN))
            extent = image.block_status(position, query_end - position)
            if extent.offset != position or not 0 < extent.length <= query_end - position:
                raise ImageError(self.filename, "block status", position,
                                 f"driver returned an invalid extent {extent}")
            extent_end = position + extent.length
            stop = bisect.bisect_left(starts, extent_end, index)  # pending[index:stop] overlap
            last_start, last_run = pending[stop - 1]
            if not extent.allocated and extent.host_offset is None:
                first_end = min(end, extent_end)
                if unallocated and sum(unallocated[-1]) == position and (
                        unallocated[-1][0] not in hosts):
                    unallocated[-1] = (unallocated[-1][0], first_end - unallocated[-1][0])
                else:
                    unallocated.append((position, first_end - position))
                if stop - 1 > index:
                    unallocated.extend(pending[index + 1:stop - 1])
                    unallocated.append((last_start, min(last_start + last_run, extent_end)
                                        - last_start))
            else:
                for piece_start, piece_run in pending[index:stop]:
                    piece = _clip_extent(extent, max(piece_start, position),
                                         min(piece_start + piece_run, extent_end))
                    if extent.allocated:
                        result.append(_chain_extent(piece, depth, entry))
                    else:
                        unallocated.append((piece.offset, piece.length))
                        hosts[piece.offset] = piece
            index = stop - 1 if last_start + last_run > extent_end else stop
            position = extent_end
        return unallocated

    def block_status(self, offset: int, length: int) -> list[ChainExtent]:
        """Status merged over the whole chain, covering [offset, offset+length).

        ``node`` of an extent is the node whose request path reads it: this
        node, or the entry node (a filter, or the image) of a lower layer.
        """
        self._check_range(offset, length)
        if length == 0:
            return []
        if self._status_cache is not None:
            return self._status_cache.lookup(offset, length)
        result: list[ChainExtent] = []
        below = self.backing
        for extent in self.own_status(offset, length):
            if extent.allocated:
                result.append(_chain_extent(extent, 0, self))
            elif below is not None and below.layer()._status_cache is not None:
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
                                          extent.depth + 1, extent.node, extent.host_offset,
                                          extent.compressed, extent.host_child))
        if end > max(offset, below_end):
            start = max(offset, below_end)
            result.append(ChainExtent(start, end - start, False, True, 0, None))
        return result

    def _walk_chain(self, offset: int, length: int, skip_self: bool = False,
                    base: BlockNode | None = None) -> list[ChainExtent]:
        """Merged status computed layer by layer, without recursion (chains may
        be hundreds of images deep). Each layer is reached through its entry
        node (the backing edge's node, maybe a filter), which reads serve.
        With ``base``, the walk stops above that layer: what no layer above
        it decides is reported with ``node`` None and neither data nor zero."""
        stop = base.layer() if base is not None else None
        result: list[ChainExtent] = []
        pending = [(offset, length)]
        entry: BlockNode = self
        layer: BlockNode = self
        depth = 0
        if skip_self:
            if self.backing is None:
                own = self.own_status(offset, length)
                return [_unallocated_bottom(extent.offset, extent.length, 0, extent)
                        for extent in own]
            entry = self.backing
            layer, depth = entry.layer(), 1
            pending = _clip_to(entry, pending, result, 0)
        while pending:
            # Unallocated ranges that still have a host place (qcow2's
            # reserved subclusters): the bottom layer's is reported, as qemu does.
            hosts: dict[int, Extent] = {}
            unallocated = layer._decide(pending, depth, entry, result, hosts)
            below = layer.backing
            if below is not None and below.layer() is stop:
                result.extend(ChainExtent(start, run, False, False, depth + 1, None)
                              for start, run in unallocated)
                break
            if below is None:
                result.extend(_unallocated_bottom(start, run, depth, hosts.get(start))
                              for start, run in unallocated)
                break
            pending = _clip_to(below, unallocated, result, depth)
            entry, layer, depth = below, below.layer(), depth + 1
        result.sort(key=lambda extent: extent.offset)
        return merge_runs(result)

    def block_status_above(self, base: BlockNode | None, offset: int, length: int
                           ) -> list[ChainExtent]:
        """Status merged over the layers from this one down to, not including,
        ``base`` (None: the whole chain): what commit, stream and rebase ask.
        Ranges no layer above ``base`` decides have ``node`` None, ``data``
        and ``zero`` False."""
        self._check_range(offset, length)
        if length == 0:
            return []
        if base is None:
            return self.block_status(offset, length)
        if base.layer() is self:
            return [ChainExtent(offset, length, False, False, 0, None)]
        if base.layer() not in self.chain():
            raise CorefmtError(f"{base.filename} is not below {self.filename} in its chain")
        return self._walk_chain(offset, length, base=base)

    def is_allocated_above(self, base: BlockNode | None, offset: int, length: int
                           ) -> list[tuple[int, int, bool]]:
        """(offset, length, allocated) runs: whether a layer above ``base``
        decides each range (QEMU's bdrv_is_allocated_above, base excluded)."""
        runs: list[tuple[int, int, bool]] = []
        for extent in self.block_status_above(base, offset, length):
            decided = extent.node is not None or extent.zero
            if runs and runs[-1][2] == decided and runs[-1][0] + runs[-1][1] == extent.offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + extent.length, decided)
            else:
                runs.append((extent.offset, extent.length, decided))
        return runs

    # -- reopening ------------------------------------------------------------------
    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (commit writes into a backing
        image, then puts it back): the driver reopens on a storage opened in
        the new mode; a failure restores the old mode. The image's locks are
        checked for the new mode before anything closes (another process's
        refusal changes nothing) and held throughout."""
        if read_only == self.read_only:
            return
        if self._reopener is None:
            raise CorefmtError(f"{self.filename}: this node cannot be reopened")
        old_mode = self.read_only
        options = self._reopener.context(read_only).options
        with self._tracker.track(0, WHOLE_IMAGE, exclusive=True), \
                locking.reopening(self.storage, self.driver, options, read_only):
            self._close_image_for_reopen()
            try:
                self._open_image_in(read_only)
            except BaseException:
                try:
                    self._open_image_in(old_mode)
                except BaseException:
                    self._closed = True
                raise
        self._invalidate_status()

    def _close_image_for_reopen(self) -> None:
        image = self._image
        if not self.read_only:
            image.flush()
        image.close()
        self.storage.close()
        for role in [role for role in self.children if role not in (ROLE_FILE, "backing")]:
            child = self.children.pop(role)
            child.close()
        self.image = None

    def _open_image_in(self, read_only: bool) -> None:
        assert self._reopener is not None
        storage = self._reopener.storage(read_only)
        self.children[ROLE_FILE] = storage
        self.read_only = read_only
        try:
            context = self._reopener.context(read_only)
            locking.lock_image(storage, self.driver, context.options, read_only)
            image = self.driver.open(storage, context)
        except BaseException:
            storage.close()
            raise
        self.attach(image)
        self._status_cache = self._new_status_cache() if read_only else None

    # -- reads ------------------------------------------------------------------
    def readinto(self, offset: int, buf: bytearray | memoryview,
                 flags: RequestFlags | int = 0) -> None:
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if length == 0:
            return
        flags = int(flags)
        self._observe("read", offset, length)
        start, end = aligned_range(offset, length, self.request_alignment)
        if flags & _OWN_DATA:
            with self._tracker.track(start, end, exclusive=False):
                self._read_layer(offset, view)
            return
        with self._tracker.track(start, end, exclusive=False):
            extents = self._read_extents(offset, view)
        below = [e for e in extents if e.depth > 0 and e.node is not None]
        if below and self._wants_copy_on_read(offset, length, flags):
            for extent in below:
                self.copy_up(extent.offset, extent.length,
                             view[extent.offset - offset:extent.end - offset])

    def _read_extents(self, offset: int, view: memoryview) -> list[ChainExtent]:
        """Fill ``view`` from the chain; the caller holds the tracked range.
        (block_status checks the range again: a truncate the caller waited
        for may have shrunk the image since readinto checked it.)"""
        extents = self.block_status(offset, len(view))
        for extent in extents:
            part = view[extent.offset - offset:extent.end - offset]
            if extent.node is None or extent.zero:
                part[:] = bytes(len(part))
            elif extent.node is self:
                self._read_own(extent.offset, part)
            else:
                # the lower layer's request path (tracking, hooks, filters on the edge)
                extent.node.readinto(extent.offset, part, _OWN_DATA)
        return extents

    def _read_layer(self, offset: int, view: memoryview) -> None:
        """What this layer holds for a range an overlay assigned to it (one
        driver status call, not a walk of the chain below)."""
        for own in self.own_status(offset, len(view)):
            part = view[own.offset - offset:own.end - offset]
            if not own.allocated:
                self._read_extents(own.offset, part)
            elif own.zero:
                part[:] = bytes(len(part))
            else:
                self._read_own(own.offset, part)

    def _read_own(self, offset: int, view: memoryview) -> None:
        image = self._image
        if self._event_sinks:
            self.emit(EVENT_READ)
        step = self._limits.max_transfer
        if step is None or step >= len(view):
            image.readinto(offset, view)  # the common case: one call
            return
        for done in range(0, len(view), step):
            image.readinto(offset + done, view[done:done + step])

    def _read_untracked(self, offset: int, length: int) -> bytes:
        """Read for read-modify-write: an aligned block may run past the end
        of an image whose size is not a multiple of the alignment (zeros)."""
        buf = bytearray(length)
        inside = max(0, min(length, self.virtual_size - offset))
        if inside:
            self._read_extents(offset, memoryview(buf)[:inside])
        return bytes(buf)

    # -- copy-on-read -------------------------------------------------------------
    def _wants_copy_on_read(self, offset: int, length: int, flags: int) -> bool:
        if self.read_only:
            return False
        decision = None
        if self._hooks is not None and self._hooks.corefmt_copy_on_read.get_hookimpls():
            decision = self._hooks.corefmt_copy_on_read(node=self, offset=offset, length=length)
        wanted = bool(flags & _COPY_ON_READ)
        return wanted if decision is None else bool(decision)

    def copy_up(self, offset: int, length: int, data: bytes | memoryview | None = None) -> int:
        """Fill this layer with what the chain below holds for a range widened
        to the copy granularity, where it is still unallocated here; a guest
        write that got there first wins. ``data``, if given, is what a read
        already fetched for [offset, offset+len(data)) and is not read again."""
        self._check_writable()
        self._observe("copy_on_read", offset, length)
        granularity = max(self._limits.copy_granularity, self.request_alignment)
        start = align_down(offset, granularity)
        end = min(align_up(offset + length, granularity), self.virtual_size)
        track_start, track_end = aligned_range(start, end - start, self.request_alignment)
        written = 0
        attempted = False
        try:
            with self._tracker.track(track_start, track_end, exclusive=True):
                for own in self.own_status(start, end - start):
                    if own.allocated:
                        continue  # a guest write landed meanwhile: it wins
                    fill = self._fill_data(own.offset, own.length, offset, data)
                    attempted = True
                    if is_zero(fill) and supports(self._image, "write_zeroes"):
                        self._zero_with_driver(own.offset, own.length, _FILL)
                    else:
                        self._write_aligned(own.offset, memoryview(fill), _FILL)
                    written += own.length
        finally:
            if attempted:
                self._changed()
        return written

    def persist_fills(self) -> None:
        """Make the fills so far durable: a flush, then the driver's own step
        for fills it does not journal (FVD writes its bitmap in place). A
        long prefetch calls this so an interruption loses little progress."""
        self._check_writable()
        self.flush()
        if supports(self._image, "persist_fills"):
            with self._tracker.track(0, WHOLE_IMAGE, exclusive=False):
                self._image.persist_fills()

    def mark_self_contained(self) -> bool:
        """Every byte is in this layer (a prefetch finished): let the driver
        record that the backing is no longer needed (FVD's all_data_in_fvd_img);
        False where the format has no such record."""
        self._check_writable()
        if not supports(self._image, "mark_self_contained"):
            return False
        try:
            with self._tracker.track(0, WHOLE_IMAGE, exclusive=True):
                self._image.mark_self_contained()
        finally:
            self._changed()
        return True

    def _fill_data(self, start: int, length: int, offset: int,
                   data: bytes | memoryview | None) -> bytes | bytearray | memoryview:
        """Below's bytes for [start, start+length): from ``data`` where it covers
        them (it was read from below at ``offset``), the rest read now. Where
        ``data`` covers them all (a prefetch's whole window) it is a view of
        ``data``, not a copy."""
        if data is None:
            return self.read_below(start, length)
        end = start + length
        known_start, known_end = max(start, offset), min(end, offset + len(data))
        if known_start >= known_end:
            return self.read_below(start, length)
        if known_start == start and known_end == end:
            return memoryview(data)[start - offset:end - offset]
        fill = bytearray(length)
        fill[known_start - start:known_end - start] = data[known_start - offset:
                                                           known_end - offset]
        if known_start > start:
            fill[:known_start - start] = self.read_below(start, known_start - start)
        if end > known_end:
            fill[known_end - start:] = self.read_below(known_end, end - known_end)
        return fill

    # -- writes -------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              flags: RequestFlags | int = 0) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if not view:
            return
        flags = int(flags)
        if flags & _COMPRESSED and not supports(self._image, "write_compressed"):
            raise NotSupported(f"{self.filename}: compression is not supported for the "
                               f"{self.format_name} format")
        self._observe("write", offset, len(view))
        start, end = aligned_range(offset, len(view), self.request_alignment)
        try:
            with self._tracker.track(start, end, exclusive=True):
                self._write_aligned(offset, view, flags)
        finally:
            self._changed()  # a failed write may have written part: flush it too

    def prepare_write(self, offset: int, data: bytes | bytearray | memoryview,
                      flags: RequestFlags | int = 0) -> Callable[[], None]:
        """The image's ``prepare_write`` where it has one (qcow2 compresses
        there), for a request it takes as it is; otherwise the whole write
        later. The returned callable stores the data as ``write`` would."""
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        flags = int(flags)
        limits = self._limits
        alignment = self.request_alignment
        if (not view or not supports(self._image, "prepare_write")
                or (limits.max_transfer is not None and len(view) > limits.max_transfer)
                or offset % alignment or len(view) % alignment):
            return functools.partial(self.write, offset, view, flags)
        if flags & _COMPRESSED and not supports(self._image, "write_compressed"):
            raise NotSupported(f"{self.filename}: compression is not supported for the "
                               f"{self.format_name} format")
        store = self._image.prepare_write(offset, view, RequestFlags(flags))

        def commit() -> None:
            self._check_writable()
            self._observe("write", offset, len(view))
            try:
                with self._tracker.track(offset, offset + len(view), exclusive=True):
                    if self._event_sinks:
                        self.emit(EVENT_WRITE)
                    store()
            finally:
                self._changed()
        return commit

    def _write_aligned(self, offset: int, view: memoryview, flags: int) -> None:
        write_unaligned(offset, view, self.request_alignment, self._read_untracked,
                        lambda at, piece: self._write_own(at, piece, flags))

    def _write_own(self, offset: int, data: bytes | memoryview, flags: int) -> None:
        """An aligned write to the driver, cut at max_transfer, flags honoured."""
        image = self._image
        view = memoryview(data)
        if self._event_sinks:
            self.emit(EVENT_WRITE)
        step = self._limits.max_transfer
        if (step is None or step >= len(view)) and not self._write_takes_flags:
            image.write(offset, view)  # the common case: one call
            if flags & _FUA:
                image.flush()
            return
        step = step or len(view)
        for done in range(0, len(view), step):
            if self._write_takes_flags:
                image.write(offset + done, view[done:done + step], flags=RequestFlags(flags))
            else:
                image.write(offset + done, view[done:done + step])
        if flags & _FUA and not self._write_takes_flags:
            image.flush()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     flags: RequestFlags | int = 0) -> None:
        """Make a range read as zeros (by the driver where it can, else by
        writing zeros, unless NO_FALLBACK asks to fail instead)."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        flags = int(flags)
        if unmap:
            flags |= _MAY_UNMAP
        self._observe("write_zeroes", offset, length)
        start, end = aligned_range(offset, length, self.request_alignment)
        try:
            with self._tracker.track(start, end, exclusive=True):
                self._zero_with_driver(offset, length, flags)
        finally:
            self._changed()

    def _zero_with_driver(self, offset: int, length: int, flags: int) -> None:
        alignment = max(self._limits.zeroes_alignment, self.request_alignment)
        end = offset + length
        inner_start, inner_end = align_up(offset, alignment), align_down(end, alignment)
        if inner_end <= inner_start:
            self._zero_fallback(offset, length, flags)
            return
        if inner_start > offset:
            self._zero_fallback(offset, inner_start - offset, flags)
        try:
            self._driver_zeroes(inner_start, inner_end - inner_start, flags)
        except NotSupported:
            self._zero_fallback(inner_start, inner_end - inner_start, flags)
        if end > inner_end:
            self._zero_fallback(inner_end, end - inner_end, flags)

    def _driver_zeroes(self, offset: int, length: int, flags: int) -> None:
        image = self._image
        if not supports(image, "write_zeroes"):
            raise NotSupported(f"{self.filename}: the {self.format_name} format cannot "
                               "write zeroes efficiently")
        unmap = bool(flags & _MAY_UNMAP)
        step = self._limits.max_transfer or length
        self.emit(EVENT_WRITE)
        for done in range(0, length, step):
            piece = min(step, length - done)
            if self._zeroes_take_flags:
                image.write_zeroes(offset + done, piece, unmap, flags=RequestFlags(flags))
            else:
                image.write_zeroes(offset + done, piece, unmap)
        if flags & _FUA and not self._zeroes_take_flags:
            image.flush()

    def _zero_fallback(self, offset: int, length: int, flags: int) -> None:
        if flags & _NO_FALLBACK:
            raise NotSupported(f"{self.filename}: cannot zero {length} bytes at {offset} "
                               "without writing them")
        self._write_zero_bytes(offset, length, flags & ~_MAY_UNMAP)

    def _write_zero_bytes(self, offset: int, length: int,
                          flags: RequestFlags | int = 0) -> None:
        position, end = offset, offset + length
        while position < end:
            step = min(ZERO_WRITE_CHUNK, end - position)
            self._write_aligned(position, memoryview(_ZEROS)[:step], flags)
            position += step

    def discard(self, offset: int, length: int) -> None:
        """Tell the image a range is unused; a no-op for drivers that cannot."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0 or not supports(self._image, "discard"):
            return
        self._observe("discard", offset, length)
        alignment = max(self._limits.discard_alignment, self.request_alignment)
        inner_start = align_up(offset, alignment)
        inner_end = align_down(offset + length, alignment)
        if inner_end <= inner_start:
            return
        step = self._limits.max_transfer or (inner_end - inner_start)
        try:
            with self._tracker.track(inner_start, inner_end, exclusive=True):
                try:
                    for position in range(inner_start, inner_end, step):
                        self._image.discard(position, min(step, inner_end - position))
                except NotSupported:
                    pass  # discard is a hint: declining it loses nothing
        finally:
            self._changed()

    def _changed(self) -> None:
        """A request changed the image: status above is stale, a flush is due."""
        self._write_generation += 1
        self._invalidate_status()

    def flush(self) -> None:
        """Make every completed write durable; nothing to do (no event, no
        driver flush) when nothing was written since the last one, as qemu."""
        if self.read_only or self.no_flush:
            return
        generation = self._write_generation
        if generation == self._flushed_generation:
            return
        self._observe("flush", 0, 0)
        self.emit(EVENT_FLUSH)
        self._image.flush()
        self._flushed_generation = generation

    def truncate(self, size: int, preallocation: str = PREALLOCATION_OFF) -> None:
        self._check_writable()
        if size < 0:
            raise RangeError(f"{self.filename}: size must not be negative")
        if not supports(self._image, "truncate"):
            raise CorefmtError(f"{self.filename}: format {self.format_name} cannot be resized")
        takes_mode = accepts_keyword(self._image.truncate, "preallocation")
        if preallocation != PREALLOCATION_OFF and not takes_mode:
            raise NotSupported(f"Unsupported preallocation mode: {preallocation}")
        try:
            with self._tracker.track(0, max(size, self.virtual_size) + 1, exclusive=True):
                if takes_mode:
                    self._image.truncate(size, preallocation=preallocation)
                else:
                    self._image.truncate(size)
        finally:
            self._changed()

    # -- lifetime -------------------------------------------------------------------
    def _release(self) -> None:
        storage = self.storage
        try:
            if self.image is not None:
                if not (self.read_only or self.no_flush) and \
                        self._write_generation != self._flushed_generation:
                    self.image.flush()  # close promises a durable image
                self.image.close()
            else:
                storage.close()
        finally:
            storage.close()
            for role, child in self.children.items():
                if role != ROLE_FILE and not isinstance(child, BlockNode):
                    child.close()  # a Storage child (data file)


def _clip_extent(extent: Extent, start: int, end: int) -> Extent:
    """The part of a layer's extent inside [start, end)."""
    if start == extent.offset and end == extent.offset + extent.length:
        return extent
    host = None if extent.host_offset is None else extent.host_offset + start - extent.offset
    return attrs.evolve(extent, offset=start, length=end - start, host_offset=host)


def _unallocated_bottom(offset: int, length: int, depth: int, own: Extent | None
                        ) -> ChainExtent:
    """A range no layer decides: zeros, with the bottom layer's host place if
    it reported one (qemu-img map prints its offset)."""
    if own is None or own.host_offset is None:
        return ChainExtent(offset, length, False, True, depth, None)
    return ChainExtent(offset, length, False, True, depth, None, own.host_offset, False,
                       own.host_child)


def _chain_extent(extent: Extent, depth: int, node: BlockNode) -> ChainExtent:
    return ChainExtent(extent.offset, extent.length, extent.data, extent.zero, depth, node,
                       extent.host_offset, extent.compressed, extent.host_child)


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

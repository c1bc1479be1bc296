"""Changing an image's backing file (qemu-img rebase), for any format.

Safe mode keeps the guest view: wherever the image does not hold a range
itself and the old and new backing chains would read differently, the old
chain's bytes are copied into the image before the reference changes.
Cost follows the allocated data, not the virtual size: the two chains'
block status is walked above their common base (a layer both chains
contain, found by file identity), and only ranges where either side has
data are read and compared; holes and zero ranges on both sides, and
ranges both sides leave to the common base, are never read. A crash
during the copy changes nothing a guest sees (the old chain is still the
one in use), so a rerun simply goes on.

``-u`` only rewrites the reference; an empty new name flattens (the image
no longer depends on anything; a format that records completion, FVD, is
filled completely and marked).
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from corefmt import plugins
from corefmt.block.chain import open_chain, printable, version_of
from corefmt.block.node import BlockNode
from corefmt.buffers import same_bytes, zero_bytes
from corefmt.driver import supports
from corefmt.errors import CorefmtError
from corefmt.flags import RequestFlags
from corefmt.limits import Limits
from corefmt.ops.backing import change_backing, drop_backing, find_layer, same_file
from corefmt.ops.convert_settings import CACHE_MODES
from corefmt.registry import Registry

ProgressFn = Callable[[int, int], None]

#: Bytes read from each chain at once when comparing.
COMPARE_CHUNK = 4 * 1024 * 1024
#: A differing chunk is compared in blocks of this size first (or of one
#: allocation unit, if larger), then unit by unit.
COMPARE_BLOCK = 64 * 1024
#: qemu's compare_buffers works in 512-byte sectors.
SECTOR = 512
#: Own status is walked in windows this long (bounds the extent list).
STATUS_WINDOW = 1024 * 1024 * 1024
COMPRESSION_UNSUPPORTED = "Compression not supported for this file format"
#: Chunks read ahead of the one being compared and written.
READ_AHEAD_CHUNKS = 2
#: What the reader puts in its queue besides chunks.
_DONE, _REPORT = object(), object()


class RebaseError(CorefmtError):
    """qemu-img rebase refused or failed (exit status 1)."""


class Side(enum.Enum):
    """What one chain shows over a range, above the common base."""

    BASE = "base"  # left to the common base: the same bytes on both sides
    ZERO = "zero"
    DATA = "data"


def _side_runs(node: BlockNode | None, base: BlockNode | None, start: int, end: int
               ) -> Iterator[tuple[int, int, Side]]:
    """(start, end, Side) runs of one chain over [start, end)."""
    if node is None:
        yield start, end, Side.ZERO
        return
    inside = min(end, node.virtual_size)
    if start < inside:
        for extent in node.block_status_above(base, start, inside - start):
            if extent.zero or (extent.node is None and base is None):
                side = Side.ZERO
            elif extent.node is None:
                side = Side.BASE
            else:
                side = Side.DATA
            yield extent.offset, extent.offset + extent.length, side
    if end > max(start, inside):
        yield max(start, inside), end, Side.ZERO  # past a shorter backing: zeros


def _pieces(old: Iterator[tuple[int, int, Side]], new: Iterator[tuple[int, int, Side]]
            ) -> Iterator[tuple[int, int, Side, Side]]:
    """Both sides' runs cut at every boundary of either."""
    old_run, new_run = next(old, None), next(new, None)
    while old_run is not None and new_run is not None:
        start = max(old_run[0], new_run[0])
        end = min(old_run[1], new_run[1])
        if start < end:
            yield start, end, old_run[2], new_run[2]
        if old_run[1] == end:
            old_run = next(old, None)
        if new_run[1] == end:
            new_run = next(new, None)


def differing_runs(old: bytes | bytearray | memoryview, new: bytes | bytearray | memoryview,
                   unit: int = SECTOR, origin: int = 0) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs where two equal-length buffers differ, in
    whole ``unit``s counted from offset 0 of the image (the buffers start at
    ``origin``; a unit cut by a buffer's end counts as its part there).

    With 512-byte units this is qemu's compare_buffers. The rebase writes
    whole allocation units: the format fills the rest of a partly written
    unit from the old backing, whose bytes there equal what is written, so
    the image ends up the same and far fewer pieces are compared one by one
    in Python (each comparison is a memcmp: see corefmt.buffers)."""
    old_view, new_view = memoryview(old), memoryview(new)
    length = len(old_view)
    block = max(unit, COMPARE_BLOCK // unit * unit)
    run_start: int | None = None
    position = 0
    while position < length:
        step = min(block - (origin + position) % block, length - position)
        if same_bytes(old_view[position:position + step], new_view[position:position + step]):
            if run_start is not None:
                yield run_start, position
                run_start = None
        elif (origin + position) // unit == (origin + position + step - 1) // unit:
            if run_start is None:  # inside one unit, which differs
                run_start = position
        else:
            left = bytes(old_view[position:position + step])
            right = bytes(new_view[position:position + step])
            at = 0
            while at < step:
                piece = min(unit - (origin + position + at) % unit, step - at)
                if left[at:at + piece] != right[at:at + piece]:
                    if run_start is None:
                        run_start = position + at
                elif run_start is not None:
                    yield run_start, position + at
                    run_start = None
                at += piece
        position += step
    if run_start is not None:
        yield run_start, length


def compare_unit(limits: Limits, compress: bool = False) -> int:
    """The unit a rebase compares and writes in: the image's allocation
    unit where that is whole sectors, else qemu's sector; with -c the copy
    granularity (whole clusters can be stored compressed: qemu 8.2's
    rebase aligns its writes to clusters for -c, to subclusters else)."""
    unit = limits.copy_granularity if compress else limits.allocation_unit
    return unit if unit % SECTOR == 0 else SECTOR


class _Copier:
    """Copies into the image what the old chain shows where the new differs.

    A reader thread reads both chains' next chunks while this thread
    compares and writes the current one: the reads and the writes are the
    kernel's copies, which then run on two cores instead of one after the
    other (qemu-img rebase does them in turn)."""

    def __init__(self, top: BlockNode, old: BlockNode | None, old_base: BlockNode | None,
                 new: BlockNode | None, new_base: BlockNode | None, *,
                 compress: bool, progress: ProgressFn | None):
        self.top, self.old, self.old_base = top, old, old_base
        self.new, self.new_base = new, new_base
        self.compress = compress
        self.unit = compare_unit(top.limits, compress)
        self.progress = progress
        self.copied = 0
        self._stopping = False

    def run(self) -> int:
        # Reused for every chunk (fresh 4 MiB buffers cost page faults): a
        # pair being compared, one being read, one waiting in between.
        free: queue.Queue[tuple[bytearray, bytearray]] = queue.Queue()
        for _ in range(READ_AHEAD_CHUNKS + 1):
            free.put((bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK)))
        ready: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(target=self._reader, args=(free, ready),
                                  name="corefmt-rebase-read", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if item[0] is _REPORT:
                    self._report(item[1], item[2])
                    continue
                start, end, views, buffers = item
                try:
                    self._compare(start, end, *views)
                finally:
                    free.put(buffers)
        finally:
            self._stopping = True
            free.put((bytearray(), bytearray()))  # wakes a reader waiting for buffers
            reader.join()
        return self.copied

    def _reader(self, free: queue.Queue, ready: queue.Queue) -> None:
        try:
            top = self.top
            size = top.virtual_size
            for window in range(0, size, STATUS_WINDOW):
                window_end = min(window + STATUS_WINDOW, size)
                for own in top.own_status(window, window_end - window):
                    if not own.allocated:
                        for start, end, old_side, new_side in self._chunks(own.offset,
                                                                           own.end):
                            buffers = free.get()
                            if self._stopping:
                                return
                            views = (self._read(self.old, old_side, start, end, buffers[0]),
                                     self._read(self.new, new_side, start, end, buffers[1]))
                            ready.put((start, end, views, buffers))
                    ready.put((_REPORT, own.offset + own.length, size))
            if not size:
                ready.put((_REPORT, 0, 0))
            ready.put(_DONE)
        except BaseException as error:  # raised again by run, on its thread
            ready.put(error)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _chunks(self, start: int, end: int) -> Iterator[tuple[int, int, Side, Side]]:
        """The chunks of [start, end) to compare, with what each side shows."""
        old = _side_runs(self.old, self.old_base, start, end)
        new = _side_runs(self.new, self.new_base, start, end)
        for piece_start, piece_end, old_side, new_side in _pieces(old, new):
            if old_side is new_side and old_side is not Side.DATA:
                continue  # both zeros, or both the common base's bytes
            for chunk in range(piece_start, piece_end, COMPARE_CHUNK):
                yield chunk, min(chunk + COMPARE_CHUNK, piece_end), old_side, new_side

    def _read(self, node: BlockNode | None, side: Side, start: int, end: int,
              buffer: bytearray) -> memoryview:
        if side is Side.ZERO or node is None:
            return memoryview(zero_bytes(COMPARE_CHUNK))[:end - start]
        view = memoryview(buffer)[:end - start]
        node.readinto(start, view)
        return view

    def _compare(self, start: int, end: int, view: memoryview, new_data: memoryview) -> None:
        if same_bytes(view, new_data):
            return
        # As qemu-img 7.2: zeroes are written as such only past the old
        # backing's end; zeros it holds are copied as data.
        old_end = self.old.virtual_size if self.old is not None else 0
        for run_start, run_end in differing_runs(view, new_data, self.unit, start):
            at, length = start + run_start, run_end - run_start
            if at >= old_end:
                self.top.write_zeroes(at, length)
            else:
                self._write(at, view[run_start:run_end])
            self.copied += length

    def _write(self, offset: int, data: memoryview) -> None:
        if not self.compress:
            self.top.write(offset, data)
            return
        cluster = max(self.top.limits.copy_granularity, 1)
        first = -(-offset // cluster) * cluster
        last = (offset + len(data)) // cluster * cluster
        if first >= last:
            self.top.write(offset, data)
            return
        head, tail = first - offset, last - offset
        if head:
            self.top.write(offset, data[:head])
        self.top.write(first, data[head:tail], RequestFlags.COMPRESSED)
        if tail < len(data):
            self.top.write(last, data[tail:])


def _common_base(old: BlockNode | None, new: BlockNode | None
                 ) -> tuple[BlockNode | None, BlockNode | None]:
    """The highest layer of the new chain that the old chain has too, as a
    node of each chain (the same file below means the same bytes)."""
    if old is None or new is None:
        return None, None
    old_layers = {same_file(layer.filename): layer for layer in old.chain()}
    for layer in new.chain():
        found = old_layers.get(same_file(layer.filename))
        if found is not None:
            return found, layer
    return None, None


def rebase_node(node: BlockNode, new: BlockNode | None, path: str | None,
                format: str | None, *, unsafe: bool = False, compress: bool = False,
                progress: ProgressFn | None = None, identity: str | None = None) -> int:
    """Rebase an image opened read-write (with its old chain unless
    ``unsafe``) onto ``new`` (opened by the caller; None: no backing), then
    record ``path``/``format`` (and the version of a remote ``new``, or
    ``identity`` where ``new`` was not opened). Returns the bytes copied."""
    top = node.layer()
    copied = 0
    if compress and not supports(top.image, "write_compressed"):
        raise RebaseError(COMPRESSION_UNSUPPORTED)
    if not unsafe:
        old = top.backing
        old_base, new_base = _common_base(old, new)
        copied = _Copier(top, old, old_base, new, new_base, compress=compress,
                         progress=progress).run()
    if path:
        change_backing(top, path, format, identity=version_of(new) if new else identity)
    elif not unsafe:
        drop_backing(top)
    else:
        change_backing(top, None, None)
    return copied


def rebase(image: str | Mapping[str, Any], backing: str | None,
           backing_format: str | None = None, *, format: str | None = None,
           unsafe: bool = False, compress: bool = False, progress: ProgressFn | None = None,
           cache: str = "writeback", source_cache: str = "writeback",
           force_share: bool = False, allow_protocols: Collection[str] = (),
           registry: Registry | None = None) -> int:
    """qemu-img rebase: ``backing`` None or "" removes the backing file.
    Returns the bytes copied into the image."""
    for mode, what in ((cache, "cache"), (source_cache, "source cache")):
        if mode not in CACHE_MODES:
            raise RebaseError(f"Invalid {what} option: {mode}")
    registry = registry or plugins.registry()
    direct = CACHE_MODES[cache][0]
    source_direct = CACHE_MODES[source_cache][0]
    with open_chain(image, format, read_only=False, backing=not unsafe, direct=direct,
                    registry=registry, allow_protocols=allow_protocols) as node:
        if backing_format is not None and backing_format not in registry.formats:
            raise RebaseError(f"Invalid format name: '{backing_format}'")
        target = registry.resolve(backing, node.filename) if backing else None
        if unsafe or target is None:
            version = _remote_version(target, registry) if target else None
            return rebase_node(node, None, backing, backing_format, unsafe=unsafe,
                               compress=compress, progress=progress, identity=version)
        reused = find_layer(node, target)
        if reused is not None:
            return rebase_node(node, reused, backing, backing_format, compress=compress,
                               progress=progress)
        try:
            new = open_chain(target, backing_format, read_only=True, direct=source_direct,
                             registry=registry, allow_protocols=allow_protocols,
                             force_share=force_share)
        except CorefmtError as error:
            raise RebaseError(f"Could not open new backing file '{printable(backing)}': "
                              f"{_opening_error(printable(target), error)}") from None
        with new:
            return rebase_node(node, new, backing, backing_format, compress=compress,
                               progress=progress)


def _remote_version(target: str, registry: Registry) -> str | None:
    """The version of a remote backing that ``-u`` names, from its storage
    alone (the image is not opened, as qemu's -u): the user who says the
    base on the server now is the right one gets it checked from then on.
    None for a local file or a server that cannot be reached."""
    driver = registry.storage_for(target)
    if driver.name == "file":
        return None
    try:
        storage = driver.open(target, read_only=True)
    except CorefmtError:  # unreachable, refused, unsigned: -u goes on without it
        return None
    try:
        return storage.version_token()
    finally:
        storage.close()


def _opening_error(target: str, error: CorefmtError) -> str:
    """qemu's reason for a backing that does not open."""
    text = str(error)
    if "No such file or directory" in text:
        return f"Could not open '{target}': No such file or directory"
    return text

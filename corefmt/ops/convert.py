"""Converting any image (chain) to any format.

Speed comes from extents: ranges the source's chain reports as zero or
unallocated are never read; data ranges move in large buffers (readinto)
on a pool of threads (pread/pwrite release the GIL); zero runs inside data
are detected at ``sparse_size`` granularity (with memcmp, not in Python) and
skipped, since a new image reads as zeros; the target is flushed in the
background as the copy goes, so the final flush has little left to wait for.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.buffers import is_zero, zero_bytes
from corefmt.driver import supports
from corefmt.errors import CorefmtError, OptionError, error_reason
from corefmt.filters.throttle import RateLimit
from corefmt.flags import RequestFlags
from corefmt.ops.convert_settings import (
    CACHE_MODES,
    DEFAULT_CACHE_MODE,
    DEFAULT_WORKERS,
    RATE_LIMIT_INVALID,
)
from corefmt.ops.create import GENERIC_SIZE_KEY, create
from corefmt.ops.status_walk import chain_extents  # plugins import it from here too
from corefmt.options import parse_option_string
from corefmt.registry import Registry
from corefmt.storage import locking

DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024
DEFAULT_SPARSE_SIZE = 4096
#: convert flushes the target in the background each time this many bytes
#: have been copied since the last flush started (see _BackgroundFlush).
FLUSH_INTERVAL = 128 * 1024 * 1024
#: Compressing threads per request in flight for convert -c (see _copy_compressed).
COMPRESS_THREADS_PER_REQUEST = 2
#: qemu-img convert -c's refusal for a format that cannot compress.
COMPRESSION_UNSUPPORTED = "Compression not supported for this file format"

ProgressFn = Callable[[int, int], None]


@attrs.frozen
class CopyMode:
    """How copy_node treats what it copies: qemu-img convert's options."""

    #: Zero runs at least this long inside data are not written (-S; 0: off).
    sparse_size: int = DEFAULT_SPARSE_SIZE
    #: The target reads as zeros already: zero ranges are skipped.
    target_zeroed: bool = False
    #: -S 0: zero ranges are written as data too: the target is fully allocated.
    full_allocation: bool = False
    #: -B: only what the source's top layer decides is copied; the rest is
    #: left unallocated, for the target's backing to show.
    top_only: bool = False
    #: -r: bytes per second written at most (0: no limit).
    rate_limit: int = 0
    #: --salvage: a failed read is retried sector by sector; what still
    #: fails reads as zeros and is reported through ``warn``.
    salvage: bool = False
    warn: Callable[[str], None] | None = None
    #: -C: data moves with copy_file_range where source and target are
    #: plain local files (raw on raw), without passing through here.
    copy_offload: bool = False
    #: Writes in guest order, reads running ahead (qemu-img convert without
    #: -W): a format that allocates as it is written (qcow2) is laid out
    #: sequentially. False lets writes complete in any order.
    in_order: bool = False


#: --salvage retries a failed read in pieces of this size (qemu: a sector).
SALVAGE_SECTOR = 512


class _Offload:
    """-C: copy_file_range between two plain local files (raw on raw, one
    layer each), so data moves inside the kernel or the file system (a
    reflink on btrfs/XFS). The first refusal turns it off for the run, and
    the piece is copied the ordinary way, as qemu-img falls back."""

    def __init__(self, source_fd: int, source_offset: int, target_fd: int,
                 target_offset: int):
        self.source_fd, self.source_offset = source_fd, source_offset
        self.target_fd, self.target_offset = target_fd, target_offset
        self.working = True

    @classmethod
    def between(cls, source: BlockNode, target: BlockNode) -> _Offload | None:
        ends = []
        for node in (source, target):
            layer = node.layer()
            image = getattr(layer, "image", None)
            fd = getattr(getattr(image, "storage", None), "fd", None)
            if (layer is not node or layer.format_name != "raw" or len(node.chain()) != 1
                    or fd is None or not hasattr(os, "copy_file_range")):
                return None
            ends.append((fd, getattr(image, "offset", 0)))
        return cls(*ends[0], *ends[1])

    def copy(self, offset: int, length: int, limit: RateLimit | None) -> bool:
        if not self.working:
            return False
        if limit is not None:
            limit.take(length)
        done = 0
        try:
            while done < length:
                moved = os.copy_file_range(self.source_fd, self.target_fd, length - done,
                                           self.source_offset + offset + done,
                                           self.target_offset + offset + done)
                if moved <= 0:
                    raise OSError("copy_file_range copied nothing")
                done += moved
        except OSError:
            self.working = False
            return False
        return True


class _Turnstile:
    """Writes in guest order while reads run ahead (qemu-img convert without
    -W): a request reads on its worker, then waits for the one before it to
    have written. A failure anywhere breaks the turnstile, so no worker
    waits for a turn that will never come."""

    def __init__(self) -> None:
        self._next = 0
        self._broken = False
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def turn(self, number: int) -> Iterator[None]:
        with self._changed:
            while self._next != number and not self._broken:
                self._changed.wait()
            if self._broken:
                raise CorefmtError("convert stopped: an earlier request failed")
        try:
            yield
        except BaseException:
            self.abort()
            raise
        with self._changed:
            self._next = number + 1
            self._changed.notify_all()

    def abort(self) -> None:
        with self._changed:
            self._broken = True
            self._changed.notify_all()


#: What a piece of the source is to the copy (data_chunks).
DATA, ZERO, BACKING = "data", "zero", "backing"


def data_chunks(node: BlockNode, buffer_size: int, start: int = 0, end: int | None = None,
                *, mode: CopyMode | None = None) -> Iterator[tuple[int, int, str]]:
    """(offset, length, kind) pieces of the chain: DATA pieces of at most
    ``buffer_size``, ZERO ranges (cut like data when the target is to be
    fully allocated), and with ``mode.top_only`` BACKING ranges the source's
    top layer leaves to its backing (the target's backing shows there)."""
    mode = mode or CopyMode()
    base = node.layer().backing if mode.top_only else None
    for extent in chain_extents(node, start, end, base=base):
        if base is not None and extent.node is None and not extent.zero:
            yield extent.offset, extent.length, BACKING
            continue
        kind = ZERO if extent.zero or extent.node is None else DATA
        if kind == ZERO and not mode.full_allocation:
            yield extent.offset, extent.length, ZERO
            continue
        position = extent.offset
        while position < extent.end:
            step = min(buffer_size - position % buffer_size, extent.end - position)
            yield position, step, kind
            position += step


def zero_runs(view: memoryview, granularity: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_zero) runs of a buffer, judged ``granularity`` bytes at a time."""
    length = len(view)
    if is_zero(view):  # a few memcmps decide the common all-zero case
        yield 0, length, True
        return
    if granularity >= length:
        yield 0, length, False
        return
    zero_block = zero_bytes(granularity)
    run_start = 0
    run_zero: bool | None = None
    position = 0
    while position < length:
        step = min(granularity, length - position)
        block = view[position:position + step]
        block_zero = zero_block == block if step == granularity else is_zero(block)
        if run_zero is None:
            run_zero = block_zero
        elif block_zero != run_zero:
            yield run_start, position - run_start, run_zero
            run_start, run_zero = position, block_zero
        position += step
    yield run_start, length - run_start, bool(run_zero)


def cluster_chunks(node: BlockNode, buffer_size: int, cluster: int, *,
                   base: BlockNode | None = None, everything: bool = False
                   ) -> Iterator[tuple[int, int]]:
    """(offset, length) windows that cover the chain's data in whole
    clusters of the target (a compressed write must be whole clusters; only
    the disk's last one may be short), each at most ``buffer_size`` rounded
    down to clusters. Zero and unallocated ranges between them are skipped,
    unless ``everything`` (-S 0); with ``base``, only the layers above it
    count (-B). Zero ranges above ``base`` are covered: they must read as
    zeros over the target's backing."""
    size = node.virtual_size
    step = max(cluster, buffer_size // cluster * cluster)
    if everything:
        yield from _windows(0, size, step)
        return
    start = end = -1
    for extent in chain_extents(node, base=base):
        if extent.node is None and not (base is not None and extent.zero):
            continue
        if extent.zero and base is None:
            continue
        first = extent.offset // cluster * cluster
        last = min(size, -(-extent.end // cluster) * cluster)
        if first <= end:
            end = max(end, last)
            continue
        if end > start:
            yield from _windows(start, end, step)
        start, end = first, last
    if end > start:
        yield from _windows(start, end, step)


def _windows(start: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    for offset in range(start, end, step):
        yield offset, min(step, end - offset)


class _Copier:
    """Copies one piece; each worker thread reuses its own buffer."""

    def __init__(self, source: BlockNode, target: BlockNode, buffer_size: int,
                 mode: CopyMode):
        self.source = source
        self.target = target
        self.buffer_size = buffer_size
        self.mode = mode
        self.target_zeroed = mode.target_zeroed
        self._limit = RateLimit(mode.rate_limit) if mode.rate_limit > 0 else None
        self._offload = _Offload.between(source, target) if mode.copy_offload else None
        #: Set by copy_node when the target's layout follows the write order.
        self.turnstile: _Turnstile | None = None
        self._local = threading.local()

    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = bytearray(self.buffer_size)
        return buf

    def copy(self, offset: int, length: int, kind: str, turn: int | None = None) -> int:
        """Copy one piece; with ``turn``, its writes wait for the pieces
        before it (see _Turnstile)."""
        mode = self.mode
        ordered = (self.turnstile.turn(turn) if turn is not None and self.turnstile
                   else contextlib.nullcontext())
        if kind == BACKING:
            return length
        if kind == ZERO:
            with ordered:
                if mode.full_allocation:
                    self._write(offset, memoryview(zero_bytes(length)))
                elif not self.target_zeroed:
                    self._zero(offset, length)
            return length
        if self._offload is not None:
            with ordered:
                if self._offload.copy(offset, length, self._limit):
                    return length
            ordered = contextlib.nullcontext()  # the turn is taken: the fallback writes now
        buffer = self._buffer()
        view = memoryview(buffer)[:length]
        try:
            self._read(offset, view)
        except BaseException:
            if self.turnstile is not None:
                self.turnstile.abort()
            raise
        sparse = 0 if mode.full_allocation else mode.sparse_size
        with ordered:
            if sparse <= 0 or _no_zero_block(buffer, length, sparse):
                self._write(offset, view)
                return length
            for start, run, zero in zero_runs(view, sparse):
                if not zero:
                    self._write(offset + start, view[start:start + run])
                elif not self.target_zeroed:
                    self._zero(offset + start, run)
        return length

    def _read(self, offset: int, view: memoryview) -> None:
        """Read a piece; with --salvage a failed read is retried sector by
        sector and what still fails reads as zeros, reported as qemu-img
        reports it ("error while reading offset N: reason")."""
        try:
            self.source.readinto(offset, view)
            return
        except CorefmtError:
            if not self.mode.salvage:
                raise
        for start in range(0, len(view), SALVAGE_SECTOR):
            piece = view[start:start + SALVAGE_SECTOR]
            try:
                self.source.readinto(offset + start, piece)
            except CorefmtError as error:
                piece[:] = bytes(len(piece))
                if self.mode.warn is not None:
                    self.mode.warn(f"error while reading offset {offset + start}: "
                                   f"{error_reason(error)}")

    def _write(self, offset: int, view: memoryview) -> None:
        if self._limit is not None:
            self._limit.take(len(view))
        self.target.write(offset, view)

    def _zero(self, offset: int, length: int) -> None:
        """Zeros where the target does not read as zeros: qemu-img asks
        write_zeroes with MAY_UNMAP (a hole where the target can punch one)."""
        self.target.write_zeroes(offset, length, unmap=True)

    def prepare_compressed(self, offset: int, length: int, cluster: int
                           ) -> list[Callable[[], None]]:
        """Read a window and compress its clusters here, on a worker thread;
        what is returned stores them, called in guest order by the caller.
        All-zero clusters are left out (zeroed if the target does not read
        as zeros), as qemu-img convert -c leaves them."""
        buffer = bytearray(length)  # its own: it lives until the stores ran
        view = memoryview(buffer)
        self.source.readinto(offset, view)
        steps: list[Callable[[], None]] = []
        run_start = None
        for start in [*range(0, length, cluster), length]:  # the end closes the last run
            zero = (start < length and not self.mode.full_allocation
                    and is_zero(view[start:start + cluster]))
            if start < length and not zero:
                if run_start is None:
                    run_start = start
                continue
            if run_start is not None:
                steps.append(self.target.prepare_write(offset + run_start,
                                                       view[run_start:start],
                                                       RequestFlags.COMPRESSED))
                run_start = None
            if zero and not self.target_zeroed:
                piece = min(cluster, length - start)
                steps.append(functools.partial(self.target.write_zeroes, offset + start, piece))
        return steps


#: What _no_zero_block reads of each block first: one native 8-byte word.
FIRST_WORD_FORMAT, FIRST_WORD_BYTES = "Q", 8


def _no_zero_block(buffer: bytearray, length: int, granularity: int) -> bool:
    """True if ``zero_runs(buffer[:length], granularity)`` is surely one data run.

    The common case for data, so it is worth a shortcut. First the first
    8-byte word of every block, read in one strided pass (512 words for
    2 MiB of 4 KiB blocks): if none is zero, no block is (zero_runs judges
    blocks from the buffer's start). Else one ``bytearray.find`` of a zero
    block (a skipping search, but through the whole buffer with the GIL
    held: 14 % of a raw->qcow2 convert's GIL time) proves there is none at
    any alignment. Only a short tail block is left to judge. False means
    "look block by block": a zero run may still straddle block boundaries
    without covering a block.
    """
    tail = length % granularity  # the whole buffer when it is shorter than a block
    if not _first_words_nonzero(buffer, length - tail, granularity) and (
            buffer.find(zero_bytes(granularity), 0, length) >= 0):
        return False  # some block starts with a zero word, and a zero block is there
    return tail == 0 or not is_zero(memoryview(buffer)[length - tail:length])


def _first_words_nonzero(buffer: bytearray, whole: int, granularity: int) -> bool:
    """Whether each ``granularity``-byte block of ``buffer[:whole]`` starts
    with a nonzero word (False where the words cannot be taken)."""
    if not whole or granularity % FIRST_WORD_BYTES:
        return False
    words = memoryview(buffer)[:whole].cast(FIRST_WORD_FORMAT)
    return 0 not in words[::granularity // FIRST_WORD_BYTES]


class _BackgroundFlush:
    """Flushes a node on a thread of its own as the copy goes.

    Why: a single flush at the end waits for all the data to reach the disk
    after the copy is done (fdatasync of 1.6 GiB took 0.5-0.8 s, about 40 %
    of a 4 GiB raw conversion). Flushing every ``interval`` copied bytes
    overlaps the disk's writeback with the copy, so the final flush finds
    little left to do. At most one flush runs at a time, and nothing waits
    for one except ``finish``; flush errors are raised, never lost.
    """

    def __init__(self, node: BlockNode, interval: int):
        self._node = node
        self._interval = interval
        self._since = 0
        self._running: Future[None] | None = None
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="corefmt-flush")
                          if interval > 0 else None)

    def copied(self, length: int) -> None:
        if self._executor is None:
            return
        self._since += length
        if self._since < self._interval:
            return
        if self._running is not None:
            if not self._running.done():
                return  # the flush in progress will take these bytes too
            self._running.result()
        self._running = self._executor.submit(self._node.flush)
        self._since = 0

    def finish(self, *, raise_error: bool = True) -> None:
        """Wait for the flush in progress (the node must not close under it);
        raise its error unless another error is already on its way."""
        if self._executor is None:
            return
        self._executor.shutdown(wait=True)
        if raise_error and self._running is not None:
            self._running.result()


def convert(source: str | Mapping[str, Any], target: str, *, source_format: str | None = None,
            target_format: str = "raw", options: Mapping[str, Any] | str | None = None,
            sparse_size: int = DEFAULT_SPARSE_SIZE, buffer_size: int = DEFAULT_BUFFER_SIZE,
            workers: int = DEFAULT_WORKERS, progress: ProgressFn | None = None,
            cache: str = DEFAULT_CACHE_MODE, registry: Registry | None = None,
            allow_protocols: Collection[str] = (), force_share: bool = False,
            compress: bool = False, snapshot: str | None = None,
            existing: bool = False, target_is_zero: bool = False,
            source_cache: str | None = None, backing: str | None = None,
            backing_format: str | None = None, rate_limit: int = 0,
            copy_offload: bool = False, salvage: bool = False,
            warn: Callable[[str], None] | None = None, bitmaps: bool = False,
            skip_broken_bitmaps: bool = False, out_of_order: bool = False) -> None:
    """Write the guest-visible content of ``source`` into a new ``target`` image.

    ``cache`` takes qemu-img's -t names: "unsafe" never flushes the target
    (qemu-img convert's default), "none"/"directsync" bypass the page cache;
    ``source_cache`` (-T) the same names for the source. ``compress`` stores
    every data cluster compressed (qemu-img convert -c), compressing on two
    threads per worker. ``snapshot`` copies an internal snapshot of the
    source instead (qemu-img convert -l: an id or name, or
    ``snapshot.id=ID,snapshot.name=NAME``). ``sparse_size`` 0 (-S 0) writes
    zero ranges too: the target is fully allocated.

    As qemu-img convert's other options: ``existing`` (-n) writes into an
    existing ``target`` instead of creating it (``target_is_zero``: it reads
    as zeros already, so zero ranges are skipped); ``backing`` and
    ``backing_format`` (-B/-F) create the target over that backing and copy
    only what the source's top layer holds (the backing is taken to hold
    what the source's backing holds); ``rate_limit`` (-r) in bytes per
    second; ``copy_offload`` (-C) copy_file_range between raw files;
    ``salvage`` goes on over read errors, reporting each through ``warn``;
    ``bitmaps`` copies the persistent dirty bitmaps (qcow2 to qcow2),
    ``skip_broken_bitmaps`` leaving out inconsistent ones with a warning.
    Writes land in guest order (reads run ahead) unless ``out_of_order``
    (-W), where the target's layout depends on it (not raw).
    """
    registry = registry or plugins.registry()
    if cache not in CACHE_MODES:
        raise OptionError(f"Invalid cache mode '{cache}' (one of: {', '.join(CACHE_MODES)})")
    if source_cache is not None and source_cache not in CACHE_MODES:
        raise OptionError(f"Invalid source cache option: {source_cache}")
    direct, durable = CACHE_MODES[cache]
    source_direct = CACHE_MODES[source_cache][0] if source_cache else False
    if buffer_size <= 0 or workers <= 0:
        raise OptionError("buffer size and worker count must be positive")
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise OptionError("sparse size must be a multiple of 512 bytes (0 disables it)")
    if rate_limit < 0:
        raise OptionError(RATE_LIMIT_INVALID)
    _check_convert_options(registry, target_format, options, compress=compress,
                           existing=existing, target_is_zero=target_is_zero,
                           backing=backing, backing_format=backing_format,
                           copy_offload=copy_offload, bitmaps=bitmaps,
                           skip_broken_bitmaps=skip_broken_bitmaps)
    if snapshot is not None:  # qemu-img: a bad -l is refused before anything opens
        from corefmt.ops.snapshot import parse_snapshot_option

        snapshot_ref = parse_snapshot_option(snapshot)
    with open_chain(source, source_format, read_only=True, registry=registry,
                    allow_protocols=allow_protocols, force_share=force_share,
                    direct=source_direct) as src:
        if snapshot is not None:
            from corefmt.ops.snapshot import load_snapshot

            load_snapshot(src, snapshot_ref)
        if bitmaps:
            bitmap_copy = _bitmaps_to_copy(src, skip_broken_bitmaps, warn)
        for layer in src.chain():
            if _same_file(layer.filename, target) and not existing:
                # Creating the target would truncate it before a byte is copied.
                raise CorefmtError(f"{target}: is an image of the source chain itself; "
                                   "refusing to convert an image onto itself")
        target_node = _open_target(src, target, target_format, options, registry,
                                   existing=existing, direct=direct, durable=durable,
                                   backing=backing, backing_format=backing_format)
        with target_node as dst:
            if existing and dst.virtual_size < src.virtual_size:
                raise CorefmtError("output file is smaller than input file")
            if bitmaps:
                _check_target_bitmaps(dst, target_format)
            mode = CopyMode(
                sparse_size=sparse_size,
                target_zeroed=target_is_zero if existing else (
                    backing is None and reads_as_zeros(dst, src.virtual_size)),
                full_allocation=sparse_size == 0, top_only=backing is not None,
                rate_limit=rate_limit, salvage=salvage, warn=warn,
                copy_offload=copy_offload,
                in_order=not out_of_order and _layout_follows_writes(dst))
            copy_node(src, dst, buffer_size=buffer_size, workers=workers, progress=progress,
                      flush_interval=FLUSH_INTERVAL if durable else 0, compress=compress,
                      mode=mode)
            if bitmaps:
                _copy_bitmaps(src, dst, bitmap_copy)
            if durable:
                dst.flush()


def _layout_follows_writes(node: BlockNode) -> bool:
    """Whether the order of writes shapes the target's layout: a format that
    allocates where it is written does; raw maps every offset to itself."""
    return node.layer().format_name != "raw"


def _check_convert_options(registry: Registry, target_format: str,
                           options: Mapping[str, Any] | str | None, *, compress: bool,
                           existing: bool, target_is_zero: bool, backing: str | None,
                           backing_format: str | None, copy_offload: bool, bitmaps: bool,
                           skip_broken_bitmaps: bool) -> None:
    """qemu-img convert's refusals of option combinations, in its words,
    before anything is opened."""
    if target_is_zero and not existing:
        raise OptionError("--target-is-zero requires use of -n flag")
    if skip_broken_bitmaps and not bitmaps:
        raise OptionError("Use of --skip-broken-bitmaps requires --bitmaps")
    if copy_offload and compress:
        raise OptionError("Cannot enable copy offloading when -c is used")
    if existing and options:
        raise OptionError("-o has no effect when skipping image creation")
    driver = registry.format(target_format)
    if compress and not driver.supports_compression:
        raise OptionError(COMPRESSION_UNSUPPORTED)
    if backing is not None and not existing:
        if not driver.supports_backing:
            raise OptionError(f"Backing file not supported for file format '{target_format}'")
        if not backing_format and driver.records_backing_format:
            raise OptionError("Use of backing file requires explicit backing format")


def _open_target(src: BlockNode, target: str, target_format: str,
                 options: Mapping[str, Any] | str | None, registry: Registry, *,
                 existing: bool, direct: bool, durable: bool, backing: str | None,
                 backing_format: str | None) -> BlockNode:
    """The target, created (unless ``existing``) and opened for writing.

    The target's locks are held from before create truncates it until the
    opened target holds its own: no other process gets in between."""
    open_options = None if durable else {"cache": {"no-flush": True}}
    if existing:
        return open_chain(target, target_format, direct=direct, registry=registry,
                          options=open_options)
    with locking.creating(target, registry.storage_for(target)):
        create(target, target_format, src.virtual_size, options=_without_size(options),
               backing=backing, backing_format=backing_format, flush=durable,
               registry=registry)
        return open_chain(target, target_format, direct=direct, registry=registry,
                          options=open_options)


def _bitmaps_to_copy(src: BlockNode, skip_broken: bool,
                     warn: Callable[[str], None] | None) -> list[Any]:
    """The source's persistent bitmaps --bitmaps copies, checked first as
    qemu-img checks them."""
    image = getattr(src.layer(), "image", None)
    if image is None or not supports(image, "bitmap_list"):
        raise CorefmtError("Source lacks bitmap support")
    chosen = []
    for info in image.bitmap_list():
        if "in-use" in info.flags:
            if not skip_broken:
                raise CorefmtError(f"Cannot copy inconsistent bitmap '{info.name}'\n"
                                   "Try --skip-broken-bitmaps, or use 'corefmt bitmap "
                                   "--remove' to delete it")
            if warn is not None:
                warn(f"Skipping inconsistent bitmap '{info.name}'")
            continue
        chosen.append(info)
    return chosen


def _check_target_bitmaps(dst: BlockNode, target_format: str) -> None:
    image = getattr(dst.layer(), "image", None)
    if image is None or not supports(image, "bitmap_add"):
        raise CorefmtError(f"Format driver '{target_format}' does not support bitmaps")


def _copy_bitmaps(src: BlockNode, dst: BlockNode, chosen: list[Any]) -> None:
    """Each bitmap added to the target with its granularity and state, and
    filled from the source's (qemu-img's convert_copy_bitmaps)."""
    source, target = src.layer().image, dst.layer().image
    for info in chosen:
        try:
            target.bitmap_add(info.name, info.granularity)
        except CorefmtError as error:
            raise CorefmtError(f"Failed to create bitmap {info.name}: {error}") from error
        try:
            target.bitmap_merge(info.name, info.name, source)
        except CorefmtError as error:
            target.bitmap_remove(info.name)
            raise CorefmtError(f"Failed to populate bitmap {info.name}: {error}") from error
        if "auto" not in info.flags:  # filled while enabled, then disabled as the source's
            target.bitmap_disable(info.name)


def _without_size(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Create options for the target: the size is the source's, and a ``size``
    option is ignored, as qemu-img convert ignores it."""
    values = dict(parse_option_string(options) if isinstance(options, str) else (options or {}))
    values.pop(GENERIC_SIZE_KEY, None)
    return values


def reads_as_zeros(node: BlockNode, length: int) -> bool:
    """Whether a just created image reads as zeros over [0, length), so that
    convert may skip the source's zero ranges. A new file does; a device
    keeps its old content, unless the format's own metadata says zero
    (a qcow2 on it), which its block status then tells."""
    layer = node.layer()
    image = getattr(layer, "image", None)
    if image is not None and not image.has_zero_init():
        return False
    storage = getattr(layer, "storage", None)
    if storage is None or storage.has_zero_init():
        return True
    return all(extent.zero for extent in chain_extents(node, 0, min(length, node.virtual_size)))


def _same_file(first: str, second: str) -> bool:
    """Whether two local paths name one file (links included)."""
    try:
        return os.path.samefile(first.removeprefix("file:"), second.removeprefix("file:"))
    except (OSError, ValueError):
        return first == second


def copy_node(src: BlockNode, dst: BlockNode, *, sparse_size: int = DEFAULT_SPARSE_SIZE,
              buffer_size: int = DEFAULT_BUFFER_SIZE, workers: int = DEFAULT_WORKERS,
              progress: ProgressFn | None = None, target_zeroed: bool = False,
              flush_interval: int = 0, compress: bool = False,
              mode: CopyMode | None = None) -> None:
    """Copy the content of one open node into another of at least the same size.

    With ``flush_interval`` > 0, ``dst`` is also flushed in the background
    every that many copied bytes (the caller still flushes at the end).
    With ``compress``, data is written compressed (see _copy_compressed).
    ``mode`` carries the rest of convert's options; without it,
    ``sparse_size`` and ``target_zeroed`` make one.
    """
    mode = mode or CopyMode(sparse_size=sparse_size, target_zeroed=target_zeroed)
    total = src.virtual_size
    copier = _Copier(src, dst, buffer_size, mode)
    flusher = _BackgroundFlush(dst, flush_interval)
    if compress:
        _copy_compressed(src, dst, copier, flusher, buffer_size, workers, progress)
        return
    done = 0
    if progress:
        progress(0, total)
    turnstile = copier.turnstile = _Turnstile() if mode.in_order else None
    turns = itertools.count()
    try:
        with ThreadPoolExecutor(max_workers=workers,
                                thread_name_prefix="corefmt-convert") as pool:
            pending: set[Future[int]] = set()
            try:
                for offset, length, kind in data_chunks(src, buffer_size, mode=mode):
                    if kind == BACKING or (kind == ZERO and mode.target_zeroed
                                           and not mode.full_allocation):
                        done += length
                        continue
                    while len(pending) >= workers * 2:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        copied = sum(future.result() for future in finished)
                        done += copied
                        flusher.copied(copied)
                        if progress:
                            progress(done, total)
                    pending.add(pool.submit(copier.copy, offset, length, kind,
                                            next(turns) if turnstile else None))
                for future in pending:
                    done += future.result()
            finally:
                if turnstile is not None:
                    turnstile.abort()  # releases workers still waiting if this failed
                for future in pending:
                    future.cancel()
    except BaseException:
        flusher.finish(raise_error=False)
        raise
    flusher.finish()
    if progress:
        progress(total, total)


def _copy_compressed(src: BlockNode, dst: BlockNode, copier: _Copier,
                     flusher: _BackgroundFlush, buffer_size: int, workers: int,
                     progress: ProgressFn | None) -> None:
    """convert -c: workers read and compress windows of whole clusters; this
    thread stores them strictly in guest order, so the packed compressed
    clusters lie in the file as qemu-img lays them. Each of the ``workers``
    requests gets COMPRESS_THREADS_PER_REQUEST threads: a thread holding
    the GIL between two clusters then leaves the core to another one's
    compression (measured on 2 cores, zstd: 2 threads 0.63 of qemu-img's
    time, 4 threads 0.54). At most two windows per thread (their data and
    compressed streams) are in memory."""
    total = src.virtual_size
    threads = workers * COMPRESS_THREADS_PER_REQUEST
    cluster = max(1, dst.limits.copy_granularity)
    if progress:
        progress(0, total)
    pending: collections.deque[tuple[int, int, Future[list[Callable[[], None]]]]] = (
        collections.deque())

    def store_oldest() -> None:
        offset, length, future = pending.popleft()
        for step in future.result():
            step()
        flusher.copied(length)
        if progress:
            progress(offset + length, total)

    try:
        with ThreadPoolExecutor(max_workers=threads,
                                thread_name_prefix="corefmt-compress") as pool:
            try:
                mode = copier.mode
                for offset, length in cluster_chunks(
                        src, buffer_size, cluster, everything=mode.full_allocation,
                        base=src.layer().backing if mode.top_only else None):
                    while len(pending) >= threads * 2:
                        store_oldest()
                    pending.append((offset, length, pool.submit(
                        copier.prepare_compressed, offset, length, cluster)))
                while pending:
                    store_oldest()
            finally:
                for _offset, _length, future in pending:
                    future.cancel()
    except BaseException:
        flusher.finish(raise_error=False)
        raise
    flusher.finish()
    if progress:
        progress(total, total)

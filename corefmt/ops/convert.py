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
import functools
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError, OptionError
from corefmt.extents import ChainExtent
from corefmt.flags import RequestFlags
from corefmt.ops.create import GENERIC_SIZE_KEY, create
from corefmt.options import parse_option_string
from corefmt.registry import Registry
from corefmt.storage import locking

DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024
DEFAULT_SPARSE_SIZE = 4096
#: Requests in flight: one per core (measured on 2 cores: 4 workers were 10-15%
#: slower than 2 from page cache, the extra threads contending on the file).
MIN_WORKERS, MAX_WORKERS = 2, 8
DEFAULT_WORKERS = max(MIN_WORKERS, min(MAX_WORKERS, os.cpu_count() or MIN_WORKERS))
#: Block status is asked for in windows, the first of this size. A window
#: that comes back with at most SPARSE_WINDOW_EXTENTS extents doubles the
#: next one, so a hole of any size is crossed in a number of requests that
#: grows with the log of its size, not with the size (each request is an
#: lseek or a table lookup per extent); one with more than
#: DENSE_WINDOW_EXTENTS starts again from this size (bounds the extent list).
STATUS_WINDOW = 1024 * 1024 * 1024
SPARSE_WINDOW_EXTENTS = 64
DENSE_WINDOW_EXTENTS = 4096
#: Zero detection compares at most this many bytes per memcmp (the size of
#: the shared zero buffer it compares against).
ZERO_WINDOW = 256 * 1024
#: Distinct lengths of zero buffers kept (granularity, window, odd tails).
ZERO_LENGTHS_CACHED = 8
#: convert flushes the target in the background each time this many bytes
#: have been copied since the last flush started (see _BackgroundFlush).
FLUSH_INTERVAL = 128 * 1024 * 1024
#: qemu-img's cache modes for the target: (O_DIRECT, flush at all).
#: qemu-img convert defaults to "unsafe"; corefmt defaults to "writeback", so
#: a finished convert is on disk unless the caller says it need not be.
CACHE_MODES: dict[str, tuple[bool, bool]] = {
    "writeback": (False, True),
    "writethrough": (False, True),
    "none": (True, True),
    "directsync": (True, True),
    "unsafe": (False, False),
}
DEFAULT_CACHE_MODE = "writeback"
#: Compressing threads per request in flight for convert -c (see _copy_compressed).
COMPRESS_THREADS_PER_REQUEST = 2
#: qemu-img convert -c's refusal for a format that cannot compress.
COMPRESSION_UNSUPPORTED = "Compression not supported for this file format"

ProgressFn = Callable[[int, int], None]


def chain_extents(node: BlockNode, start: int = 0,
                  end: int | None = None) -> Iterator[ChainExtent]:
    """The chain's block status over [start, end), asked for in windows that
    grow over sparse ranges (see STATUS_WINDOW): the cost follows the number
    of extents, not the virtual size."""
    end = node.virtual_size if end is None else end
    window = STATUS_WINDOW
    position = start
    while position < end:
        window_end = min(end, position + window)
        extents = node.block_status(position, window_end - position)
        yield from extents
        position = window_end
        if len(extents) <= SPARSE_WINDOW_EXTENTS:
            window *= 2
        elif len(extents) > DENSE_WINDOW_EXTENTS:
            window = STATUS_WINDOW


def data_chunks(node: BlockNode, buffer_size: int,
                start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) pieces of the chain, data pieces <= buffer_size."""
    for extent in chain_extents(node, start, end):
        if extent.zero or extent.node is None:
            yield extent.offset, extent.length, True
            continue
        position = extent.offset
        while position < extent.end:
            step = min(buffer_size - position % buffer_size, extent.end - position)
            yield position, step, False
            position += step


@functools.lru_cache(maxsize=ZERO_LENGTHS_CACHED)
def _zero_bytes(length: int) -> bytearray:
    """A shared, never written, all-zero bytearray of ``length`` bytes."""
    return bytearray(length)


def is_zero(view: memoryview) -> bool:
    """Whether every byte of ``view`` is zero, at memcmp speed.

    The zero bytearray must be the left operand: ``bytearray == buffer`` is
    one memcmp, while ``memoryview == bytes`` compares item by item, about
    40 times slower and with the GIL held (stalling every other worker).
    Windows of ZERO_WINDOW bytes bound the zero buffer; the last window may
    overlap the one before, which does not matter for an all-zero test.
    """
    length = len(view)
    if length == 0:
        return True
    window = min(length, ZERO_WINDOW)
    zeros = _zero_bytes(window)
    last = length - window
    for start in range(0, length, window):
        start = min(start, last)
        if zeros != view[start:start + window]:
            return False
    return True


def zero_runs(view: memoryview, granularity: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_zero) runs of a buffer, judged ``granularity`` bytes at a time."""
    length = len(view)
    if is_zero(view):  # a few memcmps decide the common all-zero case
        yield 0, length, True
        return
    if granularity >= length:
        yield 0, length, False
        return
    zero_block = _zero_bytes(granularity)
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


def cluster_chunks(node: BlockNode, buffer_size: int, cluster: int
                   ) -> Iterator[tuple[int, int]]:
    """(offset, length) windows that cover the chain's data in whole
    clusters of the target (a compressed write must be whole clusters; only
    the disk's last one may be short), each at most ``buffer_size`` rounded
    down to clusters. Zero and unallocated ranges between them are skipped."""
    size = node.virtual_size
    step = max(cluster, buffer_size // cluster * cluster)
    start = end = -1
    for extent in chain_extents(node):
        if extent.zero or extent.node is None:
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
                 sparse_size: int, target_zeroed: bool):
        self.source = source
        self.target = target
        self.buffer_size = buffer_size
        self.sparse_size = sparse_size
        self.target_zeroed = target_zeroed
        self._local = threading.local()

    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = bytearray(self.buffer_size)
        return buf

    def copy(self, offset: int, length: int, is_zero: bool) -> int:
        if is_zero:
            if not self.target_zeroed:
                self.target.write_zeroes(offset, length)
            return length
        buffer = self._buffer()
        view = memoryview(buffer)[:length]
        self.source.readinto(offset, view)
        if self.sparse_size <= 0 or _no_zero_block(buffer, length, self.sparse_size):
            self.target.write(offset, view)
            return length
        for start, run, zero in zero_runs(view, self.sparse_size):
            if not zero:
                self.target.write(offset + start, view[start:start + run])
            elif not self.target_zeroed:
                self.target.write_zeroes(offset + start, run)
        return length


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
            zero = start < length and is_zero(view[start:start + cluster])
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


def _no_zero_block(buffer: bytearray, length: int, granularity: int) -> bool:
    """True if ``zero_runs(buffer[:length], granularity)`` is surely one data run.

    The common case for data, so it is worth a shortcut: one
    ``bytearray.find`` of a zero block (a skipping search, twice as fast as
    judging block after block in Python, and with fewer bytecodes holding
    the GIL) proves there is no zero block at any alignment; only a short
    tail block is left to judge. False means "look block by block": a zero
    run may still straddle block boundaries without covering a block.
    """
    if buffer.find(_zero_bytes(granularity), 0, length) >= 0:
        return False
    tail = length % granularity  # the whole buffer when it is shorter than a block
    return tail == 0 or not is_zero(memoryview(buffer)[length - tail:length])


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
            compress: bool = False, snapshot: str | None = None) -> None:
    """Write the guest-visible content of ``source`` into a new ``target`` image.

    ``cache`` takes qemu-img's -t names: "unsafe" never flushes the target
    (qemu-img convert's default), "none"/"directsync" bypass the page cache.
    ``compress`` stores every data cluster compressed (qemu-img convert -c),
    compressing on two threads per worker. ``snapshot`` copies an internal
    snapshot of the source instead (qemu-img convert -l: an id or name, or
    ``snapshot.id=ID,snapshot.name=NAME``).
    """
    registry = registry or plugins.registry()
    if cache not in CACHE_MODES:
        raise OptionError(f"Invalid cache mode '{cache}' (one of: {', '.join(CACHE_MODES)})")
    direct, durable = CACHE_MODES[cache]
    if buffer_size <= 0 or workers <= 0:
        raise OptionError("buffer size and worker count must be positive")
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise OptionError("sparse size must be a multiple of 512 bytes (0 disables it)")
    if not registry.format(target_format).supports_compression and compress:
        raise OptionError(COMPRESSION_UNSUPPORTED)
    if snapshot is not None:  # qemu-img: a bad -l is refused before anything opens
        from corefmt.ops.snapshot import parse_snapshot_option

        snapshot_ref = parse_snapshot_option(snapshot)
    with open_chain(source, source_format, read_only=True, registry=registry,
                    allow_protocols=allow_protocols, force_share=force_share) as src:
        if snapshot is not None:
            from corefmt.ops.snapshot import load_snapshot

            load_snapshot(src, snapshot_ref)
        for layer in src.chain():
            if _same_file(layer.filename, target):
                # Creating the target would truncate it before a byte is copied.
                raise CorefmtError(f"{target}: is an image of the source chain itself; "
                                   "refusing to convert an image onto itself")
        # The target's locks are held from before create truncates it until
        # the opened target holds its own: no other process gets in between.
        with locking.creating(target, registry.storage_for(target)):
            create(target, target_format, src.virtual_size, options=_without_size(options),
                   flush=durable,
                   registry=registry)
            target_node = open_chain(target, target_format, direct=direct, registry=registry,
                                     options=None if durable else {"cache": {"no-flush": True}})
        with target_node as dst:
            copy_node(src, dst, sparse_size=sparse_size, buffer_size=buffer_size,
                      workers=workers, progress=progress,
                      target_zeroed=reads_as_zeros(dst, src.virtual_size),
                      flush_interval=FLUSH_INTERVAL if durable else 0, compress=compress)
            if durable:
                dst.flush()


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
              flush_interval: int = 0, compress: bool = False) -> None:
    """Copy the content of one open node into another of at least the same size.

    With ``flush_interval`` > 0, ``dst`` is also flushed in the background
    every that many copied bytes (the caller still flushes at the end).
    With ``compress``, data is written compressed (see _copy_compressed).
    """
    total = src.virtual_size
    copier = _Copier(src, dst, buffer_size, sparse_size, target_zeroed)
    flusher = _BackgroundFlush(dst, flush_interval)
    if compress:
        _copy_compressed(src, dst, copier, flusher, buffer_size, workers, progress)
        return
    done = 0
    if progress:
        progress(0, total)
    try:
        with ThreadPoolExecutor(max_workers=workers,
                                thread_name_prefix="corefmt-convert") as pool:
            pending: set[Future[int]] = set()
            try:
                for offset, length, is_zero in data_chunks(src, buffer_size):
                    if is_zero and target_zeroed:
                        done += length
                        continue
                    while len(pending) >= workers * 2:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        copied = sum(future.result() for future in finished)
                        done += copied
                        flusher.copied(copied)
                        if progress:
                            progress(done, total)
                    pending.add(pool.submit(copier.copy, offset, length, is_zero))
                for future in pending:
                    done += future.result()
            finally:
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
                for offset, length in cluster_chunks(src, buffer_size, cluster):
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

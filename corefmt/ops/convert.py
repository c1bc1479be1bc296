"""Converting any image (chain) to any format.

Speed comes from extents: ranges the source's chain reports as zero or
unallocated are never read; data ranges move in large buffers (readinto)
on a pool of threads (pread/pwrite release the GIL); zero runs inside data
are detected at ``sparse_size`` granularity and skipped, since a new image
reads as zeros.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.errors import OptionError
from corefmt.ops.create import create
from corefmt.registry import Registry

DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024
DEFAULT_SPARSE_SIZE = 4096
DEFAULT_WORKERS = 4
#: Block status is asked for in windows of this size (bounds the extent list).
STATUS_WINDOW = 1024 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


def data_chunks(node: BlockNode, buffer_size: int,
                start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) pieces of the chain, data pieces <= buffer_size."""
    end = node.virtual_size if end is None else end
    window_start = start
    while window_start < end:
        window_end = min(end, window_start + STATUS_WINDOW)
        for extent in node.block_status(window_start, window_end - window_start):
            if extent.zero or extent.node is None:
                yield extent.offset, extent.length, True
                continue
            position = extent.offset
            while position < extent.end:
                step = min(buffer_size - position % buffer_size, extent.end - position)
                yield position, step, False
                position += step
        window_start = window_end


def zero_runs(view: memoryview, granularity: int) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_zero) runs of a buffer, judged ``granularity`` bytes at a time."""
    length = len(view)
    if view == bytes(length):  # one memcmp decides the common all-zero case
        yield 0, length, True
        return
    zero_block = bytes(granularity)
    run_start = 0
    run_zero: bool | None = None
    position = 0
    while position < length:
        step = min(granularity, length - position)
        block_zero = view[position:position + step] == zero_block[:step]
        if run_zero is None:
            run_zero = block_zero
        elif block_zero != run_zero:
            yield run_start, position - run_start, run_zero
            run_start, run_zero = position, block_zero
        position += step
    yield run_start, length - run_start, bool(run_zero)


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

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = memoryview(bytearray(self.buffer_size))
        return buf

    def copy(self, offset: int, length: int, is_zero: bool) -> int:
        if is_zero:
            if not self.target_zeroed:
                self.target.write_zeroes(offset, length)
            return length
        view = self._buffer()[:length]
        self.source.readinto(offset, view)
        if self.sparse_size <= 0:
            self.target.write(offset, view)
            return length
        for start, run, zero in zero_runs(view, self.sparse_size):
            if not zero:
                self.target.write(offset + start, view[start:start + run])
            elif not self.target_zeroed:
                self.target.write_zeroes(offset + start, run)
        return length


def convert(source: str, target: str, *, source_format: str | None = None,
            target_format: str = "raw", options: Mapping[str, Any] | str | None = None,
            sparse_size: int = DEFAULT_SPARSE_SIZE, buffer_size: int = DEFAULT_BUFFER_SIZE,
            workers: int = DEFAULT_WORKERS, progress: ProgressFn | None = None,
            copy_backing: bool = True, registry: Registry | None = None) -> None:
    """Write the guest-visible content of ``source`` into a new ``target`` image."""
    registry = registry or plugins.registry()
    if buffer_size <= 0 or workers <= 0:
        raise OptionError("buffer size and worker count must be positive")
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise OptionError("sparse size must be a multiple of 512 bytes (0 disables it)")
    registry.format(target_format)
    with open_chain(source, source_format, read_only=True, registry=registry) as src:
        create(target, target_format, src.virtual_size, options=options, registry=registry)
        with open_chain(target, target_format, registry=registry) as dst:
            copy_node(src, dst, sparse_size=sparse_size, buffer_size=buffer_size,
                      workers=workers, progress=progress, target_zeroed=True)
            dst.flush()


def copy_node(src: BlockNode, dst: BlockNode, *, sparse_size: int = DEFAULT_SPARSE_SIZE,
              buffer_size: int = DEFAULT_BUFFER_SIZE, workers: int = DEFAULT_WORKERS,
              progress: ProgressFn | None = None, target_zeroed: bool = False) -> None:
    """Copy the content of one open node into another of at least the same size."""
    total = src.virtual_size
    copier = _Copier(src, dst, buffer_size, sparse_size, target_zeroed)
    done = 0
    if progress:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corefmt-convert") as pool:
        pending: set[Future[int]] = set()
        try:
            for offset, length, is_zero in data_chunks(src, buffer_size):
                if is_zero and target_zeroed:
                    done += length
                    continue
                while len(pending) >= workers * 2:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    done += sum(future.result() for future in finished)
                    if progress:
                        progress(done, total)
                pending.add(pool.submit(copier.copy, offset, length, is_zero))
            for future in pending:
                done += future.result()
        finally:
            for future in pending:
                future.cancel()
    if progress:
        progress(total, total)

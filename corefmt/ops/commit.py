"""Writing an image's data into a base below it (qemu-img commit), for any
pair of formats.

Everything a layer above BASE decides (data and zeros, the top's and any
intermediate's) is written into BASE, which is reopened read-write for it;
a shorter BASE is grown first, as qemu's active commit does. BASE is
flushed before the top is touched. Then, unless ``drop``, the top is
emptied (``Image.make_empty``: qcow2 makes every cluster unallocated, as
qemu does), so it reads BASE's bytes, now the same. A format that cannot
be emptied (FVD: its bitmap only gains bits) keeps its data, as with
``-d``; the caller is told.

Crash safety follows from the order: until BASE is flushed the top still
holds everything it showed; after, a partly emptied top reads the same
bytes from BASE. A rerun copies the same data again.

``-b`` deeper in the chain implies ``-d`` (qemu-img's rule): the images
between stay as they are and no longer show what they did (qemu leaves
them so too); the top still does, as it keeps its data.
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.driver import supports
from corefmt.errors import CorefmtError
from corefmt.filters.throttle import RateLimit
from corefmt.ops.backing import find_layer
from corefmt.ops.convert_settings import CACHE_MODES
from corefmt.registry import Registry

ProgressFn = Callable[[int, int], None]

#: Bytes copied per request.
COPY_CHUNK = 8 * 1024 * 1024
#: Copies in flight, and the threads running them (reads and writes overlap).
IN_FLIGHT, WORKERS = 4, 2
#: Block status is asked for in windows this long.
STATUS_WINDOW = 1024 * 1024 * 1024
NO_BACKING = "Image does not have a backing file"


class CommitError(CorefmtError):
    """qemu-img commit refused or failed (exit status 1)."""


@attrs.define
class CommitResult:
    #: Bytes written into the base (data and zeros).
    committed: int = 0
    #: The top was emptied (False with drop, or for a format that cannot be).
    emptied: bool = False
    #: The top could have been emptied but its format cannot (FVD).
    not_emptiable: bool = False


def find_base(node: BlockNode, name: str | None) -> BlockNode:
    """BASE: the named image of the chain below the top (qemu's
    bdrv_find_backing_image), or the top's backing."""
    top = node.layer()
    below = top.backing
    if name is None:
        if below is None:
            raise CommitError(NO_BACKING)
        return below.layer()
    found = find_layer(top, name)
    if found is None:
        raise CommitError(f"Did not find '{name}' in the backing chain of '{top.filename}'")
    return found


def copy_above(top: BlockNode, base: BlockNode, *, rate_limit: int = 0,
               progress: ProgressFn | None = None) -> int:
    """Write into ``base`` everything the layers above it decide; returns
    the bytes written."""
    size = top.virtual_size
    if base.virtual_size < size:
        base.truncate(size)
    rate = RateLimit(rate_limit) if rate_limit > 0 else None
    written = 0
    buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(IN_FLIGHT + WORKERS):
        buffers.put(bytearray(COPY_CHUNK))

    def copy(start: int, length: int) -> int:
        # pread and pwrite release the GIL: workers overlap reads and writes.
        buffer = buffers.get()
        try:
            view = memoryview(buffer)[:length]
            top.readinto(start, view)
            base.write(start, view)
        finally:
            buffers.put(buffer)
        return start + length

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="corefmt-commit") as pool:
        pending: collections.deque[Future[int]] = collections.deque()

        def settle(limit: int) -> None:
            while len(pending) > limit:
                done = pending.popleft().result()
                if progress is not None:
                    progress(done, size)

        for window in range(0, size, STATUS_WINDOW):
            window_end = min(window + STATUS_WINDOW, size)
            for extent in top.block_status_above(base, window, window_end - window):
                end = extent.offset + extent.length
                if extent.zero:
                    base.write_zeroes(extent.offset, extent.length, unmap=True)
                    written += extent.length
                elif extent.node is not None:
                    for start in range(extent.offset, end, COPY_CHUNK):
                        length = min(COPY_CHUNK, end - start)
                        pending.append(pool.submit(copy, start, length))
                        written += length
                        if rate is not None:
                            rate.take(length)
                        settle(IN_FLIGHT)
        settle(0)
    if progress is not None:
        progress(size, size)
    return written


def empty_top(top: BlockNode) -> bool:
    """Make the top hold nothing (its reads go to the base again); False if
    its format cannot."""
    image = getattr(top, "image", None)
    if image is None or not supports(image, "make_empty"):
        return False
    image.make_empty()
    image.flush()
    return True


def commit_node(node: BlockNode, base_name: str | None = None, *, drop: bool = False,
                rate_limit: int = 0, progress: ProgressFn | None = None) -> CommitResult:
    """Commit an image opened read-write with its chain."""
    top = node.layer()
    base = find_base(node, base_name)
    if base_name is not None:
        drop = True  # -b implies -d: the images between would show garbage otherwise
    result = CommitResult()
    base.reopen(read_only=False)
    try:
        result.committed = copy_above(top, base, rate_limit=rate_limit, progress=progress)
        base.flush()  # BASE holds the data before the top lets go of it
        if not drop:
            result.emptied = empty_top(top)
            result.not_emptiable = not result.emptied
    finally:
        base.reopen(read_only=True)
    if progress is not None:
        progress(top.virtual_size, top.virtual_size)
    return result


def commit(image: str | Mapping[str, Any], format: str | None = None, *,
           base: str | None = None, drop: bool = False, rate_limit: int = 0,
           cache: str = "writeback", progress: ProgressFn | None = None,
           allow_protocols: Collection[str] = (),
           registry: Registry | None = None) -> CommitResult:
    """qemu-img commit: write the image's data into ``base`` (default: its
    backing file), then empty it unless ``drop`` (``base`` implies ``drop``)."""
    if cache not in CACHE_MODES:
        raise CommitError(f"Invalid cache option: {cache}")
    if rate_limit < 0:
        raise CommitError("Invalid rate limit specified")
    with open_chain(image, format, read_only=False, direct=CACHE_MODES[cache][0],
                    registry=registry or plugins.registry(),
                    allow_protocols=allow_protocols) as node:
        return commit_node(node, base, drop=drop, rate_limit=rate_limit, progress=progress)

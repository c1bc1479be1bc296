"""The request engine of ``corefmt bench`` (qemu-img bench 7.2).

Requests go through the whole stack (``open_chain``, then the top node's
``readinto``/``write``/``flush``) on a ``RequestQueue``'s worker threads,
``depth`` sent at a time. qemu's completion logic (``bench_cb``: which
request comes next, when the queue drains for a flush and when it
refills) runs at each completion, so the requests, their offsets and the
flushes are the ones qemu-img bench sends for the same options.
"""

from __future__ import annotations

import collections
import enum
import errno
import os
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import attrs

from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.block.queue import RequestQueue
from corefmt.errors import CorefmtError, InvalidRequest, OptionError, RangeError, StorageError
from corefmt.flags import RequestFlags

#: qemu-img bench's defaults.
DEFAULT_COUNT = 75000
DEFAULT_DEPTH = 64
DEFAULT_BUFFER_SIZE = 4096
DEFAULT_CACHE = "writeback"
DEFAULT_AIO = "threads"
#: Worker threads at most: qemu's AIO thread pool's (64); deeper queues wait
#: for a worker there too.
MAX_WORKERS = 64


@attrs.frozen
class CacheMode:
    """What a ``-t`` name means: O_DIRECT, FUA on each write, flushes ignored."""

    direct: bool = False
    writethrough: bool = False
    no_flush: bool = False


#: qemu's bdrv_parse_cache_mode names.
CACHE_MODES: dict[str, CacheMode] = {
    "writeback": CacheMode(),
    "writethrough": CacheMode(writethrough=True),
    "none": CacheMode(direct=True),
    "off": CacheMode(direct=True),
    "directsync": CacheMode(direct=True, writethrough=True),
    "unsafe": CacheMode(no_flush=True),
}
#: qemu's -i names. corefmt has one engine (worker threads); "native" keeps
#: qemu's rule that it needs O_DIRECT, the others change nothing.
AIO_MODES = ("threads", "native", "io_uring")
NATIVE_AIO = "native"
NATIVE_NEEDS_DIRECT = ("aio=native was specified, but it requires cache.direct=on, "
                       "which was not specified.")


class BenchFailed(CorefmtError):
    """A request or flush failed: qemu-img bench stops there (exit 1)."""


@attrs.frozen
class BenchResult:
    """What a run did; ``elapsed`` is timed as qemu-img times it (the
    request loop only: not the open, not the flush at close)."""

    elapsed: float
    requests: int
    flushes: int
    bytes: int


def request_offsets(offset: int, step: int, image_size: int, count: int) -> Iterator[int]:
    """The offsets qemu-img bench sends requests to, in order: the first at
    ``offset`` as given, each next one ``step`` further, wrapped at the
    image size (qemu 7.2 wraps at the size, not at size - buffer size: a
    request that crosses the end fails). An empty image keeps offset 0
    (qemu 7.2 divides by zero there)."""
    for _ in range(count):
        yield offset
        offset = (offset + step) % image_size if image_size else 0


def error_reason(error: BaseException) -> str:
    """The strerror() text qemu prints for a failed request."""
    if isinstance(error, RangeError):
        return os.strerror(errno.EIO)  # blk_check_byte_request's -EIO
    if isinstance(error, InvalidRequest):
        return os.strerror(errno.EINVAL)
    if isinstance(error, StorageError) and error.errno:
        return os.strerror(error.errno)
    return str(error)


class _FlushNow(enum.Enum):
    NONE = "none"
    DRAINED = "drained"  # the queue is empty: flush, then send again
    BESIDE = "beside"  # --no-drain: flush while requests go on


@attrs.define
class _Engine:
    """qemu's BenchData and bench_cb. qemu runs bench_cb on one thread at each
    completion: it decides on a flush, then sends what may be sent. Here
    the worker whose request finished runs it, under one lock, and what it
    sends goes to a list of sent requests that workers take from (the
    finishing worker usually takes its own next one): the decisions are
    made at the same points as qemu's, so the requests, offsets and
    flushes are the same, without a thread handoff per request (which cost
    three times the request itself at depth 1)."""

    node: BlockNode
    offsets: Iterator[int]
    buffer_size: int
    pattern: int
    depth: int
    count: int
    write: bool
    flush_interval: int
    drain: bool
    write_flags: RequestFlags
    #: Requests not completed, and those sent (in flight or in ``sent``).
    n: int = 0
    in_flight: int = 0
    #: A drained flush is due or running: nothing is sent until it is done.
    in_flush: bool = False
    flushes: int = 0
    error: BenchFailed | None = None
    _sent: collections.deque[int] = attrs.Factory(collections.deque)
    _lock: threading.Condition = attrs.Factory(threading.Condition)
    _flush_pool: RequestQueue | None = None

    def run(self, requests: RequestQueue) -> float:
        self.n = self.count
        self._flush_pool = requests
        started = time.perf_counter()
        with self._lock:
            self._send()
        for _ in range(min(self.depth, self.count, MAX_WORKERS)):
            requests.submit(self._worker)
        with self._lock:
            self._lock.wait_for(lambda: self.n == 0 or self.error is not None)
        elapsed = time.perf_counter() - started
        try:
            requests.drain()  # workers done; a --no-drain flush may still run
        except BaseException:
            if self.error is None:
                raise
        if self.error is not None:
            raise self.error
        return elapsed

    def _send(self) -> None:
        """bench_cb's loop: send while requests are left and depth allows (lock held)."""
        sent = 0
        while not self.in_flush and self.n > self.in_flight and self.in_flight < self.depth:
            self._sent.append(next(self.offsets))
            self.in_flight += 1
            sent += 1
        if sent:
            self._lock.notify(sent)

    def _worker(self) -> None:
        buf = memoryview(bytearray(bytes([self.pattern]) * self.buffer_size))
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._sent or self.n == 0 or self.error)
                if self.error is not None or not self._sent:
                    return
                offset = self._sent.popleft()
            try:
                if self.write:
                    self.node.write(offset, buf, self.write_flags)
                else:
                    self.node.readinto(offset, buf)
            except BaseException as error:
                self._fail(f"Failed request: {error_reason(error)}", error)
                return
            action = self._completed()
            if action is _FlushNow.DRAINED:
                self._drained_flush()
            elif action is _FlushNow.BESIDE:
                # sent outside the lock: a full queue must not hold up the others
                assert self._flush_pool is not None
                self._flush_pool.submit(self._side_flush)

    def _completed(self) -> _FlushNow:
        """bench_cb for a finished request: the flush it asks for, if any;
        then what may be sent is sent."""
        with self._lock:
            remaining = self.n - self.in_flight  # requests not yet sent
            self.n -= 1
            self.in_flight -= 1
            if self.n == 0:
                self._lock.notify_all()
            action = _FlushNow.NONE
            if self.flush_interval and remaining % self.flush_interval == 0:
                if not self.drain:
                    action = _FlushNow.BESIDE
                elif not self.in_flight:
                    self.in_flush = True
                    action = _FlushNow.DRAINED
                if action is not _FlushNow.NONE:
                    self.flushes += 1
                if self.drain:
                    return action  # sent again when the flush is done
            self._send()
            return action

    def _drained_flush(self) -> None:
        try:
            self.node.flush()
        except BaseException as error:
            self._fail(f"Failed request: {error_reason(error)}", error)
            return
        with self._lock:
            self.in_flush = False
            self._send()
            self._lock.notify_all()

    def _side_flush(self) -> None:
        try:
            self.node.flush()
        except BaseException as error:
            self._fail(f"Failed flush request: {error_reason(error)}", error)

    def _fail(self, message: str, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = BenchFailed(message)
                self.error.__cause__ = error
            self._lock.notify_all()


def check_options(*, write: bool, depth: int, flush_interval: int, count: int = 1) -> None:
    """qemu-img bench's checks after option parsing, before the open."""
    if not write and flush_interval:
        raise OptionError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise OptionError("Flush interval can't be smaller than depth")
    if depth <= 0 and count > 0:
        # qemu 7.2 accepts 0 and then never sends a request: it hangs.
        raise OptionError("Invalid queue depth specified")


def open_for_bench(image: str | Mapping[str, Any], format: str | None = None, *,
                   write: bool = False, cache: str = DEFAULT_CACHE, aio: str = DEFAULT_AIO,
                   force_share: bool = False,
                   allow_protocols: Collection[str] = ()) -> tuple[BlockNode, CacheMode]:
    """The image opened as qemu-img bench opens it for ``cache`` and ``aio``."""
    mode = CACHE_MODES.get(cache)
    if mode is None:
        raise OptionError("Invalid cache mode")
    if aio not in AIO_MODES:
        raise OptionError(f"Invalid aio option: {aio}")
    if aio == NATIVE_AIO and not mode.direct:
        name = image if isinstance(image, str) else image.get("file", {}).get("filename", "")
        raise OptionError(f"Could not open '{name}': {NATIVE_NEEDS_DIRECT}")
    node = open_chain(image, format, read_only=not write, direct=mode.direct,
                      options={"cache": {"no-flush": True}} if mode.no_flush else None,
                      allow_protocols=allow_protocols, force_share=force_share)
    return node, mode


def run_bench(node: BlockNode, *, count: int = DEFAULT_COUNT, depth: int = DEFAULT_DEPTH,
              offset: int = 0, buffer_size: int = DEFAULT_BUFFER_SIZE, step: int = 0,
              write: bool = False, pattern: int = 0, flush_interval: int = 0,
              drain: bool = True, writethrough: bool = False) -> BenchResult:
    """Send qemu-img bench's requests to an open node; ``step`` 0 means
    ``buffer_size``, as in qemu."""
    check_options(write=write, depth=depth, flush_interval=flush_interval, count=count)
    step = step or buffer_size
    # Workers for the requests, one more for a flush sent beside them (--no-drain).
    with RequestQueue(min(depth, MAX_WORKERS) + 1, name="corefmt-bench") as requests:
        engine = _Engine(node=node,
                         offsets=request_offsets(offset, step, node.virtual_size, count),
                         buffer_size=buffer_size, pattern=pattern, depth=depth, count=count,
                         write=write, flush_interval=flush_interval, drain=drain,
                         write_flags=RequestFlags.FUA if writethrough else RequestFlags.NONE)
        elapsed = engine.run(requests)
    return BenchResult(elapsed=elapsed, requests=count, flushes=engine.flushes,
                       bytes=count * buffer_size)

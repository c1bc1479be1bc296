"""A request queue: keeps several requests in flight against one or more nodes.

Worker threads run node requests; pread/pwrite (and zlib/zstd in format
drivers) release the GIL, so requests really overlap. The number of
requests in flight is bounded, which also bounds the memory their buffers
take. Ordering between dependent requests is the node's job (tracked
requests), not the queue's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from corefmt.block.node import BlockNode

DEFAULT_QUEUE_DEPTH = 8
Result = TypeVar("Result")


class RequestQueue:
    """Submit requests; each returns a Future. ``drain`` waits for all of them."""

    def __init__(self, depth: int = DEFAULT_QUEUE_DEPTH, name: str = "corefmt-io"):
        if depth <= 0:
            raise ValueError("queue depth must be positive")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(depth * 2)
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._first_error: BaseException | None = None

    def submit(self, function: Callable[..., Result], *args: Any) -> Future[Result]:
        """Run ``function(*args)`` on a worker; blocks while the queue is full."""
        self._raise_pending_error()
        self._slots.acquire()
        try:
            future = self._pool.submit(function, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
            if not future.cancelled() and future.exception() is not None \
                    and self._first_error is None:
                self._first_error = future.exception()
        self._slots.release()

    def _raise_pending_error(self) -> None:
        with self._lock:
            error, self._first_error = self._first_error, None
        if error is not None:
            raise error

    # -- node requests ----------------------------------------------------------------
    def read(self, node: BlockNode, offset: int, buf: memoryview) -> Future[None]:
        return self.submit(node.readinto, offset, buf)

    def write(self, node: BlockNode, offset: int, data: bytes | memoryview) -> Future[None]:
        return self.submit(node.write, offset, data)

    def write_zeroes(self, node: BlockNode, offset: int, length: int,
                     unmap: bool = False) -> Future[None]:
        return self.submit(node.write_zeroes, offset, length, unmap)

    def discard(self, node: BlockNode, offset: int, length: int) -> Future[None]:
        return self.submit(node.discard, offset, length)

    # -- lifetime -----------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for every submitted request; raise the first error any of them had."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            for future in pending:
                with contextlib.suppress(BaseException):  # reported once, below
                    future.result()
        self._raise_pending_error()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> RequestQueue:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.close(cancel=exc_type is not None)

"""blkverify (QEMU's name): checks an image against a raw reference copy.

Every write, write-zeroes, discard, flush and truncate goes to both the
``test`` child (the image under test, which serves block status) and the
``raw`` child (a plain copy of what the guest should see); every read
reads both and fails on the first differing byte, with QEMU's message::

    blkverify: read offset=N bytes=N contents mismatch at offset N

A request that fails on one side only is a mismatch too (QEMU's "return
value mismatch", with 0 for success and -errno for a failure). Requests
are serialised, so a read never sees a write that has reached one child
but not yet the other: blkverify is for finding bugs, not for speed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corefmt import sync
from corefmt.buffers import first_difference
from corefmt.errors import CorefmtError, StorageError
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

CHILD_TEST, CHILD_RAW = "test", "raw"
#: Flags about how the test chain serves a read, not about what it reads: the
#: reference always reads its whole guest view (and never copies anything).
TEST_ONLY_FLAGS = RequestFlags.OWN_DATA | RequestFlags.COPY_ON_READ


class BlkverifyError(CorefmtError):
    """The image under test and the reference disagree."""


def _return_value(error: BaseException | None) -> int:
    """QEMU's view of an outcome: 0, or a negative errno (-EIO when unknown)."""
    if error is None:
        return 0
    if isinstance(error, StorageError | OSError) and error.errno:
        return -error.errno
    return -errno.EIO


class BlkverifyFilter(Filter):
    def __init__(self, child: BlockNode, options: Any, context: FilterContext):
        super().__init__(child, options, context)
        self.raw = context.children[CHILD_RAW]
        if self.raw.virtual_size != child.virtual_size:
            raise BlkverifyError(f"blkverify: image sizes differ: test {child.virtual_size} "
                                 f"!= raw {self.raw.virtual_size}")
        self._lock = sync.Lock()

    def _both(self, operation: str, offset: int, length: int,
              test: Callable[[], None], raw: Callable[[], None]) -> None:
        """Run a request on both children; fail if only one of them fails."""
        outcomes: list[BaseException | None] = []
        for request in (test, raw):
            try:
                request()
            except CorefmtError as error:
                outcomes.append(error)
            else:
                outcomes.append(None)
        test_error, raw_error = outcomes
        if (test_error is None) != (raw_error is None):
            raise BlkverifyError(
                f"blkverify: {operation} offset={offset} bytes={length} return value "
                f"mismatch test {_return_value(test_error)} != raw {_return_value(raw_error)}"
            ) from test_error or raw_error
        if test_error is not None:
            raise test_error

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        reference = bytearray(len(buf))
        with self._lock:
            self._both("read", offset, len(buf),
                       lambda: self.child.readinto(offset, buf, flags),
                       lambda: self.raw.readinto(offset, reference, flags & ~TEST_ONLY_FLAGS))
        at = first_difference(buf, reference, granularity=1)
        if at is not None:
            raise BlkverifyError(f"blkverify: read offset={offset} bytes={len(buf)} contents "
                                 f"mismatch at offset {offset + at}")

    def write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        with self._lock:
            self._both("write", offset, len(data),
                       lambda: self.child.write(offset, data, flags),
                       lambda: self.raw.write(offset, data, flags))

    def write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        with self._lock:
            self._both("write_zeroes", offset, length,
                       lambda: self.child.write_zeroes(offset, length, flags=flags),
                       lambda: self.raw.write_zeroes(offset, length, flags=flags))

    def discard(self, offset: int, length: int) -> None:
        # Discarded ranges may read as anything, so keep the reference's bytes
        # what the image under test now reads there.
        with self._lock:
            self._both("discard", offset, length,
                       lambda: self.child.discard(offset, length),
                       lambda: self._copy_range_to_raw(offset, length))

    def _copy_range_to_raw(self, offset: int, length: int) -> None:
        self.raw.discard(offset, length)
        self.raw.write(offset, self.child.read(offset, length))

    def flush(self) -> None:
        with self._lock:
            self._both("flush", 0, 0, self.child.flush, self.raw.flush)

    def truncate(self, size: int) -> None:
        with self._lock:
            self._both("truncate", 0, size, lambda: self.child.truncate(size),
                       lambda: self.raw.truncate(size))

    def info(self) -> dict[str, Any]:
        return {CHILD_RAW: self.raw.filename}


class BlkverifyDriver(FilterDriver):
    name = "blkverify"
    child_key = CHILD_TEST
    extra_children = (CHILD_RAW,)
    filter_class = BlkverifyFilter

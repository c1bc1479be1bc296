"""A file-like view of an image (io.RawIOBase), for code that wants a file."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Buffer

    from corefmt.block.node import BlockNode


class ImageIO(io.RawIOBase):
    """Reads and writes stop at the virtual size, as a block device does."""

    def __init__(self, node: BlockNode):
        super().__init__()
        self._node = node
        self._position = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._node.read_only

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            position = offset
        elif whence == os.SEEK_CUR:
            position = self._position + offset
        elif whence == os.SEEK_END:
            position = self._node.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        available = max(0, min(len(view), self._node.virtual_size - self._position))
        if available:
            self._node.readinto(self._position, view[:available])
            self._position += available
        return available

    def write(self, buffer: Buffer) -> int:
        if self._node.read_only:
            raise io.UnsupportedOperation("image is opened read-only")
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._node.virtual_size - self._position))
        if count < len(view) and count == 0:
            raise OSError(28, "No space left on device: write past the end of the image")
        self._node.write(self._position, view[:count])
        self._position += count
        return count

    def flush(self) -> None:
        if not self.closed and not self._node.read_only and not self._node.closed:
            self._node.flush()
        super().flush()

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("resize the image instead of truncating its view")

"""A data file of another format, seen as the byte store FVD keeps data in."""

from __future__ import annotations

from typing import Any

from corefmt import BlockNode, Storage


class NodeStorage(Storage):
    """A node (a qcow2 image, say) as a Storage: its virtual disk is the bytes."""

    def __init__(self, node: BlockNode):
        super().__init__(node.filename, node.read_only)
        self.node = node

    def size(self) -> int:
        return self.node.virtual_size

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf)
        inside = max(min(self.node.virtual_size - offset, len(view)), 0)
        if inside:
            self.node.readinto(offset, view[:inside])
        view[inside:] = bytes(len(view) - inside)

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > self.node.virtual_size:
            self.node.truncate(end)
        self.node.write(offset, data)

    def _truncate(self, size: int) -> None:
        self.node.truncate(size)

    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        if offset >= self.node.virtual_size:
            return False, length
        extent = self.node.block_status(offset, min(length, self.node.virtual_size - offset))[0]
        return not extent.zero, extent.length

    def has_zero_init(self) -> bool:
        return True

    def flush(self) -> None:
        self.node.flush()

    def close(self) -> None:
        """The node graph closes the node."""


def as_storage(child: Any) -> Storage:
    return child if isinstance(child, Storage) else NodeStorage(child)

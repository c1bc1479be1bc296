"""Named points in qcow2's update sequence, as qemu's blkdebug names them, so
corefmt's blkdebug filter can fail exactly one kind of metadata write."""

from __future__ import annotations

from collections.abc import Callable

from corefmt import Storage

L1_UPDATE = "l1_update"
L1_GROW_WRITE_TABLE = "l1_grow_write_table"
L2_ALLOC_WRITE = "l2_alloc_write"
L2_UPDATE = "l2_update"
REFBLOCK_UPDATE = "refblock_update"
REFBLOCK_ALLOC = "refblock_alloc"
REFTABLE_GROW = "reftable_grow"
REFTABLE_UPDATE = "reftable_update"
CLUSTER_ALLOC = "cluster_alloc"
CLUSTER_ALLOC_SPACE = "cluster_alloc_space"
COW_WRITE = "cow_write"
CLUSTER_ALLOC_BYTES = "cluster_alloc_bytes"
WRITE_COMPRESSED = "write_compressed"
HEADER_UPDATE = "header_update"  # corefmt's own: qemu has no event for it
SNAPSHOT_TABLE_WRITE = "snapshot_table_write"  # corefmt's own too


class EventStorage(Storage):
    """A storage that names an event before every write (a cache's write-backs
    run through it, so blkdebug sees ``l2_update`` / ``refblock_update``)."""

    def __init__(self, inner: Storage, emit: Callable[[str], None], event: str):
        super().__init__(inner.path, inner.read_only)
        self.inner = inner
        self.request_alignment = inner.request_alignment
        self._emit = emit
        self._event = event

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self.inner.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._emit(self._event)
        self.inner.write(offset, data)

    _write = write

    def _truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def flush(self) -> None:
        self.inner.flush()

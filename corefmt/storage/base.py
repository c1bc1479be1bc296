"""The interface every storage driver implements.

A format driver never opens files itself: it is handed a Storage and reads
and writes bytes through it. Reads past the end of storage return zeros,
as reads of a sparse file's tail would.
"""

from __future__ import annotations

import abc

from corefmt.errors import RangeError, ReadOnlyError

ZERO_CHUNK_SIZE = 1024 * 1024
_ZERO_CHUNK = bytes(ZERO_CHUNK_SIZE)


class Storage(abc.ABC):
    """An open byte store (file, memory, ...)."""

    #: What reads and writes must be aligned to (a store that read-modify-writes
    #: unaligned requests itself, as O_DIRECT files do, says 1: padding added
    #: above it would land past the end of the file and grow it).
    request_alignment: int = 1

    def __init__(self, path: str | None, read_only: bool):
        self.path = path
        self.read_only = read_only

    # -- required -----------------------------------------------------------
    @abc.abstractmethod
    def size(self) -> int:
        """Current length in bytes."""

    @abc.abstractmethod
    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from ``offset``; bytes past the end read as zeros."""

    @abc.abstractmethod
    def _write(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at ``offset``, growing the store if needed."""

    @abc.abstractmethod
    def _truncate(self, size: int) -> None: ...

    def flush(self) -> None:  # noqa: B027 - stores without caches have nothing to do
        """Make everything written so far durable."""

    def close(self) -> None:  # noqa: B027 - optional, like flush
        """Release the store; the object is unusable afterwards."""

    # -- optional, with generic fallbacks ----------------------------------
    def version_token(self) -> str | None:
        """What names this version of a store that others may replace (a
        remote object's size and ETag): overlays record it and every later
        open compares it. None where changes are the user's own (local files)."""
        return None

    def changed_since(self, recorded: str) -> str | None:
        """How this store differs from the version ``recorded`` by
        ``version_token()``, or None when it is that version (or cannot tell)."""
        current = self.version_token()
        if current is None or current == recorded:
            return None
        return f"{recorded} became {current}"

    def _punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range so it reads as zeros; False if unsupported."""
        return False

    def _zero_range(self, offset: int, length: int) -> bool:
        """Zero a range while keeping it allocated; False if unsupported."""
        return False

    def preallocate(self, offset: int, length: int) -> bool:
        """Reserve space for a range without writing it; False if unsupported."""
        return False

    def zero_before_write(self, offset: int, length: int) -> bool:
        """A hint before writing all of a range that holds nothing yet: the
        filesystem zeroes (allocates) it without writing bytes. True if it
        did; False, having done nothing, where it cannot. A failure of the
        store (ENOSPC, EIO) raises, as the write would.

        qemu's qcow2 zeroes a new allocation this way when its copy-on-write
        parts read as zeros (handle_alloc_space); a buffered write into
        space allocated so costs a third to a half of the system time of one
        into a delayed-allocation hole on this project's ext4 machines."""
        self._check_writable()
        return False

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering a range, from ``data_run``."""
        runs: list[tuple[int, int, bool]] = []
        position, end = offset, offset + length
        while position < end:
            is_data, run = self.data_run(position, end - position)
            runs.append((position, run, is_data))
            position += run
        return runs

    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether ``offset`` is in data or a hole, and how long that run is
        (at most ``length``); stores without holes say all data."""
        return True, length

    def allocated_size(self) -> int | None:
        """Bytes the store really occupies (None if unknown)."""
        return None

    def has_zero_init(self) -> bool:
        """Whether a store just made by ``create`` reads as zeros everywhere
        (qemu's bdrv_has_zero_init; a device keeps its old content)."""
        return True

    def set_creation_hints(  # noqa: B027 - optional, like flush
            self, *, nocow: bool = False, extent_size_hint: int = 0) -> None:
        """Hints for a new, empty store (qemu's file options ``nocow`` and
        ``extent_size_hint``); stores and file systems without them ignore
        them, as qemu does."""

    # -- common behaviour -----------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        if offset < 0:
            raise RangeError(f"{self.path}: negative write offset {offset}")
        self._write(offset, data)

    def truncate(self, size: int) -> None:
        self._check_writable()
        if size < 0:
            raise RangeError(f"{self.path}: negative size {size}")
        self._truncate(size)

    def grow_to(self, size: int) -> int:
        """Extend the store to at least ``size`` bytes, never shrinking it;
        return the size it had."""
        self._check_writable()
        current = self.size()
        if size <= current:
            return current
        return self._grow(size)

    def _grow(self, size: int) -> int:
        """Grow to ``size`` if smaller; return the size before. A store whose
        writes may run concurrently must check and grow as one step with
        respect to writes past its end, or a write that lands beyond ``size``
        between the two is cut off (FileStorage and MemoryStorage do); this
        default only checks first."""
        current = self.size()
        if size > current:
            self._truncate(size)
        return current

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros, growing the store if needed."""
        self._check_writable()
        if length <= 0:
            return
        end = offset + length
        # Zeros past the end are free: growing the store makes them.
        old_size = self.grow_to(end)
        if offset >= old_size:
            return
        length = min(end, old_size) - offset
        if unmap and self._punch_hole(offset, length):
            return
        if self._zero_range(offset, length):
            return
        if self._punch_hole(offset, length):
            if not unmap:
                self.preallocate(offset, length)
            return
        self.write_zero_bytes(offset, length)

    def write_zero_bytes(self, offset: int, length: int) -> None:
        """Write real zero bytes (the fallback when no hole or zero range exists)."""
        position = offset
        end = offset + length
        while position < end:
            step = min(ZERO_CHUNK_SIZE, end - position)
            self._write(position, memoryview(_ZERO_CHUNK)[:step])
            position += step

    def discard(self, offset: int, length: int) -> None:
        """Hint that a range is unused; a no-op where holes are unsupported."""
        self._check_writable()
        end = min(offset + length, self.size())
        if end > offset:
            self._punch_hole(offset, end - offset)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only")

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<{type(self).__name__} {self.path!r} {mode}>"


def ignore_flushes(storage: Storage) -> None:
    """qemu's ``cache.no-flush`` (cache mode ``unsafe``) at the protocol layer.

    qemu's file child inherits the option from its format node, so a format's
    own ordering flushes (qcow2's refcounts before L2 tables, FVD's journal
    before its tables) do nothing either, not just the user's flushes: an
    unsafe convert makes no fdatasync. A power cut may then leave the image
    inconsistent, which is what the user accepted; a process that exits, even
    by a crash, loses nothing, since the page cache keeps every write.
    """
    storage.flush = _skip_flush  # type: ignore[method-assign]


def _skip_flush() -> None:
    """A flush under cache.no-flush."""


class StorageDriver(abc.ABC):
    """Opens and creates one kind of Storage (registered by plugins)."""

    name: str = ""
    #: Paths starting with this prefix go to this driver (e.g. "memory:").
    prefix: str | None = None

    @abc.abstractmethod
    def open(self, path: str, *, read_only: bool, direct: bool = False) -> Storage: ...

    @abc.abstractmethod
    def create(self, path: str) -> Storage:
        """Create (or truncate to zero) a writable store."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    def resolve(self, path: str, relative_to: str | None) -> str:
        """Where a backing reference recorded in ``relative_to`` points."""
        return path

    def is_sibling(self, path: str, holder: str) -> bool:
        """Whether an image at ``holder`` may name ``path`` (on this store)
        without the user allowing the protocol: a remote store says yes only
        for the same bucket or server, so an image cannot make corefmt read
        elsewhere with the user's credentials."""
        return True

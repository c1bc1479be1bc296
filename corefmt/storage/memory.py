"""The ``memory`` storage driver: named in-process byte stores.

Paths look like ``memory:NAME``; stores live until ``MemoryStorageDriver.
forget`` or process exit, so chains of memory images can refer to each
other by name. Meant for tests and for building images in memory.
"""

from __future__ import annotations

from corefmt import sync
from corefmt.errors import CorefmtError
from corefmt.storage.base import Storage, StorageDriver

PREFIX = "memory:"


class _Store:
    """The bytes behind a name, shared by every open of it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = sync.Lock()


class MemoryStorage(Storage):
    def __init__(self, path: str, store: _Store, read_only: bool):
        super().__init__(path, read_only)
        self._store = store

    def size(self) -> int:
        return len(self._store.data)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        with self._store.lock:
            data = self._store.data
            available = max(0, min(len(view), len(data) - offset))
            view[:available] = data[offset:offset + available]
        if available < len(view):
            view[available:] = bytes(len(view) - available)

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        with self._store.lock:
            store = self._store.data
            end = offset + len(data)
            if end > len(store):
                store.extend(bytes(end - len(store)))
            store[offset:end] = data

    def _truncate(self, size: int) -> None:
        with self._store.lock:
            store = self._store.data
            if size < len(store):
                del store[size:]
            else:
                store.extend(bytes(size - len(store)))

    def _grow(self, size: int) -> int:
        """Check and grow under the store's lock, which writes hold too: a
        write past ``size`` meanwhile is never cut off."""
        with self._store.lock:
            store = self._store.data
            current = len(store)
            if size > current:
                store.extend(bytes(size - current))
            return current

    def _zero_range(self, offset: int, length: int) -> bool:
        with self._store.lock:
            self._store.data[offset:offset + length] = bytes(length)
        return True

    def preallocate(self, offset: int, length: int) -> bool:
        """Memory is always allocated: only a range past the end needs growing."""
        self._check_writable()
        with self._store.lock:
            store = self._store.data
            if offset + length > len(store):
                store.extend(bytes(offset + length - len(store)))
        return True

    def allocated_size(self) -> int | None:
        return len(self._store.data)


class MemoryStorageDriver(StorageDriver):
    name = "memory"
    prefix = PREFIX

    def __init__(self) -> None:
        self._stores: dict[str, _Store] = {}
        self._lock = sync.Lock()

    def open(self, path: str, *, read_only: bool, direct: bool = False) -> MemoryStorage:
        with self._lock:
            store = self._stores.get(path)
        if store is None:
            raise CorefmtError(f"Could not open '{path}': No such memory store")
        return MemoryStorage(path, store, read_only)

    def create(self, path: str) -> MemoryStorage:
        with self._lock:
            store = self._stores.setdefault(path, _Store())
        with store.lock:
            store.data.clear()
        return MemoryStorage(path, store, False)

    def exists(self, path: str) -> bool:
        with self._lock:
            return path in self._stores

    def forget(self, path: str) -> None:
        """Drop a store (open handles keep their bytes until closed)."""
        with self._lock:
            self._stores.pop(path, None)

    def resolve(self, path: str, relative_to: str | None) -> str:
        return path if path.startswith(PREFIX) else PREFIX + path

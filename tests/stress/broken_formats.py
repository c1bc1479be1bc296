"""Deliberately broken raw variants: the stress tester must catch each one.

They register through the ordinary plugin hook, as any format would.
"""

from __future__ import annotations

import contextlib
import struct
import threading

from corefmt_raw.driver import RawDriver, RawImage

from corefmt import hookimpl
from corefmt.driver import PROBE_NO, ImageContext
from corefmt.errors import CorefmtError, StorageError
from corefmt.storage.base import Storage

SECTOR_SIZE = 512
#: raw-drop loses writes that start in every DROP_EVERY-th sector.
DROP_EVERY = 5
#: raw-racy rewrites whole chunks of this size without a lock.
RACY_CHUNK = 4096
#: raw-flaky fails writes that start in every FLAKY_EVERY-th sector, unasked.
FLAKY_EVERY = 7
#: What raw-dirtycreate, raw-openwrite and raw-closewrite write before the real data.
JUNK = b"\xa5"


class NoFlushImage(RawImage):
    """Forgets to flush: data is lost when the power goes."""

    def flush(self) -> None:
        pass


class DroppingImage(RawImage):
    """Acknowledges some writes without storing them."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if (offset // SECTOR_SIZE) % DROP_EVERY == DROP_EVERY - 1:
            return
        super().write(offset, data)


class SwallowingImage(RawImage):
    """Hides storage errors: a failed write reports success."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        with contextlib.suppress(StorageError):
            super().write(offset, data)


class RacyImage(RawImage):
    """Read-modify-writes whole chunks with no lock: concurrent writes are lost."""

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        self.request_alignment = SECTOR_SIZE

    def write(self, offset: int, data: bytes | memoryview) -> None:
        start = offset - offset % RACY_CHUNK
        end = min(-(-(offset + len(data)) // RACY_CHUNK) * RACY_CHUNK, self.virtual_size)
        # No sleep needed: the stress scheduler lets other requests complete
        # between this read and the write below, as a slow disk would.
        chunk = bytearray(self.storage.read(start, end - start))
        chunk[offset - start:offset - start + len(data)] = data
        self.storage.write(start, chunk)


class PlainLockImage(RawImage):
    """Correct, but holds a plain ``threading`` lock across storage requests:
    the stress scheduler cannot see who waits for it, and must not hang."""

    _lock = threading.Lock()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        with self._lock:
            super().write(offset, data)


class FlakyImage(RawImage):
    """Fails some writes although the storage never did."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if (offset // SECTOR_SIZE) % FLAKY_EVERY == FLAKY_EVERY - 1:
            raise CorefmtError(f"{self.context.path}: spurious failure at {offset}")
        super().write(offset, data)


class GrowingImage(RawImage):
    """Every flush adds a sector to the file, so the disk grows."""

    def flush(self) -> None:
        self.storage.truncate(self.storage.size() + SECTOR_SIZE)
        super().flush()


def _junk_then_back(storage: Storage, offset: int, length: int) -> None:
    """A non-atomic update: junk first, the real bytes after (a cut between
    the two leaves junk)."""
    keep = storage.read(offset, length)
    storage.write(offset, JUNK * length)
    storage.write(offset, keep)


class OpenWritingImage(RawImage):
    """Rewrites its first sector through junk whenever it opens read-write."""

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        if not storage.read_only and storage.size() >= SECTOR_SIZE:
            _junk_then_back(storage, 0, SECTOR_SIZE)
            storage.flush()


class OpenSwallowingImage(RawImage):
    """Opens even when reading its first sector fails (it trusts what it never read)."""

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        with contextlib.suppress(StorageError):
            storage.read(0, SECTOR_SIZE)


class CloseWritingImage(RawImage):
    """Rewrites its last sector through junk when it closes."""

    def close(self) -> None:
        if not self.storage.read_only and self.storage.size() >= SECTOR_SIZE:
            _junk_then_back(self.storage, self.storage.size() - SECTOR_SIZE, SECTOR_SIZE)
            self.storage.flush()
        super().close()


class ReopenBugImage(RawImage):
    """Its open trips over data it did not expect (a parser bug, not a
    CorefmtError) once the first sector holds anything."""

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        if any(storage.read(0, SECTOR_SIZE)):
            struct.unpack(">Q", b"torn")  # raises struct.error


class DirtyCreateDriver(RawDriver):
    """Creates through junk: the new image holds junk until the last write."""

    def create(self, storage: Storage, size: int, options, backing) -> None:
        storage.truncate(size)
        storage.write(0, JUNK * size)
        storage.flush()
        storage.write(0, bytes(size))
        storage.flush()


def _variant(name: str, image: type[RawImage],
             driver: type[RawDriver] = RawDriver) -> RawDriver:
    class Variant(driver):  # type: ignore[valid-type, misc]
        def probe(self, head: bytes, path: str | None) -> int:
            return PROBE_NO

        def open(self, storage: Storage, context: ImageContext) -> RawImage:
            return image(storage, context)

    Variant.name = name
    return Variant()


VARIANTS = {
    "raw-noflush": NoFlushImage,
    "raw-drop": DroppingImage,
    "raw-swallow": SwallowingImage,
    "raw-racy": RacyImage,
    "raw-plainlock": PlainLockImage,
    "raw-flaky": FlakyImage,
    "raw-grow": GrowingImage,
    "raw-openwrite": OpenWritingImage,
    "raw-openswallow": OpenSwallowingImage,
    "raw-closewrite": CloseWritingImage,
    "raw-reopenbug": ReopenBugImage,
}
#: Variants whose create is broken (their images are plain raw).
CREATE_VARIANTS = {"raw-dirtycreate": DirtyCreateDriver}


@hookimpl
def corefmt_register(registry) -> None:
    for name, image in VARIANTS.items():
        registry.add_format(_variant(name, image))
    for name, driver in CREATE_VARIANTS.items():
        registry.add_format(_variant(name, RawImage, driver))

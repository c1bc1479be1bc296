"""Deliberately broken raw variants: the stress tester must catch each one.

They register through the ordinary plugin hook, as any format would.
"""

from __future__ import annotations

import contextlib
import threading

from corefmt_raw.driver import RawDriver, RawImage

from corefmt import hookimpl
from corefmt.driver import PROBE_NO, ImageContext
from corefmt.errors import StorageError
from corefmt.storage.base import Storage

SECTOR_SIZE = 512
#: raw-drop loses writes that start in every DROP_EVERY-th sector.
DROP_EVERY = 5
#: raw-racy rewrites whole chunks of this size without a lock.
RACY_CHUNK = 4096


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


def _variant(name: str, image: type[RawImage]) -> RawDriver:
    class Variant(RawDriver):
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
}


@hookimpl
def corefmt_register(registry) -> None:
    for name, image in VARIANTS.items():
        registry.add_format(_variant(name, image))

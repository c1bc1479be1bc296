"""raw: virtual offset == host offset; sparseness from the storage's holes."""

from __future__ import annotations

import attrs

from corefmt.block.align import align_up
from corefmt.driver import PROBE_FALLBACK, BackingRef, FormatDriver, Image, ImageContext
from corefmt.errors import OptionError
from corefmt.extents import Extent
from corefmt.options import choice, option
from corefmt.storage.base import Storage

PREALLOCATION_MODES = ("off", "falloc", "full")
#: A raw image's size is whole sectors: a file's tail is rounded up (as qemu does).
SECTOR_SIZE = 512


@attrs.frozen
class RawCreateOptions:
    preallocation: str = option("off", "off: sparse; falloc: reserve space; full: write zeros",
                                validator=choice(*PREALLOCATION_MODES))


class RawImage(Image):
    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        self.request_alignment = storage.request_alignment

    @property
    def virtual_size(self) -> int:  # type: ignore[override]
        return align_up(self.storage.size(), SECTOR_SIZE)

    def block_status(self, offset: int, length: int) -> Extent:
        is_data, run = self.storage.data_run(offset, length)
        return Extent(offset, run, data=is_data, zero=not is_data, allocated=True,
                      host_offset=offset)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.storage.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.storage.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.storage.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self.storage.discard(offset, length)

    def truncate(self, size: int) -> None:
        self.storage.truncate(size)


class RawDriver(FormatDriver):
    name = "raw"
    create_options = RawCreateOptions
    supports_backing = False

    def probe(self, head: bytes, path: str | None) -> int:
        return PROBE_FALLBACK

    def create(self, storage: Storage, size: int, options: RawCreateOptions,
               backing: BackingRef | None) -> None:
        if backing is not None:
            raise OptionError("raw images cannot have a backing file")
        storage.truncate(size)
        if options.preallocation == "falloc":
            if not storage.preallocate(0, size):
                raise OptionError(
                    f"{storage.path}: preallocation=falloc is not supported by this file system"
                )
        elif options.preallocation == "full":
            storage.write_zero_bytes(0, size)
        storage.flush()

    def open(self, storage: Storage, context: ImageContext) -> RawImage:
        return RawImage(storage, context)

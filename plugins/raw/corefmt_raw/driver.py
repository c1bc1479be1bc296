"""raw: virtual offset == host offset; sparseness from the storage's holes."""

from __future__ import annotations

import attrs

from corefmt.block.align import align_up
from corefmt.driver import PROBE_FALLBACK, BackingRef, FormatDriver, Image, ImageContext
from corefmt.errors import OptionError
from corefmt.extents import Extent
from corefmt.options import choice, option, to_bool, to_size
from corefmt.storage.base import Storage

PREALLOCATION_MODES = ("off", "falloc", "full")
#: A raw image's size is whole sectors: a file's tail is rounded up (as qemu does).
SECTOR_SIZE = 512
#: qemu's default extent size hint for new files, and the largest it takes.
DEFAULT_EXTENT_SIZE_HINT = 1024 * 1024
MAX_EXTENT_SIZE_HINT = 2**32 - 1


def _hint_in_range(_instance: object, _attribute: attrs.Attribute, value: int) -> None:
    if value > MAX_EXTENT_SIZE_HINT:
        raise ValueError("Extent size hint is too large")


@attrs.frozen
class RawCreateOptions:
    """raw's create options live on the file (qemu's protocol level)."""

    preallocation: str = option(
        "off", "Preallocation mode (allowed values: off, falloc, full)",
        validator=choice(*PREALLOCATION_MODES), protocol=True)
    nocow: bool = option(False, "Turn off copy-on-write (valid only on btrfs)",
                         converter=to_bool, protocol=True)
    extent_size_hint: int = option(
        DEFAULT_EXTENT_SIZE_HINT, "Extent size hint for the image file, 0 to disable",
        converter=to_size, validator=_hint_in_range, protocol=True)


@attrs.frozen
class RawOpenOptions:
    """qemu's raw format options: a window of the file as the disk."""

    offset: int = option(0, "offset in the file where the disk starts", converter=to_size)
    size: int | None = option(None, "size of the disk (default: to the end of the file)",
                              converter=lambda value: None if value is None else to_size(value))


class RawImage(Image):
    """Guest offset ``o`` is file offset ``o + offset``; with ``size`` the disk
    is a fixed window of the file (qemu's raw ``offset``/``size``)."""

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        self.request_alignment = storage.request_alignment
        options = context.options
        self.offset = getattr(options, "offset", 0)
        self.window = getattr(options, "size", None)
        file_size = storage.size()
        if self.offset > file_size:
            raise OptionError(f"{context.path}: offset {self.offset} is past the end of the "
                              f"file ({file_size} bytes)")
        if self.window is not None and self.offset + self.window > file_size:
            raise OptionError(f"{context.path}: The sum of offset ({self.offset}) and size "
                              f"({self.window}) has to be smaller or equal to the actual "
                              f"size of the containing file ({file_size})")
        if (self.offset or self.window is not None) and max(
                self.offset % SECTOR_SIZE, (self.window or 0) % SECTOR_SIZE):
            raise OptionError(f"{context.path}: offset and size must be multiples of "
                              f"{SECTOR_SIZE}")

    @property
    def virtual_size(self) -> int:  # type: ignore[override]
        if self.window is not None:
            return self.window
        return align_up(self.storage.size() - self.offset, SECTOR_SIZE)

    def block_status(self, offset: int, length: int) -> Extent:
        is_data, run = self.storage.data_run(offset + self.offset, length)
        return Extent(offset, run, data=is_data, zero=not is_data, allocated=True,
                      host_offset=offset + self.offset)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.storage.readinto(offset + self.offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.storage.write(offset + self.offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.storage.write_zeroes(offset + self.offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self.storage.discard(offset + self.offset, length)

    def supports(self, capability: str) -> bool:
        if capability == "truncate" and (self.offset or self.window is not None):
            return False  # a window of a file cannot be resized
        return super().supports(capability)

    def truncate(self, size: int) -> None:
        self.storage.truncate(size)


class RawDriver(FormatDriver):
    name = "raw"
    create_options = RawCreateOptions
    open_options = RawOpenOptions
    supports_backing = False

    def probe(self, head: bytes, path: str | None) -> int:
        return PROBE_FALLBACK

    def create(self, storage: Storage, size: int, options: RawCreateOptions,
               backing: BackingRef | None) -> None:
        if backing is not None:
            raise OptionError("raw images cannot have a backing file")
        storage.set_creation_hints(nocow=options.nocow,
                                   extent_size_hint=options.extent_size_hint)
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

"""raw: virtual offset == host offset; sparseness from the storage's holes."""

from __future__ import annotations

import sys
import threading
from typing import Any

import attrs

from corefmt import known_formats, plugins
from corefmt.block.align import align_up
from corefmt.capabilities import MeasureResult
from corefmt.driver import PROBE_FALLBACK, BackingRef, FormatDriver, Image, ImageContext
from corefmt.errors import NotSupported, OptionError
from corefmt.extents import Extent
from corefmt.options import choice, option, to_bool, to_size
from corefmt.registry import PROBE_HEAD_SIZE
from corefmt.storage.base import Storage

PREALLOCATION_MODES = ("off", "falloc", "full")
#: A raw image's size is whole sectors: a file's tail is rounded up (as qemu does).
SECTOR_SIZE = 512
#: qemu's file driver writes a new or emptied-and-grown file's first block
#: (allocate_first_block), so its alignment can be probed later: 4 KiB, or one
#: sector of a file smaller than that.
FIRST_BLOCK_SIZE = 4096
#: qemu's default extent size hint for new files, and the largest it takes.
DEFAULT_EXTENT_SIZE_HINT = 1024 * 1024
MAX_EXTENT_SIZE_HINT = 2**32 - 1
RAW = "raw"
#: A probed image is guarded where probing looks: a change there could make
#: the next probing open read it as another format (qemu guards its 512 bytes,
#: which are all its probes see; corefmt's plugin probes see this much).
GUARD_WINDOW = PROBE_HEAD_SIZE
#: What qemu's raw driver prints when it opens a probed image read-write.
PROBED_WARNING = (
    "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


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
        #: The format was guessed: changes that would make it probe as another are refused.
        self.guarded = context.probed
        if self.guarded:
            # As qemu: sub-sector requests become read-modify-write of whole
            # sectors, so a partial discard cannot punch a byte out of sector 0.
            self.request_alignment = max(self.request_alignment, SECTOR_SIZE)
        self._guard_lock = threading.Lock()  # check and write of the window as one step
        if context.probed and not context.read_only:
            # qemu's text, on stderr as qemu prints it: scripts grep for it.
            sys.stderr.write(PROBED_WARNING.format(path=context.path))
            sys.stderr.flush()

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
        start = offset + self.offset
        if not self._in_window(start):
            self.storage.write(start, data)
            return
        with self._guard_lock:
            self._check_head("write", start, len(data), data)
            self.storage.write(start, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        start = offset + self.offset
        if not self._in_window(start):
            self.storage.write_zeroes(start, length, unmap=unmap)
            return
        with self._guard_lock:  # zeroing part of the window can complete a magic too
            self._check_head("write", start, length, None)
            self.storage.write_zeroes(start, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        start = offset + self.offset
        if not self._in_window(start):
            self.storage.discard(start, length)
            return
        with self._guard_lock:  # discarded bytes may read back as zeros
            self._check_head("discard", start, length, None)
            self.storage.discard(start, length)

    # -- the guard of a probed image ------------------------------------------------
    def _in_window(self, file_offset: int) -> bool:
        return self.guarded and file_offset < GUARD_WINDOW

    def _check_head(self, operation: str, start: int, length: int,
                    data: bytes | memoryview | None, new_size: int | None = None) -> None:
        """Refuse (qemu's EPERM) a change of the file's first bytes after which
        probing would no longer pick raw; ``data`` None means zeros."""
        size = self.storage.size()
        head = bytearray(self.storage.read(0, min(GUARD_WINDOW, size)))
        if new_size is not None:
            del head[new_size:]
            head.extend(bytes(min(new_size, GUARD_WINDOW) - len(head)))
        end = min(start + length, GUARD_WINDOW)
        if end > start:
            head.extend(bytes(max(end - len(head), 0)))
            head[start:end] = bytes(end - start) if data is None else data[:end - start]
        other = known_formats.probes_as_other(bytes(head), plugins.registry(), RAW)
        if other is not None:
            raise known_formats.ProbedRawWriteError(self.context.path, operation, other)

    def supports(self, capability: str) -> bool:
        if capability == "truncate" and (self.offset or self.window is not None):
            return False  # a window of a file cannot be resized
        return super().supports(capability)

    def truncate(self, size: int, preallocation: str = "off") -> None:
        """Resize the file as qemu's file driver does (handle_aiocb_truncate):
        falloc/full reserve or write the grown part, off allocates the first
        block of a file that was empty."""
        if preallocation not in PREALLOCATION_MODES:
            raise NotSupported(f"Unsupported preallocation mode: {preallocation}")
        old = self.storage.size()
        if not self.guarded:
            self.storage.truncate(size)
        else:
            with self._guard_lock:  # cutting or growing the window changes what probes see
                self._check_head("truncate", size, 0, None, new_size=size)
                self.storage.truncate(size)
        if size > old:
            preallocate(self.storage, old, size, preallocation)


def preallocate(storage: Storage, old: int, size: int, mode: str) -> None:
    """The grown part [old, size) of a raw file as ``mode`` asks."""
    if mode == "falloc":
        if not storage.preallocate(old, size - old):
            raise OptionError(f"{storage.path}: preallocation=falloc is not supported by "
                              "this file system")
    elif mode == "full":
        storage.write_zero_bytes(old, size - old)
    elif old == 0:
        allocate_first_block(storage, size)


def allocate_first_block(storage: Storage, size: int) -> None:
    """qemu's allocate_first_block: zeros written over the file's first block."""
    if size:
        storage.write_zero_bytes(0, min(size, FIRST_BLOCK_SIZE if size >= FIRST_BLOCK_SIZE
                                        else SECTOR_SIZE))


class RawDriver(FormatDriver):
    name = RAW
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
        preallocate(storage, 0, size, options.preallocation)

    def open(self, storage: Storage, context: ImageContext) -> RawImage:
        return RawImage(storage, context)

    def measure(self, size: int, options: RawCreateOptions, source: Any) -> MeasureResult:
        """qemu's raw_measure: the source's virtual size, or the size in whole
        sectors; a raw file's holes count as allocated."""
        required = source.virtual_size if source is not None else align_up(size, SECTOR_SIZE)
        return MeasureResult(required=required, fully_allocated=required)

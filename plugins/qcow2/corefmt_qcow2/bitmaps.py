"""qcow2 persistent dirty bitmaps (qcow2.txt "Bitmaps extension", "Bitmap
directory", "Bitmap table"), kept as qemu keeps them.

The model (qemu's block/qcow2-bitmap.c):

- a read-only open parses and checks the directory and the tables of the
  consistent bitmaps, and writes nothing;
- a read-write open marks every bitmap IN_USE on disk (the directory is
  rewritten in place while AUTOCLEAR_BITMAPS is off, so a torn directory is
  never trusted) before any guest write can land; from then on the bitmaps
  live in memory and every guest write, zeroing and discard sets bits in the
  enabled ones;
- close stores them: new data clusters and tables, a new directory, all
  flushed before the header points at it (IN_USE cleared), then the old
  clusters are freed. A crash before that leaves them IN_USE: inconsistent,
  listed as "in-use" and refused by every operation but remove;
- a bitmaps extension whose AUTOCLEAR_BITMAPS bit is clear was seen by a
  program without bitmap support: it is ignored, and dropped by a
  read-write open (qemu warns; ``check -r`` reclaims the clusters).

Bitmap data are read lazily, one bitmap cluster ("chunk") at a time, so
memory follows what a session touches, not what a header claims.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from corefmt import BitmapInfo, CorefmtError, ImageError, ReadOnlyError, RequestFlags, sync
from corefmt_qcow2.layout import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIRECTORY_ENTRY,
    BITMAPS_EXTENSION,
    ENTRY,
    EXT_BITMAPS,
    TABLE_ENTRY_ALIGNMENT,
    VERSION_3,
    align_up,
    div_round_up,
)

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

# Limits of qemu's qcow2 driver (block/qcow2.h, qcow2-bitmap.c).
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
#: Largest bitmap (bytes of data) qemu keeps in memory.
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023
#: Directory entry flags.
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1
#: Bitmap table entries: bits 1-8 and 56-63 reserved, 9-55 the data cluster,
#: bit 0 (with no cluster) "all ones".
TABLE_ENTRY_RESERVED = 0xFF000000000001FE
TABLE_ENTRY_OFFSET = 0x00FFFFFFFFFFFE00
TABLE_ENTRY_ALL_ONES = 1
BITMAP_TABLE_ENTRY_SIZE = ENTRY.size
#: qemu's default granularity: the cluster size, kept within these.
MIN_DEFAULT_GRANULARITY, MAX_DEFAULT_GRANULARITY = 4096, 65536
MIN_GRANULARITY = 1 << MIN_GRANULARITY_BITS
BITS_PER_BYTE = 8
#: qemu's hint after an inconsistent bitmap's refusal (printed on a line of its own).
INCONSISTENT_HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"
#: The words info prints for the flags.
FLAG_WORDS = ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))


class BitmapError(CorefmtError):
    """A bitmap operation refused, in qemu's words (the CLI adds which one)."""


# -- on-disk structures -------------------------------------------------------------
@attrs.define
class BitmapsExtension:
    """The bitmaps header extension's 24 bytes."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int
    reserved: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        nb_bitmaps, reserved, size, offset = BITMAPS_EXTENSION.unpack(data)
        return cls(nb_bitmaps, size, offset, reserved)

    def pack(self) -> bytes:
        return BITMAPS_EXTENSION.pack(self.nb_bitmaps, self.reserved, self.directory_size,
                                      self.directory_offset)


@attrs.define
class DirectoryEntry:
    """One bitmap directory entry (its name kept as the bytes on disk)."""

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name_bytes: bytes
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @classmethod
    def unpack_from(cls, data: bytes, position: int) -> tuple[DirectoryEntry, int]:
        """The entry at ``position`` and where the next one starts (the caller
        has checked the fixed part fits)."""
        (table_offset, table_size, flags, kind, granularity_bits, name_size,
         extra_size) = BITMAP_DIRECTORY_ENTRY.unpack_from(data, position)
        start = position + BITMAP_DIRECTORY_ENTRY.size
        extra = bytes(data[start:start + extra_size])
        name = bytes(data[start + extra_size:start + extra_size + name_size])
        entry = cls(table_offset, table_size, flags, granularity_bits, name, kind, extra)
        return entry, position + entry_size(name_size, extra_size)

    def pack(self) -> bytes:
        fixed = BITMAP_DIRECTORY_ENTRY.pack(self.table_offset, self.table_size, self.flags,
                                            self.type, self.granularity_bits,
                                            len(self.name_bytes), len(self.extra_data))
        body = fixed + self.extra_data + self.name_bytes
        return body + bytes(-len(body) % TABLE_ENTRY_ALIGNMENT)

    @property
    def name(self) -> str:
        """As qemu reads it: up to the first NUL."""
        return self.name_bytes.split(b"\0", 1)[0].decode("utf-8", "replace")


def entry_size(name_size: int, extra_size: int = 0) -> int:
    return align_up(BITMAP_DIRECTORY_ENTRY.size + name_size + extra_size,
                    TABLE_ENTRY_ALIGNMENT)


def bitmap_bytes(length: int, granularity: int) -> int:
    """Bytes of bitmap data for a disk of ``length`` bytes."""
    return div_round_up(div_round_up(length, granularity), BITS_PER_BYTE)


def flag_words(flags: int) -> list[str]:
    return [word for bit, word in FLAG_WORDS if flags & bit]


def default_granularity(cluster_size: int) -> int:
    """bdrv_get_default_bitmap_granularity for a qcow2 image."""
    return min(MAX_DEFAULT_GRANULARITY, max(MIN_DEFAULT_GRANULARITY, cluster_size))


# -- one bitmap in memory -----------------------------------------------------------
@attrs.define(eq=False)
class Bitmap:
    """A bitmap as a session sees it. ``chunks`` holds the bitmap clusters
    loaded or changed in memory; the others are still what ``source_table``
    says on disk (None: all zeros, after a clear or for a new bitmap)."""

    name: str
    granularity_bits: int
    enabled: bool
    #: IN_USE at open: its data cannot be trusted, it is never updated.
    inconsistent: bool
    #: The on-disk entry (None: added in this session).
    entry: DirectoryEntry | None
    #: The table on disk, whose clusters are freed once the bitmap is stored.
    disk_table: list[int] = attrs.field(factory=list)
    source_table: list[int] | None = None
    chunks: dict[int, bytearray] = attrs.field(factory=dict)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def info(self) -> BitmapInfo:
        flags = ("in-use",) if self.inconsistent else ()
        return BitmapInfo(self.name, self.granularity, flags + (("auto",) if self.enabled
                                                                 else ()))


# -- the image's bitmaps ------------------------------------------------------------
class Bitmaps:
    """Every persistent bitmap of one open image."""

    def __init__(self, image: Qcow2Image):
        self.image = image
        self.path = image.context.path
        self.cluster_size = image.cluster_size
        self.chunk_bits = self.cluster_size * BITS_PER_BYTE
        self._lock = sync.Lock()  # bits set by concurrent writes
        #: The directory on disk (what info shows), and the extension naming it.
        self.entries: list[DirectoryEntry] = []
        self.extension: BitmapsExtension | None = None
        #: An extension a program without bitmap support left behind.
        self.stale = False
        self.bitmaps: list[Bitmap] = []
        #: In a read-write session: memory, not the disk, is the truth.
        self.active = False
        self._enabled: list[Bitmap] = []
        header = image.header
        raw = header.extension(EXT_BITMAPS)
        if raw is None or header.version < VERSION_3:
            return
        if not header.autoclear_features & AUTOCLEAR_BITMAPS:
            self.stale = True
            return
        self._load(raw.data)

    # -- reading ----------------------------------------------------------------------
    def _error(self, offset: int | None, problem: str, structure: str = "bitmaps extension"
               ) -> ImageError:
        return ImageError(self.path, structure, offset, problem)

    def _load(self, data: bytes) -> None:
        if len(data) != BITMAPS_EXTENSION.size:
            raise self._error(None, "bitmaps_ext: Invalid extension length")
        ext = BitmapsExtension.unpack(data)
        if ext.reserved:
            raise self._error(None, "bitmaps_ext: Reserved field is not zero")
        if ext.nb_bitmaps > MAX_BITMAPS:
            raise self._error(None, f"bitmaps_ext: Image has {ext.nb_bitmaps} bitmaps, "
                              f"exceeding the QEMU supported maximum of {MAX_BITMAPS}")
        if ext.nb_bitmaps == 0:
            raise self._error(None, "found bitmaps extension with zero bitmaps")
        if ext.directory_offset % self.cluster_size:
            raise self._error(ext.directory_offset,
                              "bitmaps_ext: invalid bitmap directory offset")
        if ext.directory_size > MAX_DIRECTORY_SIZE:
            raise self._error(None, f"bitmaps_ext: bitmap directory size "
                              f"({ext.directory_size}) exceeds the maximum supported size "
                              f"({MAX_DIRECTORY_SIZE})")
        if ext.directory_size == 0:
            raise self._error(None, "Requested bitmap directory size is zero")
        if not ext.directory_offset or (ext.directory_offset + ext.directory_size
                                        > self.image.storage.size()):
            raise self._error(ext.directory_offset, "Failed to read bitmap directory: "
                              "it lies past the end of the file", "bitmap directory")
        self.extension = ext
        directory = self.image.storage.read(ext.directory_offset, ext.directory_size)
        self.entries = self._parse_directory(directory, ext)
        names: set[str] = set()
        for entry in self.entries:
            if entry.name in names:
                raise self._error(ext.directory_offset,
                                  f"Bitmap already exists: {entry.name}", "bitmap directory")
            names.add(entry.name)
            self.bitmaps.append(self._bitmap_of(entry))
        self._refresh_enabled()

    def _parse_directory(self, directory: bytes, ext: BitmapsExtension
                         ) -> list[DirectoryEntry]:
        """bitmap_list_load: the entries, each checked (check_dir_entry)."""
        entries: list[DirectoryEntry] = []
        position, end = 0, len(directory)
        where = ext.directory_offset
        while position < end:
            if position + BITMAP_DIRECTORY_ENTRY.size > end:
                raise self._error(where + position, "Broken bitmap directory",
                                  "bitmap directory")
            if len(entries) + 1 > ext.nb_bitmaps:
                raise self._error(where + position, "More bitmaps found than specified in "
                                  "header extension", "bitmap directory")
            entry, following = DirectoryEntry.unpack_from(directory, position)
            if following > end:
                raise self._error(where + position, "Broken bitmap directory",
                                  "bitmap directory")
            if entry.extra_data:
                raise self._error(where + position, "Bitmap extra data is not supported",
                                  "bitmap directory")
            if not self._entry_valid(entry):
                raise self._error(where + position, f"Bitmap '{entry.name}' doesn't "
                                  "satisfy the constraints", "bitmap directory")
            entries.append(entry)
            position = following
        if len(entries) != ext.nb_bitmaps:
            raise self._error(where, "Less bitmaps found than specified in header extension",
                              "bitmap directory")
        return entries

    def _entry_valid(self, entry: DirectoryEntry, length: int | None = None) -> bool:
        """check_dir_entry, and the table inside the file."""
        cs = self.cluster_size
        if (entry.table_size == 0 or entry.table_offset == 0 or entry.table_offset % cs
                or entry.table_size > MAX_TABLE_SIZE
                or not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS
                or entry.flags & RESERVED_FLAGS or len(entry.name_bytes) > MAX_NAME_SIZE
                or entry.type != TYPE_DIRTY_TRACKING):
            return False
        physical = entry.table_size * cs
        if physical > MAX_PHYS_SIZE:
            return False
        length = self.image.virtual_size if length is None else length
        if not entry.flags & FLAG_IN_USE and length > (
                physical * BITS_PER_BYTE << entry.granularity_bits):
            return False
        table_end = entry.table_offset + entry.table_size * ENTRY.size
        return entry.flags & FLAG_IN_USE or table_end <= self.image.storage.size()

    def _bitmap_of(self, entry: DirectoryEntry) -> Bitmap:
        inconsistent = bool(entry.flags & FLAG_IN_USE)
        bitmap = Bitmap(entry.name, entry.granularity_bits, bool(entry.flags & FLAG_AUTO),
                        inconsistent, entry)
        if not inconsistent:  # an IN_USE bitmap's table is never read (as qemu)
            bitmap.disk_table = self._read_table(entry)
            bitmap.source_table = bitmap.disk_table
        return bitmap

    def _read_table(self, entry: DirectoryEntry) -> list[int]:
        """bitmap_table_load and load_bitmap_data's size check."""
        cs = self.cluster_size
        wanted = div_round_up(bitmap_bytes(self.image.virtual_size, 1 << entry.granularity_bits),
                              cs)
        problem = None
        if wanted != entry.table_size:
            problem = (f"Could not read bitmap '{entry.name}' from image: its table has "
                       f"{entry.table_size} entries, the disk needs {wanted}")
        raw = self.image.storage.read(entry.table_offset, entry.table_size * ENTRY.size)
        table = [value for (value,) in ENTRY.iter_unpack(raw)]
        file_end = self.image.storage.size()
        for index, value in enumerate(table):
            offset = value & TABLE_ENTRY_OFFSET
            if problem:
                break
            if (value & TABLE_ENTRY_RESERVED or (offset and value & TABLE_ENTRY_ALL_ONES)
                    or offset % cs):
                problem = (f"Could not read bitmap_table table from image for bitmap "
                           f"'{entry.name}': Invalid argument (entry {index}: {value:#x})")
            elif offset >= file_end:
                problem = (f"Could not read bitmap '{entry.name}' from image: data cluster "
                           f"{offset:#x} lies past the end of the file")
        if problem:
            raise self._error(entry.table_offset, problem, "bitmap table")
        return table

    def _refresh_enabled(self) -> None:
        self._enabled = [bitmap for bitmap in self.bitmaps
                         if bitmap.enabled and not bitmap.inconsistent]

    # -- a read-write session -----------------------------------------------------------
    def open_read_write(self) -> None:
        """Drop a stale extension; mark the bitmaps IN_USE on disk (flushed)
        before anything else is written; from now on memory is the truth."""
        image, header = self.image, self.image.header
        if self.stale:
            warnings.warn("a program lacking bitmap support modified this file, so all "
                          "bitmaps are now considered inconsistent", stacklevel=2)
            header.set_extension(EXT_BITMAPS, None)
            image.write_header()
            self.stale = False
            return
        if not self.bitmaps or image.context.for_check:
            return  # check (and check -r) leaves the bitmaps as they are
        self._check_unshared()
        self.active = True
        if all(entry.flags & FLAG_IN_USE for entry in self.entries):
            return
        for entry in self.entries:
            entry.flags |= FLAG_IN_USE
        self._rewrite_directory_in_place()

    def _check_unshared(self) -> None:
        """Clusters a store will free must be the bitmaps' own: no metadata,
        nothing named twice (a hostile table could make close free an L2)."""
        cs = self.cluster_size
        places = self.image._metadata_places()
        owners: dict[int, str] = {}

        def claim(offset: int, length: int, what: str) -> None:
            for cluster in range(offset // cs, div_round_up(offset + length, cs)):
                other = places.get(cluster) or owners.get(cluster)
                if other:
                    raise self._error(offset, f"{what} overlaps with {other}", "bitmap table")
                owners[cluster] = what

        assert self.extension is not None
        claim(self.extension.directory_offset, self.extension.directory_size,
              "bitmap directory")
        for bitmap in self.bitmaps:
            if bitmap.inconsistent or bitmap.entry is None:
                continue
            claim(bitmap.entry.table_offset, bitmap.entry.table_size * ENTRY.size,
                  f"bitmap '{bitmap.name}' table")
            for value in bitmap.disk_table:
                if value & TABLE_ENTRY_OFFSET:
                    claim(value & TABLE_ENTRY_OFFSET, cs, f"bitmap '{bitmap.name}' data")

    def _rewrite_directory_in_place(self) -> None:
        """update_ext_header_and_dir_in_place: the directory is rewritten only
        while AUTOCLEAR_BITMAPS is off, so a torn write is never trusted."""
        image, header = self.image, self.image.header
        assert self.extension is not None
        header.autoclear_features &= ~AUTOCLEAR_BITMAPS
        image.write_header()
        image.storage.write(self.extension.directory_offset,
                            b"".join(entry.pack() for entry in self.entries))
        image.storage.flush()
        header.autoclear_features |= AUTOCLEAR_BITMAPS
        image.write_header()

    def note(self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE) -> None:
        """A guest range is about to change: set its bits in every enabled
        bitmap (qemu marks writes, zeroing and discards; copy-on-read and
        prefetch fills change nothing a guest sees)."""
        if not self._enabled or length <= 0 or flags & RequestFlags.FILL:
            return
        with self._lock:
            for bitmap in self._enabled:
                self._set_range(bitmap, offset, length)

    # -- bits -----------------------------------------------------------------------------
    def _total_bits(self, bitmap: Bitmap) -> int:
        return div_round_up(self.image.virtual_size, bitmap.granularity)

    def _table_size(self, bitmap: Bitmap) -> int:
        return div_round_up(bitmap_bytes(self.image.virtual_size, bitmap.granularity),
                            self.cluster_size)

    def _chunk(self, bitmap: Bitmap, index: int) -> bytearray:
        """A bitmap cluster in memory, read from disk the first time."""
        chunk = bitmap.chunks.get(index)
        if chunk is None:
            chunk = bytearray(self._disk_chunk(bitmap, index))
            bitmap.chunks[index] = chunk
        return chunk

    def _disk_chunk(self, bitmap: Bitmap, index: int) -> bytes:
        """What the disk holds for chunk ``index`` (bits past the disk's end
        cleared)."""
        cs = self.cluster_size
        table = bitmap.source_table
        value = table[index] if table is not None and index < len(table) else 0
        if value & TABLE_ENTRY_OFFSET:
            data = bytearray(self.image.storage.read(value & TABLE_ENTRY_OFFSET, cs))
        elif value & TABLE_ENTRY_ALL_ONES:
            data = bytearray(b"\xff" * cs)
        else:
            return bytes(cs)
        self._clear_tail(bitmap, index, data)
        return bytes(data)

    def _clear_tail(self, bitmap: Bitmap, index: int, data: bytearray) -> None:
        valid = self._total_bits(bitmap) - index * self.chunk_bits
        if valid >= self.chunk_bits:
            return
        whole, rest = divmod(max(valid, 0), BITS_PER_BYTE)
        if rest:
            data[whole] &= (1 << rest) - 1
            whole += 1
        data[whole:] = bytes(len(data) - whole)

    def _set_range(self, bitmap: Bitmap, offset: int, length: int) -> None:
        first = offset >> bitmap.granularity_bits
        last = min((offset + length - 1) >> bitmap.granularity_bits,
                   self._total_bits(bitmap) - 1)
        self._set_bits(bitmap, first, last)

    def _set_bits(self, bitmap: Bitmap, first: int, last: int) -> None:
        """Set bits ``first..last`` (inclusive), LSB first in each byte."""
        per = self.chunk_bits
        while first <= last:
            index, start = divmod(first, per)
            stop = min(last - index * per, per - 1)
            chunk = self._chunk(bitmap, index)
            lo_byte, hi_byte = start // BITS_PER_BYTE, stop // BITS_PER_BYTE
            if lo_byte == hi_byte:
                chunk[lo_byte] |= ((1 << (stop - start + 1)) - 1) << (start % BITS_PER_BYTE)
            else:
                chunk[lo_byte] |= (0xFF << (start % BITS_PER_BYTE)) & 0xFF
                chunk[lo_byte + 1:hi_byte] = b"\xff" * (hi_byte - lo_byte - 1)
                chunk[hi_byte] |= (1 << (stop % BITS_PER_BYTE + 1)) - 1
            first = index * per + stop + 1

    def dirty_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        """(offset, length) of the guest ranges a bitmap marks, merged."""
        bitmap = self._find(name)
        run_start: int | None = None
        run_end = 0
        for first, last in self._bit_runs(bitmap):
            start, end = first * bitmap.granularity, (last + 1) * bitmap.granularity
            if run_start is not None and start == run_end:
                run_end = end
                continue
            if run_start is not None:
                yield run_start, min(run_end, self.image.virtual_size) - run_start
            run_start, run_end = start, end
        if run_start is not None:
            yield run_start, min(run_end, self.image.virtual_size) - run_start

    def _bit_runs(self, bitmap: Bitmap) -> Iterator[tuple[int, int]]:
        """(first, last) runs of set bits, chunk by chunk."""
        for index in range(self._table_size(bitmap)):
            data = bitmap.chunks.get(index)
            content = bytes(data) if data is not None else self._disk_chunk(bitmap, index)
            if not content.strip(b"\0"):
                continue
            number = int.from_bytes(content, "little")
            base = index * self.chunk_bits
            while number:
                low = (number & -number).bit_length() - 1
                number >>= low
                ones = (~number & (number + 1)).bit_length() - 1
                yield base + low, base + low + ones - 1
                number >>= ones
                base += low + ones

    # -- operations (qemu-img bitmap) -------------------------------------------------
    def _find(self, name: str) -> Bitmap:
        for bitmap in self.bitmaps:
            if bitmap.name == name:
                return bitmap
        raise BitmapError(f"Dirty bitmap '{name}' not found")

    def _writable(self, bitmap: Bitmap | None = None) -> None:
        if self.image.context.read_only:
            name = bitmap.name if bitmap else "(new)"
            raise ReadOnlyError(f"Bitmap '{name}' is readonly and cannot be modified")

    @staticmethod
    def _consistent(bitmap: Bitmap) -> None:
        if bitmap.inconsistent:
            raise BitmapError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be "
                              f"used\n{INCONSISTENT_HINT}")

    def listing(self) -> list[BitmapInfo]:
        return [bitmap.info() for bitmap in self.bitmaps]

    def directory_info(self) -> list[dict[str, object]]:
        """info's format-specific "bitmaps": the directory on disk."""
        return [{"flags": flag_words(entry.flags), "name": entry.name,
                 "granularity": 1 << entry.granularity_bits} for entry in self.entries]

    def add(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """block-dirty-bitmap-add with persistent=on (stored at close)."""
        self._writable()
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        if granularity is not None:
            if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
                raise BitmapError("Granularity must be power of 2 and at least 512")
        else:
            granularity = default_granularity(self.cluster_size)
        if any(bitmap.name == name for bitmap in self.bitmaps):
            raise BitmapError(f"Bitmap already exists: {name}")
        problem = self._cannot_store(name, granularity)
        if problem:
            raise BitmapError(f"Can't make bitmap '{name}' persistent in '{self.path}': "
                              f"{problem}")
        bits = granularity.bit_length() - 1
        self.bitmaps.append(Bitmap(name, bits, enabled, False, None))
        self.active = True
        self._refresh_enabled()

    def _cannot_store(self, name: str, granularity: int) -> str | None:
        """qcow2_co_can_store_new_dirty_bitmap's refusals."""
        if self.image.header.version < VERSION_3:
            return "Cannot store dirty bitmaps in qcow2 v2 files"
        if granularity.bit_length() - 1 > MAX_GRANULARITY_BITS:
            return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
        needed = bitmap_bytes(self.image.virtual_size, granularity)
        if needed > MAX_PHYS_SIZE or needed > MAX_TABLE_SIZE * self.cluster_size:
            return "Too much space will be occupied by the bitmap. Use larger granularity"
        if len(name.encode()) > MAX_NAME_SIZE:
            return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        if len(self.bitmaps) + 1 > MAX_BITMAPS:
            return "Maximum number of persistent bitmaps is already reached"
        size = sum(entry_size(len(b.name.encode())) for b in self.bitmaps)
        if size + entry_size(len(name.encode())) > MAX_DIRECTORY_SIZE:
            return "Not enough space in the bitmap directory"
        return None

    def remove(self, name: str) -> None:
        """block-dirty-bitmap-remove: gone from the directory at once, its
        clusters freed after the new directory is on disk."""
        bitmap = self._find(name)
        self._writable(bitmap)
        with self.image.lock:
            self.bitmaps.remove(bitmap)
            self._refresh_enabled()
            if bitmap.entry is None:
                return
            gone = bitmap.entry
            self._replace_directory([entry for entry in self.entries if entry is not gone])
            self._free_table(bitmap)
            self.image.flush_locked()

    def clear(self, name: str) -> None:
        bitmap = self._find(name)
        self._writable(bitmap)
        self._consistent(bitmap)
        with self._lock:
            bitmap.source_table = None
            bitmap.chunks.clear()

    def enable(self, name: str, enabled: bool = True) -> None:
        bitmap = self._find(name)
        self._writable(bitmap)
        self._consistent(bitmap)
        bitmap.enabled = enabled
        self._refresh_enabled()

    def merge(self, name: str, source_name: str, source: Bitmaps | None = None) -> None:
        """block-dirty-bitmap-merge: ``name`` |= ``source_name`` (of this image
        or of ``source``), at any pair of granularities."""
        bitmap = self._find(name)
        self._writable(bitmap)
        self._consistent(bitmap)
        origin = source or self
        other = origin._find(source_name)
        origin._consistent(other)
        if origin.image.virtual_size != self.image.virtual_size:
            raise BitmapError(f"Bitmaps are of different sizes (destination size is "
                              f"{self.image.virtual_size}, source size is "
                              f"{origin.image.virtual_size}) and can't be merged")
        runs = list(origin._bit_runs(other))
        with self._lock:
            for first, last in runs:
                start = first << other.granularity_bits
                self._set_range(bitmap, start, (last - first + 1) << other.granularity_bits)

    # -- resize -----------------------------------------------------------------------------
    def check_resize(self) -> None:
        """qcow2_truncate_bitmaps_check: an inconsistent bitmap cannot follow."""
        for bitmap in self.bitmaps:
            self._consistent(bitmap)

    def resized(self, old_size: int) -> None:
        """The disk is now ``image.virtual_size``: chunks past the end go,
        the last one loses its bits past the end (a grown disk starts clean)."""
        with self._lock:
            for bitmap in self.bitmaps:
                if bitmap.inconsistent:
                    continue
                count = self._table_size(bitmap)
                for index in [index for index in bitmap.chunks if index >= count]:
                    del bitmap.chunks[index]
                if bitmap.source_table is not None:
                    old_bits = div_round_up(old_size, bitmap.granularity)
                    if count and self._total_bits(bitmap) < old_bits:
                        self._chunk(bitmap, count - 1)
                    bitmap.source_table = bitmap.source_table[:count]
                for index, chunk in bitmap.chunks.items():
                    self._clear_tail(bitmap, index, chunk)

    # -- storing ------------------------------------------------------------------------
    def store(self) -> None:
        """qcow2_store_persistent_dirty_bitmaps, at close (the caller holds the
        metadata lock): data and tables, then the directory, all durable
        before the header names them; then the old clusters are freed."""
        if not self.active or self.image.context.read_only:
            return
        self.active = False
        live = [bitmap for bitmap in self.bitmaps if not bitmap.inconsistent]
        if not live:
            return
        stored: list[tuple[Bitmap, DirectoryEntry, list[int]]] = []
        entries: list[DirectoryEntry] = []
        for bitmap in self.bitmaps:
            if bitmap.inconsistent:
                assert bitmap.entry is not None
                entries.append(bitmap.entry)
                continue
            offset, table = self._store_bitmap(bitmap)
            entry = DirectoryEntry(offset, len(table), FLAG_AUTO if bitmap.enabled else 0,
                                   bitmap.granularity_bits, bitmap.name.encode())
            entries.append(entry)
            stored.append((bitmap, entry, table))
        self._replace_directory(entries)
        for bitmap, entry, table in stored:
            self._free_table(bitmap)
            bitmap.entry, bitmap.disk_table, bitmap.source_table = entry, table, table
            bitmap.chunks.clear()
        self.image.flush_locked()

    def _store_bitmap(self, bitmap: Bitmap) -> tuple[int, list[int]]:
        """store_bitmap: each chunk with a bit set in a new cluster, then the
        table; (table offset, table)."""
        image, cs = self.image, self.cluster_size
        table: list[int] = []
        for index in range(self._table_size(bitmap)):
            chunk = bitmap.chunks.get(index)
            content = bytes(chunk) if chunk is not None else self._disk_chunk(bitmap, index)
            if not content.strip(b"\0"):
                table.append(0)
                continue
            host = image.refcounts.allocate(1)
            image.check_overlap(host, cs)
            image.storage.write(host, content)
            table.append(host)
        raw = b"".join(ENTRY.pack(value) for value in table)
        clusters = div_round_up(len(raw), cs)
        host = image.refcounts.allocate(clusters)
        image.check_overlap(host, clusters * cs)
        image.storage.write(host, raw + bytes(clusters * cs - len(raw)))
        return host, table

    def _replace_directory(self, entries: list[DirectoryEntry]) -> None:
        """update_ext_header_and_dir: a new directory in new clusters, durable
        with its refcounts (and everything written before) before the header
        names it; the old directory's clusters are freed after."""
        image, header, cs = self.image, self.image.header, self.cluster_size
        old = self.extension
        if entries:
            raw = b"".join(entry.pack() for entry in entries)
            clusters = div_round_up(len(raw), cs)
            offset = image.refcounts.allocate(clusters)
            image.check_overlap(offset, clusters * cs)
            image.storage.write(offset, raw + bytes(clusters * cs - len(raw)))
            image.refcounts.cache.flush(storage=True)
            image.storage.flush()
            self.extension = BitmapsExtension(len(entries), len(raw), offset)
            header.set_extension(EXT_BITMAPS, self.extension.pack())
            header.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            self.extension = None
            header.set_extension(EXT_BITMAPS, None)
            header.autoclear_features &= ~AUTOCLEAR_BITMAPS
        image.write_header()
        self.entries = entries
        if old is not None:
            image._free_clusters(old.directory_offset,
                                 div_round_up(old.directory_size, cs))

    def _free_table(self, bitmap: Bitmap) -> None:
        """free_bitmap_clusters: the data clusters and the table of the bitmap
        as it was on disk, if they are provably its own (else leaked, for
        check -r: never free what something else may use)."""
        if bitmap.entry is not None:
            for offset in self._owned_clusters(bitmap.entry) or ():
                self.image._free_clusters(offset, 1)
        bitmap.entry, bitmap.disk_table = None, []

    def _owned_clusters(self, entry: DirectoryEntry) -> list[int] | None:
        """The table's and its data's clusters, or None if any entry is bad,
        one is named twice, is metadata, or has a refcount other than 1."""
        image, cs = self.image, self.cluster_size
        table_clusters = div_round_up(entry.table_size * ENTRY.size, cs)
        file_end = image.storage.size()
        if (not entry.table_size or entry.table_size > MAX_TABLE_SIZE or entry.table_offset % cs
                or not entry.table_offset or entry.table_offset + table_clusters * cs > file_end):
            return None
        clusters = [entry.table_offset + index * cs for index in range(table_clusters)]
        raw = image.storage.read(entry.table_offset, entry.table_size * ENTRY.size)
        for (value,) in ENTRY.iter_unpack(raw):
            offset = value & TABLE_ENTRY_OFFSET
            if (value & TABLE_ENTRY_RESERVED or (offset and value & TABLE_ENTRY_ALL_ONES)
                    or offset % cs or offset >= file_end):
                return None
            if offset:
                clusters.append(offset)
        places = image._metadata_places()
        if len(set(clusters)) != len(clusters) or any(c // cs in places for c in clusters):
            return None
        if any(image.refcounts.get(c // cs) != 1 for c in clusters):
            return None
        return clusters


class BitmapMethods:
    """The bitmap capabilities (corefmt.capabilities) of an image with a
    ``bitmaps`` attribute; changes reach the disk when the image closes."""

    bitmaps: Bitmaps

    def bitmap_list(self) -> list[BitmapInfo]:
        return self.bitmaps.listing()

    def bitmap_add(self, name: str, granularity: int | None = None,
                   enabled: bool = True) -> None:
        self.bitmaps.add(name, granularity, enabled)

    def bitmap_remove(self, name: str) -> None:
        self.bitmaps.remove(name)

    def bitmap_clear(self, name: str) -> None:
        self.bitmaps.clear(name)

    def bitmap_enable(self, name: str) -> None:
        self.bitmaps.enable(name, True)

    def bitmap_disable(self, name: str) -> None:
        self.bitmaps.enable(name, False)

    def bitmap_merge(self, name: str, source_name: str, source: Any = None) -> None:
        """``source``: another open image with bitmaps (None: this one)."""
        origin = getattr(source, "bitmaps", None) if source is not None else None
        if source is not None and not isinstance(origin, Bitmaps):
            raise BitmapError(f"Dirty bitmap '{source_name}' not found")
        self.bitmaps.merge(name, source_name, origin)

    def bitmap_dirty_ranges(self, name: str) -> list[tuple[int, int]]:
        """(offset, length) of what a bitmap marks, merged runs."""
        return list(self.bitmaps.dirty_ranges(name))

"""FVD's on-disk structures, as the 2011 driver lays them out.

All integers are little endian. The metadata file holds, each region on a
4 KiB boundary: the header region (the 4336-byte header, zero padded to
8 KiB), the bitmap (only with a base image), the table (only for a compact
image), the journal (only when a bitmap or a table exists), then the data
region (unless a separate data file holds the data).
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

import attrs

MAGIC = 0x5143F5A9  # bytes A9 F5 43 51 on disk
MAGIC_BYTES = struct.pack("<I", MAGIC)
VERSION = 1
SECTOR = 512
PAGE = 4096
TRUE, FALSE = 1, 0

#: The packed header struct (fvd.h), 41 fields.
HEADER_STRUCT = struct.Struct("<IIiqq1024s16sqqqiiq1024s16siqqiiiiiiiiiiiqqq2048sqqiiiii16s")
HEADER_SIZE = HEADER_STRUCT.size  # 4336
#: The header region: the header rounded up to a page.
HEADER_REGION = -(-HEADER_SIZE // PAGE) * PAGE  # 8192
#: Byte offset of clean_shutdown inside the header (flipped in place).
CLEAN_SHUTDOWN_OFFSET = 4300

#: Longest strings the fields hold (one byte stays for the NUL).
PATH_FIELD, FORMAT_FIELD, COMMAND_FIELD, UNUSED_FIELD = 1024, 16, 2048, 16

# Table entries (compact images).
TABLE_ENTRY = struct.Struct("<I")
EMPTY_ENTRY = 0xFFFFFFFF
DIRTY_BIT = 0x80000000
CHUNK_ID_MASK = 0x7FFFFFFF
#: Physical chunk ids go up to this one (EMPTY excluded).
MAX_CHUNK_ID = 0x7FFFFFFE

# Journal records (each 512-byte sector stands alone).
JOURNAL_SECTOR = SECTOR
RECORD_END = 0x00000000
RECORD_BITMAP = 0x3F2AB8ED
RECORD_TABLE = 0xB4E6F7AC
RECORD_TYPE = struct.Struct("<I")
BITMAP_RECORD = struct.Struct("<IIq")  # type, nb_sectors, first_sector
TABLE_RECORD_HEAD = struct.Struct("<III")  # type, first_chunk, count
#: Entries of a TABLE record alone in a sector: (512 - 12) / 4.
TABLE_ONLY_ENTRIES = (JOURNAL_SECTOR - TABLE_RECORD_HEAD.size) // TABLE_ENTRY.size  # 125
#: Entries of a TABLE record sharing its sector with a BITMAP record.
MIXED_TABLE_ENTRIES = ((JOURNAL_SECTOR - TABLE_RECORD_HEAD.size - BITMAP_RECORD.size)
                       // TABLE_ENTRY.size)  # 121

# Create defaults (fvd-create.c), and this driver's own (docs/formats/fvd.md).
MODERATE_BITMAP_SIZE = 4 * 1024 * 1024
ORIGINAL_FIRST_BLOCK_SIZE = SECTOR
#: The paper's block size; the 2011 driver started at 512 bytes (§10 #13).
DEFAULT_BLOCK_SIZE = 4 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
DEFAULT_STORAGE_GROW_UNIT = 100 * 1024 * 1024
DEFAULT_JOURNAL_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_OUTSTANDING_COPY_ON_READ = 2_000_000
DEFAULT_PREFETCH_SLOTS = 2
DEFAULT_BYTES_PER_PREFETCH = 1024 * 1024
DEFAULT_PREFETCH_THROTTLE_MS = 30000
DEFAULT_MEASURE_MS = 100
DEFAULT_PERF_ALPHA = 80
DEFAULT_MIN_THROUGHPUT_KBS = 5120
DEFAULT_MAX_THROUGHPUT_KBS = 1_000_000_000
PREFETCH_DISABLED = -1
PROFILE_ENTRY_UNIT = 4096
#: ``add_storage_cmd`` value that means lvextend on the storage's path.
BUILTIN_LVEXTEND = "builtin:lvextend"


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def div_round_up(value: int, unit: int) -> int:
    return -(-value // unit)


def _string(size: int) -> Any:
    return attrs.field(default="", metadata={"string": size})


def _int() -> Any:
    return attrs.field(default=0)


def encode_string(text: str, size: int) -> bytes:
    """A NUL-terminated field of ``size`` bytes (at most size-1 characters)."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) >= size:
        raise ValueError(f"'{text}' is longer than {size - 1} bytes")
    return raw.ljust(size, b"\0")


def decode_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@attrs.define
class FvdHeader:
    """The 4336-byte header (fvd.h ``FvdHeader``), field for field."""

    magic: int = MAGIC
    version: int = VERSION
    all_data_in_fvd_img: int = _int()
    virtual_disk_size: int = _int()
    metadata_size: int = _int()
    base_img: str = _string(PATH_FIELD)
    base_img_fmt: str = _string(FORMAT_FIELD)
    base_img_size: int = _int()
    bitmap_offset: int = _int()
    bitmap_size: int = _int()
    block_size: int = _int()
    copy_on_read: int = _int()
    max_outstanding_copy_on_read_data: int = _int()
    data_file: str = _string(PATH_FIELD)
    data_file_fmt: str = _string(FORMAT_FIELD)
    prefetch_start_delay: int = _int()
    prefetch_profile_offset: int = _int()
    prefetch_profile_entries: int = _int()
    num_prefetch_slots: int = _int()
    bytes_per_prefetch: int = _int()
    prefetch_read_throughput_measure_time: int = _int()
    prefetch_write_throughput_measure_time: int = _int()
    prefetch_perf_calc_alpha: int = _int()
    prefetch_min_read_throughput: int = _int()
    prefetch_min_write_throughput: int = _int()
    prefetch_max_read_throughput: int = _int()
    prefetch_max_write_throughput: int = _int()
    prefetch_throttle_time: int = _int()
    compact_image: int = _int()
    table_offset: int = _int()
    chunk_size: int = _int()
    storage_grow_unit: int = _int()
    add_storage_cmd: str = _string(COMMAND_FIELD)
    journal_offset: int = _int()
    journal_size: int = _int()
    clean_shutdown: int = _int()
    need_zero_init: int = _int()
    generate_prefetch_profile: int = _int()
    unit_of_PrefetchProfileEntry_len: int = _int()
    profile_directed_prefetch_start_delay: int = _int()
    write_updates_base_img: bytes = attrs.field(default=bytes(UNUSED_FIELD))

    STRUCT: ClassVar[struct.Struct] = HEADER_STRUCT

    def pack(self) -> bytes:
        values = []
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            size = field.metadata.get("string")
            values.append(encode_string(value, size) if size else value)
        return self.STRUCT.pack(*values)

    def pack_region(self) -> bytes:
        """The whole header region as create writes it (zero padded)."""
        return self.pack().ljust(HEADER_REGION, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> FvdHeader:
        values = cls.STRUCT.unpack_from(raw)
        kwargs = {}
        for field, value in zip(attrs.fields(cls), values, strict=True):
            kwargs[field.name] = decode_string(value) if field.metadata.get("string") else value
        return cls(**kwargs)

    # -- what the fields mean ----------------------------------------------------------
    @property
    def has_bitmap(self) -> bool:
        return bool(self.base_img) and not self.all_data_in_fvd_img

    @property
    def compact(self) -> bool:
        return bool(self.compact_image)

    @property
    def table_entries(self) -> int:
        return div_round_up(self.virtual_disk_size, self.chunk_size) if self.compact else 0

    @property
    def table_size(self) -> int:
        return round_up(TABLE_ENTRY.size * self.table_entries, PAGE)

    @property
    def data_offset(self) -> int:
        """Where data sector 0 lives in its storage (the original counts in
        sectors: an unaligned metadata_size, spec §10 #11, rounds down)."""
        return 0 if self.data_file else self.metadata_size - self.metadata_size % SECTOR


@attrs.frozen
class BitmapRecord:
    """"Every block overlapping [first_sector, first_sector + nb_sectors) is in FVD"."""

    first_sector: int
    nb_sectors: int

    def pack(self) -> bytes:
        return BITMAP_RECORD.pack(RECORD_BITMAP, self.nb_sectors, self.first_sector)


@attrs.frozen
class TableRecord:
    """Table entries of chunks first_chunk... (bit 31 usually set: replay clears it)."""

    first_chunk: int
    entries: tuple[int, ...]

    def pack(self) -> bytes:
        return (TABLE_RECORD_HEAD.pack(RECORD_TABLE, self.first_chunk, len(self.entries))
                + b"".join(TABLE_ENTRY.pack(entry) for entry in self.entries))


JournalRecord = BitmapRecord | TableRecord


def pack_sector(records: list[JournalRecord]) -> bytes:
    """One journal sector: the records, END if room is left, zeros after it."""
    body = b"".join(record.pack() for record in records)
    if len(body) > JOURNAL_SECTOR:
        raise ValueError(f"journal records of {len(body)} bytes do not fit one sector")
    if len(body) + RECORD_TYPE.size <= JOURNAL_SECTOR:
        body += RECORD_TYPE.pack(RECORD_END)
    return body.ljust(JOURNAL_SECTOR, b"\0")


class MalformedRecord(ValueError):
    """A journal record that cannot be right (the sector's byte offset given)."""

    def __init__(self, offset: int, why: str):
        super().__init__(why)
        self.offset = offset


def unpack_sector(raw: bytes | memoryview, *, strict: bool = False) -> list[JournalRecord]:
    """The records of one journal sector, in order. Parsing stops at END, at
    an unknown type, or at a record that would cross the sector's end (the
    original stops at both; ``strict`` raises MalformedRecord instead, for check)."""
    records: list[JournalRecord] = []
    at = 0
    while at + RECORD_TYPE.size <= JOURNAL_SECTOR:
        (kind,) = RECORD_TYPE.unpack_from(raw, at)
        if kind == RECORD_END:
            break
        if kind == RECORD_BITMAP:
            if at + BITMAP_RECORD.size > JOURNAL_SECTOR:
                if strict:
                    raise MalformedRecord(at, "BITMAP record crosses the sector's end")
                break
            _, count, first = BITMAP_RECORD.unpack_from(raw, at)
            if strict and (first < 0 or count == 0):
                raise MalformedRecord(at, f"BITMAP record of {count} sectors at {first}")
            records.append(BitmapRecord(first, count))
            at += BITMAP_RECORD.size
        elif kind == RECORD_TABLE:
            if at + TABLE_RECORD_HEAD.size > JOURNAL_SECTOR:
                if strict:
                    raise MalformedRecord(at, "TABLE record crosses the sector's end")
                break
            _, first, count = TABLE_RECORD_HEAD.unpack_from(raw, at)
            end = at + TABLE_RECORD_HEAD.size + TABLE_ENTRY.size * count
            if count == 0 or end > JOURNAL_SECTOR:
                if strict:
                    raise MalformedRecord(at, f"TABLE record of {count} entries does not "
                                          "fit its sector")
                break
            entries = struct.unpack_from(f"<{count}I", raw, at + TABLE_RECORD_HEAD.size)
            records.append(TableRecord(first, entries))
            at = end
        else:
            if strict:
                raise MalformedRecord(at, f"unknown journal record type 0x{kind:08x}")
            break
    return records

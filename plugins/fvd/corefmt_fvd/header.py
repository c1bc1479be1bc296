"""Reading an FVD header from untrusted bytes: every size and offset is
checked before anything is read or allocated by it."""

from __future__ import annotations

from corefmt import ImageError
from corefmt_fvd.layout import (
    HEADER_REGION,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_ID,
    SECTOR,
    VERSION,
    FvdHeader,
    div_round_up,
)

#: Limits no real image comes near; a header asking for more is refused.
MAX_BITMAP_BYTES = 512 * 1024 * 1024
MAX_TABLE_BYTES = 512 * 1024 * 1024
#: Replay reads the whole journal at an unclean open: bounded here.
MAX_JOURNAL_BYTES = 4 << 30
MAX_VIRTUAL_SIZE = 1 << 62
MAX_UNIT = 1 << 30

STRUCTURE = "FVD header"


def _fail(path: str | None, offset: int, message: str) -> ImageError:
    return ImageError(path, STRUCTURE, offset, message)


def unpack_header(raw: bytes, path: str | None, file_size: int) -> FvdHeader:
    if len(raw) < HEADER_SIZE:
        raise _fail(path, 0, f"the file has {file_size} bytes, fewer than an FVD header "
                    f"({HEADER_SIZE})")
    header = FvdHeader.unpack(raw)
    if header.magic != MAGIC:
        raise _fail(path, 0, f"bad magic 0x{header.magic:08x} (not an FVD image)")
    if header.version != VERSION:
        raise _fail(path, 4, f"unsupported FVD version {header.version} (only {VERSION})")
    check_header(header, path, file_size)
    return header


def check_header(header: FvdHeader, path: str | None, file_size: int) -> None:
    """Refuse a header whose fields cannot describe a real image."""
    size = header.virtual_disk_size
    if size < 0 or size % SECTOR or size > MAX_VIRTUAL_SIZE:
        raise _fail(path, 12, f"virtual disk size {size} is not a multiple of {SECTOR} "
                    "bytes between 0 and 4 EiB")
    regions: list[tuple[str, int, int, int]] = []
    if header.has_bitmap:
        block, base = header.block_size, header.base_img_size
        if block <= 0 or block % SECTOR or block > MAX_UNIT:
            raise _fail(path, 1092, f"block size {block} is not a positive multiple of "
                        f"{SECTOR} up to 1 GiB")
        if base < 0 or base % SECTOR or base > size:
            raise _fail(path, 1068, f"base image size {base} is not a multiple of {SECTOR} "
                        f"within the virtual size {size}")
        needed = div_round_up(div_round_up(base, block), 8)
        if header.bitmap_size < needed or header.bitmap_size > MAX_BITMAP_BYTES:
            raise _fail(path, 1084, f"bitmap of {header.bitmap_size} bytes cannot hold "
                        f"{div_round_up(base, block)} blocks (or is over 512 MiB)")
        regions.append(("bitmap", 1076, header.bitmap_offset, header.bitmap_size))
    if header.compact:
        chunk = header.chunk_size
        if chunk <= 0 or chunk % SECTOR or chunk > MAX_UNIT:
            raise _fail(path, 2220, f"chunk size {chunk} is not a positive multiple of "
                        f"{SECTOR} up to 1 GiB")
        if header.table_entries > MAX_CHUNK_ID + 1 or header.table_size > MAX_TABLE_BYTES:
            raise _fail(path, 2220, f"a table of {header.table_entries} chunks is too large")
        if header.storage_grow_unit < 0:
            raise _fail(path, 2228, f"storage grow unit {header.storage_grow_unit} is "
                        "negative")
        regions.append(("table", 2212, header.table_offset, header.table_size))
    journal = header.journal_size
    if journal:
        if journal < 0 or journal % SECTOR or journal > MAX_JOURNAL_BYTES:
            raise _fail(path, 4292, f"journal size {journal} is not a positive multiple of "
                        f"{SECTOR} up to 4 GiB")
        regions.append(("journal", 4284, header.journal_offset, journal))
    # Any length: the 2011 driver added an unrounded journal_size to plain
    # images' metadata (spec §10 #11), so their data may start off a sector.
    if header.metadata_size < HEADER_REGION:
        raise _fail(path, 20, f"metadata size {header.metadata_size} is less than "
                    f"{HEADER_REGION}")
    placed: list[tuple[int, int, str]] = []
    metadata_end = header.metadata_size - header.metadata_size % SECTOR  # where data start
    for name, field, offset, length in regions:
        if offset % SECTOR or offset < HEADER_REGION or offset + length > metadata_end:
            raise _fail(path, field, f"the {name} at {offset} ({length} bytes) lies outside "
                        f"the metadata region [{HEADER_REGION}, {metadata_end})")
        if offset + length > file_size:
            raise _fail(path, field, f"the {name} at {offset} ({length} bytes) lies past the "
                        f"end of the file ({file_size} bytes)")
        for other_start, other_end, other in placed:
            if offset < other_end and other_start < offset + length:
                raise _fail(path, field, f"the {name} at {offset} overlaps the {other}")
        placed.append((offset, offset + length, name))

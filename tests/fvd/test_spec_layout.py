"""FVD's on-disk layout, byte for byte, from the spec (/work/shared/spec/fvd.md).

The expectations here are built from the spec's own tables, never from the
driver's code: the header from §2.1's field table (each field packed alone
at its offset), the bitmap from §3.1's bit rule, the journal records from
§5.1's record table, and the created layouts from §2.4's worked examples.
Only ``corefmt_fvd.layout.unpack_sector`` / ``pack_sector`` and the public
corefmt API are driven.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from corefmt_fvd import layout

import corefmt

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

# -- §2.1: the header's field table, transcribed --------------------------------------
#: (offset, size, type, field) exactly as the spec's table lists them.
FIELDS = [
    (0, 4, "u32", "magic"),
    (4, 4, "u32", "version"),
    (8, 4, "i32", "all_data_in_fvd_img"),
    (12, 8, "i64", "virtual_disk_size"),
    (20, 8, "i64", "metadata_size"),
    (28, 1024, "char", "base_img"),
    (1052, 16, "char", "base_img_fmt"),
    (1068, 8, "i64", "base_img_size"),
    (1076, 8, "i64", "bitmap_offset"),
    (1084, 8, "i64", "bitmap_size"),
    (1092, 4, "i32", "block_size"),
    (1096, 4, "i32", "copy_on_read"),
    (1100, 8, "i64", "max_outstanding_copy_on_read_data"),
    (1108, 1024, "char", "data_file"),
    (2132, 16, "char", "data_file_fmt"),
    (2148, 4, "i32", "prefetch_start_delay"),
    (2152, 8, "i64", "prefetch_profile_offset"),
    (2160, 8, "i64", "prefetch_profile_entries"),
    (2168, 4, "i32", "num_prefetch_slots"),
    (2172, 4, "i32", "bytes_per_prefetch"),
    (2176, 4, "i32", "prefetch_read_throughput_measure_time"),
    (2180, 4, "i32", "prefetch_write_throughput_measure_time"),
    (2184, 4, "i32", "prefetch_perf_calc_alpha"),
    (2188, 4, "i32", "prefetch_min_read_throughput"),
    (2192, 4, "i32", "prefetch_min_write_throughput"),
    (2196, 4, "i32", "prefetch_max_read_throughput"),
    (2200, 4, "i32", "prefetch_max_write_throughput"),
    (2204, 4, "i32", "prefetch_throttle_time"),
    (2208, 4, "i32", "compact_image"),
    (2212, 8, "i64", "table_offset"),
    (2220, 8, "i64", "chunk_size"),
    (2228, 8, "i64", "storage_grow_unit"),
    (2236, 2048, "char", "add_storage_cmd"),
    (4284, 8, "i64", "journal_offset"),
    (4292, 8, "i64", "journal_size"),
    (4300, 4, "i32", "clean_shutdown"),
    (4304, 4, "i32", "need_zero_init"),
    (4308, 4, "i32", "generate_prefetch_profile"),
    (4312, 4, "i32", "unit_of_PrefetchProfileEntry_len"),
    (4316, 4, "i32", "profile_directed_prefetch_start_delay"),
    (4320, 16, "char", "write_updates_base_img"),
]
CODES = {"u32": "I", "i32": "i", "i64": "q"}
SPEC_FORMAT = "<IIiqq1024s16sqqqiiq1024s16siqqiiiiiiiiiiiqqq2048sqqiiiii16s"
HEADER_REGION = 8192
SECTOR = 512

# §5.1's record types
BITMAP_TYPE, TABLE_TYPE, END_TYPE = 0x3F2AB8ED, 0xB4E6F7AC, 0
DIRTY = 0x80000000


def field_code(size: int, kind: str) -> str:
    return f"{size}s" if kind == "char" else CODES[kind]


def my_format() -> str:
    return "<" + "".join(field_code(size, kind) for _, size, kind, _ in FIELDS)


def pack_header(values: dict) -> bytes:
    """The 8192-byte header region: each field packed on its own at the
    table's offset (unnamed fields stay 0, the region's tail stays zero)."""
    names = {name for *_, name in FIELDS}
    assert set(values) <= names, set(values) - names
    region = bytearray(HEADER_REGION)
    for offset, size, kind, name in FIELDS:
        value = values.get(name, b"" if kind == "char" else 0)
        if kind == "char":
            value = value.encode() if isinstance(value, str) else value
            assert len(value) < size
            region[offset:offset + size] = value.ljust(size, b"\0")
        else:
            struct.pack_into("<" + CODES[kind], region, offset, value)
    return bytes(region)


def field(raw: bytes, name: str) -> int | bytes:
    for offset, size, kind, field_name in FIELDS:
        if field_name == name:
            (value,) = struct.unpack_from("<" + field_code(size, kind), raw, offset)
            return value
    raise KeyError(name)


def ru(value: int, unit: int) -> int:
    return -(-value // unit) * unit


# -- §2.1 ---------------------------------------------------------------------------
def test_field_table_is_packed_and_4336_bytes():
    at = 0
    for offset, size, _, name in FIELDS:
        assert offset == at, f"{name} at {offset}, the previous field ends at {at}"
        at += size
    assert at == 4336 == 0x10F0
    assert len(FIELDS) == 41
    assert struct.calcsize(my_format()) == 4336
    assert my_format() == SPEC_FORMAT
    assert layout.HEADER_STRUCT.format == my_format()
    assert layout.HEADER_SIZE == 4336
    assert layout.HEADER_REGION == HEADER_REGION


def test_magic_and_version_bytes():
    region = pack_header({"magic": 0x5143F5A9, "version": 1})
    assert region[:8] == bytes([0xA9, 0xF5, 0x43, 0x51, 0x01, 0x00, 0x00, 0x00])
    header = layout.FvdHeader()
    assert header.pack()[:8] == region[:8]


def _distinct_values() -> dict:
    """A different value for every field (strings of their own, negative ints
    where the type is signed), so a field packed at the wrong place shows."""
    values: dict = {}
    rng = random.Random(41)
    for index, (_, size, kind, name) in enumerate(FIELDS):
        if kind == "char":
            values[name] = f"f{index}-" + "".join(rng.choice("abcxyz/._") for _ in
                                                  range(min(size - 5, 9)))
        elif kind == "u32":
            values[name] = 0x01020304 + index
        elif kind == "i32":
            values[name] = -(index * 1000 + 7)
        else:
            values[name] = -(index << 40) - 3
    values["magic"], values["version"] = 0x5143F5A9, 1
    return values


def test_every_field_at_its_offset_both_ways():
    values = _distinct_values()
    expected = pack_header(values)[:4336]
    kwargs = {name: (value.encode() if name == "write_updates_base_img" else value)
              for name, value in values.items()}
    if isinstance(kwargs["write_updates_base_img"], bytes):
        kwargs["write_updates_base_img"] = kwargs["write_updates_base_img"].ljust(16, b"\0")
    header = layout.FvdHeader(**kwargs)
    assert header.pack() == expected
    assert header.pack_region() == pack_header(values)
    parsed = layout.FvdHeader.unpack(expected)
    for _, _, _kind, name in FIELDS:
        got = getattr(parsed, name)
        if name == "write_updates_base_img":
            assert got.rstrip(b"\0") == values[name].encode()
        else:
            assert got == values[name], name


# -- §2.4: the worked examples, created by corefmt -------------------------------------
def _base_defaults(block: int, base_size: int, base_path: str) -> dict:
    """§2.4 step 5's stored defaults for an image with a base."""
    return {
        "base_img": base_path, "base_img_fmt": "raw", "base_img_size": base_size,
        "bitmap_offset": 8192, "block_size": block, "copy_on_read": 0,
        "max_outstanding_copy_on_read_data": 2_000_000, "prefetch_start_delay": -1,
        "num_prefetch_slots": 2, "bytes_per_prefetch": ru(MiB, block),
        "prefetch_throttle_time": 30000, "prefetch_read_throughput_measure_time": 100,
        "prefetch_write_throughput_measure_time": 100, "prefetch_perf_calc_alpha": 80,
        "prefetch_min_read_throughput": 5120, "prefetch_min_write_throughput": 5120,
        "prefetch_max_read_throughput": 1_000_000_000,
        "prefetch_max_write_throughput": 1_000_000_000, "all_data_in_fvd_img": 0,
        "unit_of_PrefetchProfileEntry_len": 4096, "generate_prefetch_profile": 0,
        "profile_directed_prefetch_start_delay": -1,
    }


#: The spec's table: (id, image size, base size, compact, block, bitmap (off, size),
#: table (off, size), journal (off, size), metadata_size).
EXAMPLES = [
    ("10G-plain", 10 * GiB, None, False, None, None, None, (0, 0), 8192),
    ("10G-compact", 10 * GiB, None, True, None, None, (8192, 40960), (49152, 16 * MiB),
     16_826_368),
    ("1G-base", 1 * GiB, 1 * GiB, False, 512, (8192, 262_144), None, (270336, 16 * MiB),
     17_047_552),
    ("100G-over-20G", 100 * GiB, 20 * GiB, False, 1024, (8192, 2_621_440), None,
     (2629632, 16 * MiB), 19_406_848),
    ("50G-compact-over-1G", 50 * GiB, 1 * GiB, True, 512, (8192, 262_144), (270336, 204_800),
     (475136, 16 * MiB), 17_252_352),
]


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def _check_regions(raw_file: Path, bitmap, table, journal, metadata_size: int) -> None:
    assert raw_file.stat().st_size == metadata_size
    with open(raw_file, "rb") as file:
        if bitmap:
            file.seek(bitmap[0])
            assert file.read(bitmap[1]) == bytes(bitmap[1]), "bitmap not all zero"
        if table:
            file.seek(table[0])
            assert file.read(table[1]) == b"\xff" * table[1], "table not all 0xFF"
        if journal[1]:
            file.seek(journal[0])
            assert file.read(journal[1]) == bytes(journal[1]), "journal not all zero"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_worked_example_created_byte_for_byte(tmp_path, monkeypatch, example):
    name, size, base_size, compact, block, bitmap, table, journal, metadata_size = example
    monkeypatch.chdir(tmp_path)
    options = []
    values = {"magic": 0x5143F5A9, "version": 1, "virtual_disk_size": size,
              "metadata_size": metadata_size, "clean_shutdown": 1,
              "journal_offset": journal[0], "journal_size": journal[1]}
    kwargs = {}
    if base_size is None:
        values["all_data_in_fvd_img"] = 1
    else:
        _sparse(tmp_path / "base.raw", base_size)
        # corefmt's automatic block is 64 KiB (§10 #13): the spec's 512/1024 given
        options.append(f"block_size={block}")
        kwargs = {"backing": "base.raw", "backing_format": "raw"}
        values.update(_base_defaults(block, base_size, "base.raw"))
        values["bitmap_size"] = bitmap[1]
    if compact:
        options.append("compact_image=on")
        values.update({"compact_image": 1, "table_offset": table[0], "chunk_size": MiB,
                       "storage_grow_unit": 100 * MiB})
    image = tmp_path / f"{name}.fvd"
    corefmt.create(str(image), "fvd", size, options=",".join(options), **kwargs)
    with open(image, "rb") as file:
        raw = file.read(HEADER_REGION)
    expected = pack_header(values)
    if raw != expected:
        wrong = [n for off, sz, _, n in FIELDS if raw[off:off + sz] != expected[off:off + sz]]
        raise AssertionError(f"header fields differ: {wrong}")
    assert raw[4336:] == bytes(HEADER_REGION - 4336)
    _check_regions(image, bitmap, table, journal, metadata_size)


def test_default_block_size_is_4k(tmp_path, monkeypatch):
    """§10 #13: corefmt's automatic block size starts at 4 KiB (not the
    2011 driver's 512 bytes) and doubles while the bitmap passes 4 MiB."""
    monkeypatch.chdir(tmp_path)
    _sparse(tmp_path / "base.raw", GiB)
    corefmt.create("a.fvd", "fvd", GiB, backing="base.raw", backing_format="raw")
    raw = (tmp_path / "a.fvd").read_bytes()
    bitmap = GiB // (4 * KiB) // 8
    values = {"magic": 0x5143F5A9, "version": 1, "virtual_disk_size": GiB,
              "clean_shutdown": 1, **_base_defaults(4 * KiB, GiB, "base.raw"),
              "bitmap_size": bitmap, "journal_offset": 8192 + bitmap,
              "journal_size": 16 * MiB, "metadata_size": 8192 + bitmap + 16 * MiB}
    assert raw[:HEADER_REGION] == pack_header(values)
    _check_regions(tmp_path / "a.fvd", (8192, bitmap), None, (8192 + bitmap, 16 * MiB),
                   values["metadata_size"])
    # 128 GiB fills a 4 MiB bitmap at 4 KiB; 4 KiB more doubles the block
    for base_size, block in ((128 * GiB, 4 * KiB), (128 * GiB + 4 * KiB, 8 * KiB)):
        _sparse(tmp_path / "mid.raw", base_size)
        corefmt.create("m.fvd", "fvd", base_size, backing="mid.raw", backing_format="raw")
        with open(tmp_path / "m.fvd", "rb") as file:
            assert field(file.read(HEADER_REGION), "block_size") == block, base_size
    # 2 TiB + 64 KiB of base: 64 KiB blocks need a bitmap over 4 MiB -> 128 KiB
    big = 2 * TiB + 64 * KiB
    _sparse(tmp_path / "big.raw", big)
    corefmt.create("b.fvd", "fvd", 3 * TiB, backing="big.raw", backing_format="raw")
    with open(tmp_path / "b.fvd", "rb") as file:
        head = file.read(HEADER_REGION)
    assert field(head, "block_size") == 128 * KiB
    assert field(head, "bitmap_size") == ru(-(-(big // (128 * KiB) + 1) // 8), 4096)
    assert field(head, "bytes_per_prefetch") == MiB


# -- §3.1: the bitmap's bits, LSB first --------------------------------------------------
@pytest.mark.parametrize("block", [512, 7680, 65536])
def test_bitmap_bits_lsb_first(tmp_path, block):
    base_size = 64 * block + 3 * 512
    (tmp_path / "base.raw").write_bytes(random.Random(block).randbytes(base_size))
    image = tmp_path / "a.fvd"
    corefmt.create(str(image), "fvd", base_size + 16 * block, options=f"block_size={block}",
                   backing="base.raw", backing_format="raw")
    written = [0, 3, 7, 8, 13, 14, 31, 40, 64]  # 64: the last, partial block
    with corefmt.open(str(image), read_only=False) as disk:
        for b in written:
            # one sector inside block b, away from its start (copy-on-write)
            disk.write(b * block + (512 if block > 512 else 0), b"\x5a" * 512)
        # beyond the base: no bit
        disk.write(base_size + block, b"\x11" * 512)
    raw = image.read_bytes()
    bitmap_size = field(raw, "bitmap_size")
    assert field(raw, "bitmap_offset") == 8192
    expected = bytearray(bitmap_size)
    for b in written:
        expected[b // 8] |= 1 << (b % 8)
    assert raw[8192:8192 + bitmap_size] == bytes(expected)
    # and a sector across two blocks sets both
    if block > 512:
        with corefmt.open(str(image), read_only=False) as disk:
            disk.write(50 * block - 256, b"\x77" * 512)
        expected[50 // 8] |= 1 << (50 % 8)
        expected[49 // 8] |= 1 << (49 % 8)
        assert image.read_bytes()[8192:8192 + bitmap_size] == bytes(expected)


# -- §5.1: journal records ---------------------------------------------------------------
def my_bitmap_record(nb_sectors: int, first_sector: int) -> bytes:
    return struct.pack("<IIq", BITMAP_TYPE, nb_sectors, first_sector)


def my_table_record(first_chunk: int, entries: list[int]) -> bytes:
    return struct.pack(f"<III{len(entries)}I", TABLE_TYPE, first_chunk, len(entries), *entries)


def my_sector(*records: bytes) -> bytes:
    body = b"".join(records)
    if len(body) <= SECTOR - 4:
        body += struct.pack("<I", END_TYPE)
    assert len(body) <= SECTOR
    return body.ljust(SECTOR, b"\0")


def test_record_sizes():
    assert len(my_bitmap_record(1, 0)) == 16
    for n in (1, 2, 121, 125):
        assert len(my_table_record(0, [0] * n)) == 12 + 4 * n
    assert len(my_table_record(0, [0] * 125)) == SECTOR
    assert len(my_table_record(0, [0] * 121)) + 16 == SECTOR
    assert layout.TABLE_ONLY_ENTRIES == 125 and layout.MIXED_TABLE_ENTRIES == 121


SECTORS = {
    "bitmap": ([my_bitmap_record(3, 17)], [layout.BitmapRecord(17, 3)]),
    "bitmap-large": ([my_bitmap_record(0xFFFFFFF8, (1 << 40) + 8)],
                     [layout.BitmapRecord((1 << 40) + 8, 0xFFFFFFF8)]),
    "table-dirty": ([my_table_record(40, [DIRTY | 7, DIRTY | 8])],
                    [layout.TableRecord(40, (DIRTY | 7, DIRTY | 8))]),
    # the record written right after a recycle: bit 31 clear (§5.1)
    "table-after-recycle": ([my_table_record(40, [0x00000008])],
                            [layout.TableRecord(40, (8,))]),
    "table-125": ([my_table_record(1000, [DIRTY | i for i in range(125)])],
                  [layout.TableRecord(1000, tuple(DIRTY | i for i in range(125)))]),
    "mixed-121": ([my_table_record(5, [DIRTY | (i + 9) for i in range(121)]),
                   my_bitmap_record(121 * 16, 5 * 16)],
                  [layout.TableRecord(5, tuple(DIRTY | (i + 9) for i in range(121))),
                   layout.BitmapRecord(5 * 16, 121 * 16)]),
    "mixed-small": ([my_table_record(2, [DIRTY | 0, DIRTY | 1]), my_bitmap_record(8, 33)],
                    [layout.TableRecord(2, (DIRTY | 0, DIRTY | 1)), layout.BitmapRecord(33, 8)]),
    "several-bitmaps": ([my_bitmap_record(1, 0), my_bitmap_record(2, 9),
                         my_bitmap_record(16, 100)],
                        [layout.BitmapRecord(0, 1), layout.BitmapRecord(9, 2),
                         layout.BitmapRecord(100, 16)]),
}


@pytest.mark.parametrize("name", SECTORS)
def test_sector_parsed_and_produced_byte_for_byte(name):
    raw_records, records = SECTORS[name]
    sector = my_sector(*raw_records)
    assert layout.unpack_sector(sector) == records
    assert layout.pack_sector(records) == sector
    if sum(map(len, raw_records)) == SECTOR:  # a full sector gets no END
        assert sector == b"".join(raw_records)


def test_parsing_stops_at_end_and_unknown_types():
    garbage = random.Random(5).randbytes(SECTOR)
    # original-style: bytes after END are uninitialised memory
    body = my_bitmap_record(4, 8) + struct.pack("<I", END_TYPE)
    sector = body + garbage[len(body):]
    assert layout.unpack_sector(sector) == [layout.BitmapRecord(8, 4)]
    unknown = my_bitmap_record(4, 8) + struct.pack("<I", 0xDEADBEEF) + my_bitmap_record(1, 99)
    assert layout.unpack_sector(unknown.ljust(SECTOR, b"\0")) == [layout.BitmapRecord(8, 4)]
    assert layout.unpack_sector(bytes(SECTOR)) == []
    with pytest.raises(ValueError):
        layout.pack_sector([layout.TableRecord(0, tuple(range(126)))])
    with pytest.raises(ValueError):
        layout.pack_sector([layout.TableRecord(0, tuple(range(122))), layout.BitmapRecord(0, 1)])


# -- §5.4: replay of a journal written by hand -----------------------------------------
def _create(tmp_path: Path, name: str, size: int, options: str, base: bytes) -> Path:
    (tmp_path / "base.raw").write_bytes(base)
    image = tmp_path / name
    corefmt.create(str(image), "fvd", size, options=options, backing="base.raw",
                   backing_format="raw")
    return image


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def _unclean(path: Path) -> None:
    _poke(path, 4300, struct.pack("<i", 0))


def test_hand_written_journal_replayed_bitmap_only(tmp_path):
    block = 4096
    base = random.Random(1).randbytes(MiB)
    image = _create(tmp_path, "a.fvd", 2 * MiB, f"block_size={block}", base)
    raw = image.read_bytes()
    metadata, journal = field(raw, "metadata_size"), field(raw, "journal_offset")
    rng = random.Random(2)
    journaled = {3: rng.randbytes(block), 10: rng.randbytes(block), 11: rng.randbytes(block),
                 40: rng.randbytes(block), 77: rng.randbytes(block)}
    ignored = 20  # after an unknown record type: parsing of that sector stops
    for b, data in journaled.items():
        _poke(image, metadata + b * block, data)
    _poke(image, metadata + ignored * block, b"\xee" * block)
    spb = block // SECTOR
    garbage = rng.randbytes(SECTOR)
    sectors = [
        my_bitmap_record(spb, 3 * spb) + struct.pack("<I", 0),  # END, then garbage
        my_sector(my_bitmap_record(1, 10 * spb + 2), my_bitmap_record(spb, 11 * spb)),
        my_sector(my_bitmap_record(1, 40 * spb), struct.pack("<I", 0xDEADBEEF),
                  my_bitmap_record(spb, ignored * spb)),
        my_sector(my_bitmap_record(spb, 3 * spb)),  # a stale duplicate
        bytes(SECTOR),  # an empty sector does not end the journal
        my_sector(my_bitmap_record(spb, 77 * spb)),
    ]
    blob = b"".join(s + garbage[len(s):] for s in sectors)
    _poke(image, journal, blob)
    _unclean(image)
    before = image.read_bytes()

    def expected_disk() -> bytes:
        disk = bytearray(base) + bytearray(MiB)
        for b, data in journaled.items():
            disk[b * block:(b + 1) * block] = data
        return bytes(disk)

    # read-only opens replay too (§10 #4 fixed), in memory: the file stays as it was
    with corefmt.open(str(image), read_only=True) as disk:
        assert disk.read(0, 2 * MiB) == expected_disk()
    assert image.read_bytes() == before
    with corefmt.open(str(image), read_only=False) as disk:
        assert disk.read(0, 2 * MiB) == expected_disk()
    after = image.read_bytes()
    assert field(after, "clean_shutdown") == 1
    bits = after[8192:8192 + field(after, "bitmap_size")]
    expected_bits = bytearray(len(bits))
    for b in journaled:
        expected_bits[b // 8] |= 1 << (b % 8)
    assert bits == bytes(expected_bits)
    with corefmt.open(str(image), read_only=True) as disk:
        assert disk.read(0, 2 * MiB) == expected_disk()


def test_hand_written_journal_replayed_compact(tmp_path):
    block = chunk = 4096
    base = random.Random(3).randbytes(MiB)
    image = _create(tmp_path, "c.fvd", 2 * MiB, f"block_size={block},compact_image=on,"
                    f"chunk_size={chunk}", base)
    raw = image.read_bytes()
    metadata, journal = field(raw, "metadata_size"), field(raw, "journal_offset")
    table_offset = field(raw, "table_offset")
    rng = random.Random(4)
    physical = [rng.randbytes(chunk) for _ in range(3)]
    with open(image, "r+b") as file:
        file.truncate(metadata + 3 * chunk)
    for p, data in enumerate(physical):
        _poke(image, metadata + p * chunk, data)
    spc = chunk // SECTOR
    sectors = [
        # the original's mixed sector: TABLE (bit 31 set) then BITMAP over the same range
        my_sector(my_table_record(2, [DIRTY | 0, DIRTY | 1]), my_bitmap_record(2 * spc, 2 * spc)),
        # after a recycle: bit 31 clear; chunk 300 is past the base (no BITMAP record)
        my_sector(my_table_record(300, [2])),
    ]
    _poke(image, journal, b"".join(sectors))
    _unclean(image)

    def expected_disk() -> bytes:
        disk = bytearray(base) + bytearray(MiB)
        disk[2 * chunk:4 * chunk] = physical[0] + physical[1]
        disk[300 * chunk:301 * chunk] = physical[2]
        return bytes(disk)

    with corefmt.open(str(image), read_only=True) as disk:
        assert disk.read(0, 2 * MiB) == expected_disk()
    with corefmt.open(str(image), read_only=False) as disk:
        assert disk.read(0, 2 * MiB) == expected_disk()
        # allocation continues after the replayed chunks (§4.2: used = max id + 1)
        disk.write(100 * chunk, b"\x42" * chunk)
    after = image.read_bytes()
    entries = struct.unpack_from("<512I", after, table_offset)
    expected_entries = [0xFFFFFFFF] * 512
    expected_entries[2], expected_entries[3], expected_entries[300] = 0, 1, 2
    expected_entries[100] = 3
    assert list(entries) == expected_entries
    assert after[table_offset + 2048:table_offset + 4096] == b"\xff" * 2048
    bits = after[8192:8192 + field(after, "bitmap_size")]
    assert bits[0] == 0b1100 and bits[12] == 0b10000 and not any(bits[1:12]) \
        and not any(bits[13:])
    assert field(after, "clean_shutdown") == 1


def test_plain_image_with_the_original_journal_size_quirk_opens(tmp_path):
    """The 2011 driver added an unrounded journal_size to a plain image's
    metadata_size (spec §10 #11) and counted the data offset in sectors:
    the data start at the sector below metadata_size."""
    path = tmp_path / "quirk.fvd"
    metadata = 8192 + 1000
    header = layout.FvdHeader(all_data_in_fvd_img=1, virtual_disk_size=MiB, metadata_size=metadata,
                       clean_shutdown=1)
    data = random.Random(11).randbytes(4096)
    start = metadata - metadata % 512
    path.write_bytes(header.pack_region() + bytes(start - 8192) + data)
    with corefmt.open(str(path)) as disk:
        assert disk.read(0, 4096) == data
        assert disk.read(4096, 4096) == bytes(4096)
    with corefmt.open(str(path), read_only=False) as disk:
        disk.write(8192, b"z" * 512)
    raw = path.read_bytes()
    assert raw[start + 8192:start + 8704] == b"z" * 512
    assert raw[start:start + 4096] == data

"""`corefmt check` on FVD: images corefmt makes, then damaged by editing
their bytes (a physical chunk mapped twice, an entry past the storage, a
malformed or impossible journal record, leaked chunks, a chunk of a base
block missing, table padding), or copied while open (an image not closed
cleanly, its journal holding what the table and bitmap lack). Each is
found in the right category with the right count, repaired where that is
safe, and `corefmt check` exits as qemu-img check does (0 clean, 2
corruptions, 3 leaks only)."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from corefmt_fvd.layout import (
    EMPTY_ENTRY,
    RECORD_TABLE,
    FvdHeader,
    TableRecord,
    pack_sector,
    unpack_sector,
)

import corefmt
from corefmt import CheckFix, ImageError
from tests.fvd.helpers import cli

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB
GROW = 256 * KiB  # 4 chunks of preallocated growth
#: A small compact image (a 64 KiB journal keeps files and scans small).
COMPACT = "compact_image=on,chunk_size=64k,storage_grow_unit=256k,journal_size=64k"
SIZE = 4 * MiB
SECTOR = 512
CLEAN_SHUTDOWN = 4300


# -- running ---------------------------------------------------------------------------
def check(path: Path, *args: str) -> tuple[int, dict, list[str]]:
    """check --output=json: exit status, the document (no file name), stderr lines."""
    status, out, err = cli("check", "--output=json", *args, path)
    document = json.loads(out) if out.strip() else {}
    document.pop("filename", None)
    return status, document, err.splitlines()


def counts(document: dict) -> tuple[int, int, int, int]:
    return (document.get("corruptions", 0), document.get("leaks", 0),
            document.get("corruptions-fixed", 0), document.get("leaks-fixed", 0))


def content(path: Path) -> bytes:
    with corefmt.open(str(path), "fvd", read_only=True) as node:
        return node.read(0, node.virtual_size)


# -- bytes ----------------------------------------------------------------------------
def header(path: Path) -> FvdHeader:
    return FvdHeader.unpack(path.read_bytes()[:4336])


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def peek(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def entry(path: Path, chunk: int) -> int:
    return struct.unpack("<I", peek(path, header(path).table_offset + 4 * chunk, 4))[0]


def set_entry(path: Path, chunk: int, value: int) -> None:
    poke(path, header(path).table_offset + 4 * chunk, struct.pack("<I", value))


def clear_journal(path: Path) -> None:
    """Zero the journal (its stale records would be reported too, see
    test_stale_record_against_an_edited_table)."""
    fields = header(path)
    poke(path, fields.journal_offset, bytes(fields.journal_size))


def journal_sector(path: Path, number: int) -> bytes:
    return peek(path, header(path).journal_offset + SECTOR * number, SECTOR)


def set_journal_sector(path: Path, number: int, raw: bytes) -> None:
    assert len(raw) == SECTOR
    poke(path, header(path).journal_offset + SECTOR * number, raw)


def clean_flag(path: Path) -> int:
    return struct.unpack("<i", peek(path, CLEAN_SHUTDOWN, 4))[0]


# -- images ----------------------------------------------------------------------------
def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def compact(path: Path, chunks: int = 3, options: str = COMPACT) -> Path:
    """Chunks 0..chunks-1 written (physical chunk n holds virtual chunk n), closed cleanly."""
    corefmt.create(str(path), "fvd", SIZE, options=options)
    with corefmt.open(str(path), "fvd") as node:
        for chunk in range(chunks):
            node.write(chunk * CHUNK, pattern(CHUNK, chunk))
    return path


def crashed(directory: Path, options: str = COMPACT, backing: Path | None = None,
            writes: tuple[tuple[int, int], ...] = ((0, 100000), (MiB, CHUNK)),
            name: str = "crashed.fvd", size: int = SIZE) -> tuple[Path, Path]:
    """(an image copied while open after a flush, the same image closed
    cleanly): the copy is what a power cut leaves."""
    clean = directory / "clean.fvd"
    corefmt.create(str(clean), "fvd", size, options=options,
                   backing=str(backing) if backing else None,
                   backing_format="raw" if backing else None)
    copy = directory / name
    with corefmt.open(str(clean), "fvd") as node:
        for index, (offset, length) in enumerate(writes):
            node.write(offset, pattern(length, 100 + index))
        node.flush()
        shutil.copyfile(clean, copy)
    return copy, clean


# -- clean images ---------------------------------------------------------------------
@pytest.mark.parametrize("options", [COMPACT, "", "journal_size=64k", f"{COMPACT},block_size=4k"])
def test_clean_images_check_clean(tmp_path, options):
    path = tmp_path / "img.fvd"
    corefmt.create(str(path), "fvd", SIZE, options=options)
    with corefmt.open(str(path), "fvd") as node:
        node.write(0, pattern(100000, 1))
        node.write(3 * MiB, pattern(5000, 2))
    status, document, errors = check(path)
    assert (status, errors, counts(document)) == (0, [], (0, 0, 0, 0))
    if "compact" in options:
        assert document["total-clusters"] == SIZE // CHUNK
        assert document["allocated-clusters"] == 3
        assert document["image-end-offset"] == header(path).metadata_size + 3 * CHUNK
    else:
        assert "total-clusters" not in document
    status, out, err = cli("check", path)
    assert (status, err) == (0, "")
    assert out.startswith("No errors were found on the image.\n")


def test_clean_image_with_base_checks_clean(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(SIZE, 9))
    for options in ("block_size=64k,journal_size=64k", f"{COMPACT},block_size=16k"):
        path = tmp_path / "img.fvd"
        corefmt.create(str(path), "fvd", SIZE, options=options, backing=str(base),
                       backing_format="raw")
        with corefmt.open(str(path), "fvd") as node:
            node.write(100, b"x" * 70000)
            node.write(2 * MiB + 5, b"y" * 10)
        status, document, errors = check(path)
        assert (status, errors, counts(document)) == (0, [], (0, 0, 0, 0)), options


def test_stale_records_after_recycles_are_not_reported(tmp_path):
    """A 4 KiB journal (8 sectors) recycled many times keeps records from
    before each recycle: all legitimate, in an image closed cleanly and in
    one copied while open (only what the table region lacks is counted)."""
    options = "compact_image=on,chunk_size=4k,storage_grow_unit=64k,journal_size=4k"
    clean = tmp_path / "clean.fvd"
    corefmt.create(str(clean), "fvd", SIZE, options=options)
    copy = tmp_path / "crashed.fvd"
    rng = random.Random(5)
    with corefmt.open(str(clean), "fvd") as node:
        for step in range(60):
            node.write(rng.randrange(0, SIZE // 4096) * 4096, pattern(4096, step))
            node.flush()
        shutil.copyfile(clean, copy)
    status, document, errors = check(clean)
    assert (status, errors, counts(document)) == (0, [], (0, 0, 0, 0))
    # What the copy's table region lacks: entries the clean image has and it has not.
    fields = header(clean)
    missing = sum(1 for chunk in range(fields.table_entries)
                  if entry(copy, chunk) == EMPTY_ENTRY != entry(clean, chunk))
    assert missing
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (missing, 0, 0, 0))
    assert len(errors) == missing
    assert all("is only in the journal" in line for line in errors)
    status, document, _ = check(copy, "-r", "leaks")
    assert (status, counts(document)) == (0, (0, 0, missing, 0))
    assert content(copy) == content(clean)


# -- not closed cleanly -----------------------------------------------------------------
def test_unclean_compact_image(tmp_path):
    """Copied while open: the journal holds the three mappings, the table
    region none; check reports them as corruptions (as qemu-img does a
    dirty lazy-refcounts qcow2 image) without writing, -r writes them."""
    copy, clean = crashed(tmp_path)
    assert clean_flag(copy) == 0
    before = copy.read_bytes()
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (3, 0, 0, 0))
    assert errors == [
        "ERROR chunk 0 -> physical chunk 0 is only in the journal: the image was not closed "
        "cleanly",
        "ERROR chunk 1 -> physical chunk 1 is only in the journal: the image was not closed "
        "cleanly",
        "ERROR chunk 16 -> physical chunk 2 is only in the journal: the image was not closed "
        "cleanly"]
    assert copy.read_bytes() == before  # check opened it for check: nothing written
    status, out, err = cli("check", copy)
    assert status == 2
    assert "3 errors were found on the image." in out
    assert copy.read_bytes() == before
    status, out, err = cli("check", "-r", "leaks", copy)
    assert status == 0, err
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    0 leaked clusters\n    3 corruptions\n\n"
                          "Double checking the fixed image now...\nNo errors were found")
    assert err.count("Repairing chunk") == 3
    assert clean_flag(copy) == 1
    assert [entry(copy, chunk) for chunk in (0, 1, 16)] == [0, 1, 2]
    assert content(copy) == content(clean)


def test_unclean_compact_image_repaired_json(tmp_path):
    copy, _clean = crashed(tmp_path)
    status, document, _ = check(copy, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 3, 0))


def test_unclean_image_with_base_bitmap_records(tmp_path):
    """Non-compact with a base: each run of blocks only the journal marks
    is one corruption (three writes, three runs)."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(SIZE, 7))
    writes = ((0, 64 * KiB), (MiB + 100, 100000), (3 * MiB + 5, 10))
    copy, clean = crashed(tmp_path, "block_size=64k,journal_size=64k", base, writes)
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (3, 0, 0, 0))
    assert errors == [
        "ERROR block 0 marked in this image only in the journal: the image was not closed "
        "cleanly",
        "ERROR blocks 16-17 marked in this image only in the journal: the image was not "
        "closed cleanly",
        "ERROR block 48 marked in this image only in the journal: the image was not closed "
        "cleanly"]
    status, document, _ = check(copy, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 3, 0))
    fields = header(copy)
    assert peek(copy, fields.bitmap_offset, fields.bitmap_size) == \
        peek(clean, fields.bitmap_offset, fields.bitmap_size)
    assert content(copy) == content(clean)


def test_unclean_image_whose_journal_adds_nothing(tmp_path):
    """Marked unclean, the journal's records all in the table already (a
    crash right after a recycle, or amend clean_shutdown=off): nothing to
    report; -r marks it clean."""
    path = compact(tmp_path / "img.fvd")
    poke(path, CLEAN_SHUTDOWN, struct.pack("<i", 0))
    status, document, errors = check(path)
    assert (status, errors, counts(document)) == (0, [], (0, 0, 0, 0))
    assert check(path, "-r", "leaks")[0] == 0
    assert clean_flag(path) == 1


def test_unclean_image_without_journal_is_warned_about(tmp_path):
    path = compact(tmp_path / "img.fvd",
                   options="compact_image=on,chunk_size=64k,storage_grow_unit=256k,"
                           "journal_size=-1")
    assert header(path).journal_size == 0
    poke(path, CLEAN_SHUTDOWN, struct.pack("<i", 0))
    status, document, errors = check(path)
    assert (status, counts(document)) == (0, (0, 0, 0, 0))
    assert errors == ["Warning: the image was not closed cleanly and has no journal: metadata "
                      "changes since it was last written in place may be lost"]
    assert check(path, "-r", "all")[0] == 0
    assert clean_flag(path) == 1
    assert check(path)[2] == []


# -- the table -------------------------------------------------------------------------
def test_duplicate_chunk_mapping(tmp_path):
    """Chunk 0 mapped to physical chunk 2, which chunk 2 uses: one corruption;
    physical chunk 0, used by nobody, is one leak. -r all gives chunk 2 a
    copy (both read as before); the leak stays (no free list)."""
    path = compact(tmp_path / "img.fvd")
    clear_journal(path)
    set_entry(path, 0, 2)
    before = content(path)
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 1, 0, 0))
    assert errors == ["ERROR physical chunk 2 is used by chunks 0, 2",
                      f"Leaked chunk 0 at offset {header(path).metadata_size:#x}: no table "
                      "entry maps it"]
    assert check(path, "-r", "leaks")[1].get("corruptions") == 1  # not a leak's repair
    status, document, errors = check(path, "-r", "all")
    assert (status, counts(document)) == (3, (0, 1, 1, 0))
    assert "Repairing physical chunk 2 is used by chunks 0, 2" in errors
    assert entry(path, 0) == 2 and entry(path, 2) not in (0, 1, 2, EMPTY_ENTRY)
    assert content(path) == before
    # The copies are independent now.
    with corefmt.open(str(path), "fvd") as node:
        node.write(0, b"\xaa" * CHUNK)
        assert node.read(2 * CHUNK, CHUNK) == before[2 * CHUNK:3 * CHUNK]


def test_entry_past_the_storage(tmp_path):
    """Physical chunk 100 of a storage of four chunks: one corruption, not
    repaired (the allocation cursor follows it: physical chunk 3, the
    preallocated one, is then a leak)."""
    path = compact(tmp_path / "img.fvd")
    clear_journal(path)
    set_entry(path, 3, 100)
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 1, 0, 0))
    storage = path.stat().st_size
    offset = header(path).metadata_size + 100 * CHUNK
    assert errors[0] == (f"ERROR chunk 3 maps to physical chunk 100 at offset {offset:#x}, "
                         f"past the end of the data storage ({storage} bytes)")
    assert errors[1].startswith("Leaked chunk 3 ")
    before = path.read_bytes()
    status, document, _ = check(path, "-r", "all")
    assert (status, counts(document)) == (2, (1, 1, 0, 0))
    assert path.read_bytes() == before


def test_interior_leak(tmp_path):
    """Chunk 1's entry lost: physical chunk 1 is leaked (below the last used
    chunk: FVD cannot hand it out again, -r leaves it)."""
    path = compact(tmp_path / "img.fvd")
    clear_journal(path)
    set_entry(path, 1, EMPTY_ENTRY)
    status, document, errors = check(path)
    assert (status, counts(document)) == (3, (0, 1, 0, 0))
    assert errors == [f"Leaked chunk 1 at offset {header(path).metadata_size + CHUNK:#x}: "
                      "no table entry maps it"]
    status, out, _ = cli("check", path)
    assert status == 3
    assert "1 leaked clusters were found on the image." in out
    status, document, _ = check(path, "-r", "leaks")
    assert (status, counts(document)) == (3, (0, 1, 0, 0))


def test_stale_record_against_an_edited_table(tmp_path):
    """The same lost entry with the journal kept: its stale record would map
    chunk 1 again at the next recovery, a corruption in an image closed
    cleanly; -r all zeroes that sector (the table is complete: it holds
    nothing else), the leak stays."""
    path = compact(tmp_path / "img.fvd")
    set_entry(path, 1, EMPTY_ENTRY)
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 1, 0, 0))
    assert errors[0].startswith("ERROR journal sector 0 (offset ")
    assert "records an image closed cleanly does not have (chunk 1 -> 1)" in errors[0]
    status, document, _ = check(path, "-r", "all")
    assert (status, counts(document)) == (3, (0, 1, 1, 0))
    assert journal_sector(path, 0) == bytes(SECTOR)


def test_preallocated_growth_is_not_a_leak_but_more_is(tmp_path):
    """Three chunks used, storage grown by one grow unit (four chunks): no
    leak. Storage past that is leaked, and -r leaks cuts it away."""
    path = compact(tmp_path / "img.fvd")
    metadata = header(path).metadata_size
    assert path.stat().st_size == metadata + GROW
    assert check(path)[0] == 0
    with open(path, "r+b") as file:
        file.truncate(metadata + 16 * CHUNK)
    status, document, errors = check(path)
    assert (status, counts(document)) == (3, (0, 9, 0, 0))
    assert errors == [f"Leaked chunks 7-15 at offset {metadata + 7 * CHUNK:#x} past the last "
                      "used chunk and its storage grow unit (9 chunks)"]
    before = content(path)
    status, document, _ = check(path, "-r", "leaks")
    assert (status, counts(document)) == (0, (0, 0, 0, 9))
    assert path.stat().st_size == metadata + 3 * CHUNK
    assert content(path) == before
    with corefmt.open(str(path), "fvd") as node:  # the storage grows again
        node.write(10 * CHUNK, b"z" * CHUNK)
    assert check(path)[0] == 0


def test_tail_leak_is_not_cut_while_a_corruption_remains(tmp_path):
    path = compact(tmp_path / "img.fvd")
    clear_journal(path)
    metadata = header(path).metadata_size
    with open(path, "r+b") as file:
        file.truncate(metadata + 16 * CHUNK)
    set_entry(path, 0, 2)  # a duplicate: -r leaks does not repair it
    status, document, _ = check(path, "-r", "leaks")
    assert status == 2 and document["leaks"] == 10  # physical chunk 0 and 7-15
    assert path.stat().st_size == metadata + 16 * CHUNK


def test_table_padding(tmp_path):
    """64 entries fill 256 bytes of a 4 KiB table region; a mapping in the
    padding (a resize would make it an entry) is one corruption, -r all
    rewrites the padding."""
    path = compact(tmp_path / "img.fvd")
    fields = header(path)
    poke(path, fields.table_offset + 4 * 100, struct.pack("<I", 1))
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 0, 0, 0))
    assert errors == ["ERROR table padding: 1 entries past the table's 64 are not EMPTY"]
    status, document, _ = check(path, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 1, 0))
    assert peek(path, fields.table_offset + 256, 4096 - 256) == b"\xff" * (4096 - 256)


def test_past_the_allocation_cursor(tmp_path):
    """An entry at or past the next chunk to allocate cannot happen at open
    (the cursor follows the largest entry); on an image in use it would."""
    path = compact(tmp_path / "img.fvd")
    with corefmt.open(str(path), "fvd") as node:
        image = node.layer().image
        image.used_chunks = 2
        found = image.check(CheckFix.NONE)
        image.used_chunks = 3
    assert found.corruptions == 1
    assert found.messages == ["ERROR chunk 2 maps to physical chunk 2, at or past the next "
                              "chunk to allocate (2)"]


# -- the journal ------------------------------------------------------------------------
def test_malformed_journal_records(tmp_path):
    """A TABLE record too long for its sector, and an unknown record type:
    one corruption per sector; -r all zeroes them, the stale records of
    sector 0 stay."""
    path = compact(tmp_path / "img.fvd")
    stale = journal_sector(path, 0)
    assert unpack_sector(stale)  # the writes' records, already in the table
    set_journal_sector(path, 3, struct.pack("<III", RECORD_TABLE, 0, 200).ljust(SECTOR, b"\0"))
    set_journal_sector(path, 5, pack_sector([TableRecord(1, (1,))])[:16] + b"\x99" * 4
                       + bytes(SECTOR - 20))
    set_journal_sector(path, 6, struct.pack("<I", 0x12345678).ljust(SECTOR, b"\1"))
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (3, 0, 0, 0))
    offset = header(path).journal_offset
    assert errors == [
        f"ERROR journal sector 3 (offset {offset + 3 * SECTOR:#x}): TABLE record of 200 "
        "entries does not fit its sector at byte 0",
        f"ERROR journal sector 5 (offset {offset + 5 * SECTOR:#x}): unknown journal record "
        "type 0x99999999 at byte 16",
        f"ERROR journal sector 6 (offset {offset + 6 * SECTOR:#x}): unknown journal record "
        "type 0x12345678 at byte 0"]
    assert check(path, "-r", "leaks")[0] == 2
    status, document, _ = check(path, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 3, 0))
    assert journal_sector(path, 0) == stale
    assert journal_sector(path, 3) == journal_sector(path, 6) == bytes(SECTOR)


def test_malformed_record_in_an_unclean_image(tmp_path):
    """After a crash: the journal-only mappings and a malformed sector;
    -r all writes the mappings in place, then zeroes the sector."""
    copy, clean = crashed(tmp_path)
    set_journal_sector(copy, 7, struct.pack("<I", 0xDEADBEEF).ljust(SECTOR, b"\0"))
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (4, 0, 0, 0))
    assert errors[0].startswith("ERROR journal sector 7 ")
    status, document, _ = check(copy, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 4, 0))
    assert content(copy) == content(clean)


def test_bitmap_record_before_the_disk(tmp_path):
    """A BITMAP record starting at a negative sector is malformed; replayed, it
    must not mark blocks at the end of the bitmap (a negative index wrapped
    around: the base's last block then read as zeros)."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(16 * MiB, 8))  # 32768 blocks of 512 bytes: the whole bitmap
    copy, clean = crashed(tmp_path, "block_size=512,journal_size=64k", base, ((MiB, 4096),),
                          size=16 * MiB)
    set_journal_sector(copy, 3, struct.pack("<IIq", 0x3F2AB8ED, 8, -8).ljust(SECTOR, b"\0"))
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (2, 0, 0, 0))
    assert errors[0].endswith("BITMAP record of 8 sectors at -8 at byte 0")
    assert content(copy)[-SECTOR:] == base.read_bytes()[-SECTOR:]
    assert content(copy) == content(clean)


def test_record_for_chunks_outside_the_table(tmp_path):
    """An unclean image whose journal names chunk 64 of a 64-entry table:
    a normal open refuses it; check opens it, reports one corruption, and
    -r all writes the rest in place and zeroes that sector."""
    copy, clean = crashed(tmp_path)
    set_journal_sector(copy, 2, pack_sector([TableRecord(63, (0x80000005, 0x80000006))]))
    with pytest.raises(ImageError, match=r"TABLE record for chunks 63\.\.64"):
        corefmt.open(str(copy), "fvd", read_only=True).close()
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (4, 0, 0, 0))
    assert errors[0].endswith("TABLE record for chunks 63..64 of a table of 64")
    status, document, _ = check(copy, "-r", "all")
    assert (status, counts(document)) == (0, (0, 0, 4, 0))
    assert content(copy) == content(clean)


def test_record_naming_an_impossible_chunk_id(tmp_path):
    """0x7fffffff (bit 31 clear) is no physical chunk id: a normal open of the
    unclean image refuses it, check reports the sector."""
    copy, _clean = crashed(tmp_path)
    set_journal_sector(copy, 2, pack_sector([TableRecord(5, (0x7FFFFFFF,))]))
    with pytest.raises(ImageError, match="TABLE record maps to chunk 2147483647"):
        corefmt.open(str(copy), "fvd", read_only=True).close()
    status, document, errors = check(copy)
    assert (status, counts(document)) == (2, (4, 0, 0, 0))
    assert errors[0].endswith("TABLE record maps chunk 5 to physical chunk 2147483647, past "
                              "the largest id")


def test_table_record_in_an_image_without_a_table(tmp_path):
    path = tmp_path / "img.fvd"
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    corefmt.create(str(path), "fvd", SIZE, options="journal_size=64k", backing=str(base),
                   backing_format="raw")
    set_journal_sector(path, 0, pack_sector([TableRecord(0, (0x80000000,))]))
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 0, 0, 0))
    assert errors[0].endswith("TABLE record in an image without a table")


def test_journal_and_table_disagree(tmp_path):
    """An unclean image whose journal maps chunk 0 elsewhere than its table:
    which one holds the data is unknown, so -r writes nothing at all."""
    copy, _clean = crashed(tmp_path)
    set_entry(copy, 0, 5)
    status, document, errors = check(copy)
    assert (status, document.get("corruptions")) == (2, 3)
    assert ("ERROR chunk 0 maps to physical chunk 5 in the table and to 0 in journal sector 0"
            in errors)
    before = copy.read_bytes()
    status, document, _ = check(copy, "-r", "all")
    assert status == 2 and not document.get("corruptions-fixed")
    assert copy.read_bytes() == before


# -- the bitmap and the header ------------------------------------------------------------
def test_base_block_without_its_chunk(tmp_path):
    """Compact with a base: a block marked as in the image whose chunk is
    EMPTY reads zeros instead of the base's data (spec §10 #6)."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(SIZE, 3))
    path = tmp_path / "img.fvd"
    corefmt.create(str(path), "fvd", SIZE, options=f"{COMPACT},block_size=16k",
                   backing=str(base), backing_format="raw")
    with corefmt.open(str(path), "fvd") as node:
        node.write(0, b"a" * 1000)  # block 0, chunk 0
    assert check(path)[0] == 0
    fields = header(path)
    bits = bytearray(peek(path, fields.bitmap_offset, 2))
    bits[1] |= 0b00110000  # blocks 12 and 13: chunk 3
    poke(path, fields.bitmap_offset, bytes(bits))
    status, document, errors = check(path)
    assert (status, counts(document)) == (2, (1, 0, 0, 0))
    assert errors == ["ERROR blocks 12-13 marked as in this image, but chunk 3 is not "
                      "allocated: they read as zeros, not as the base's data"]
    assert check(path, "-r", "all")[0] == 2


def test_need_zero_init_on_storage_without_zero_init(tmp_path):
    path = compact(tmp_path / "img.fvd", options="journal_size=64k")
    poke(path, 4304, struct.pack("<i", 1))  # need_zero_init
    assert check(path)[0] == 0  # a file reads unwritten areas as zeros
    with corefmt.open(str(path), "fvd", read_only=True) as node:
        image = node.layer().image
        image.data.has_zero_init = lambda: False
        found = image.check(CheckFix.NONE)
    assert (found.corruptions, found.leaks) == (1, 0)
    assert found.messages == ["ERROR need_zero_init is set but the data storage does not read "
                              "unwritten areas as zeros (zero it, then amend "
                              "need_zero_init=off)"]


def _set_field(path: Path, offset: int, code: str, value: int) -> None:
    poke(path, offset, struct.pack("<" + code, value))


@pytest.mark.parametrize("damage", ["misaligned", "gap", "prefetch", "bitmap", "journal"])
def test_header_warnings(tmp_path, damage):
    """Oddities the image reads right with: a warning each, exit 0."""
    path = tmp_path / "img.fvd"
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    if damage in ("misaligned", "gap"):
        corefmt.create(str(path), "fvd", SIZE)
        metadata = 8704 if damage == "misaligned" else 8192 + 8192
        _set_field(path, 20, "q", metadata)
        gap = metadata - 8192  # the 2011 driver's journal_size quirk (§10 #11) makes both
        expected = ([f"Warning: the data region starts at {metadata}, not on a 4096-byte "
                     "boundary"] if damage == "misaligned" else []) + [
            f"Warning: {gap} bytes before the data region (metadata size {metadata}) belong "
            "to no metadata region"]
    elif damage in ("prefetch", "bitmap"):
        corefmt.create(str(path), "fvd", SIZE, options="block_size=64k,journal_size=64k",
                       backing=str(base), backing_format="raw")
        if damage == "prefetch":
            _set_field(path, 2172, "i", 4096 + 512)
            expected = ["Warning: bytes_per_prefetch 4608 is not a multiple of the block size "
                        "65536"]
        else:
            _set_field(path, 1092, "i", 128 * KiB)  # 32 blocks: 4 bytes of a 4 KiB bitmap
            _set_field(path, 2172, "i", 1024 * KiB)
            fields = header(path)
            _set_field(path, 1084, "q", 8192)  # the bitmap grown over the journal's start..
            _set_field(path, 4284, "q", fields.journal_offset + 4096)  # ..which moves on
            _set_field(path, 4292, "q", fields.journal_size - 4096)
            expected = ["Warning: the bitmap has 8192 bytes, its 32 blocks of 131072 bytes "
                        "need 4096"]
    else:
        corefmt.create(str(path), "fvd", 64 * MiB, options="compact_image=on,chunk_size=4k,"
                       "journal_size=64k")  # 16384 entries want 136 sectors
        _set_field(path, 4292, "q", 4096)
        _set_field(path, 20, "q", header(path).journal_offset + 4096)  # metadata_size
        expected = ["Warning: the journal has 8 sectors, fewer than the 136 the 2011 driver "
                    "needs to journal every table entry once"]
    status, document, errors = check(path)
    assert (status, errors, counts(document)) == (0, expected, (0, 0, 0, 0))


# -- the API --------------------------------------------------------------------------------
def test_check_takes_a_bool(tmp_path):
    """corefmt stress and fuzz call check(False) / check(True)."""
    copy, _clean = crashed(tmp_path)
    with corefmt.open(str(copy), "fvd", read_only=True) as node:
        found = node.layer().image.check(False)
    assert found.corruptions == 3
    with corefmt.open(str(copy), "fvd") as node:  # a read-write open writes its replay
        image = node.layer().image
        assert image.check(True).corruptions == 0


def test_check_of_an_image_in_use(tmp_path):
    """Written and flushed in this session: its records are in the journal
    and not yet in the table region: an image in use, nothing to report."""
    path = compact(tmp_path / "img.fvd")
    with corefmt.open(str(path), "fvd") as node:
        node.write(20 * CHUNK, b"q" * 5000)
        node.flush()
        node.write(30 * CHUNK, b"r" * 5000)  # not flushed: check commits it first
        image = node.layer().image
        assert clean_flag(path) == 0
        found = image.check(CheckFix.NONE)
        assert (found.corruptions, found.leaks, found.messages) == (0, 0, [])
        found = image.check(CheckFix.ALL)
        assert (found.corruptions, found.leaks, found.messages) == (0, 0, [])
        assert node.read(30 * CHUNK, 5000) == b"r" * 5000
    assert check(path)[0] == 0

"""Fuzzing FVD with mutated copies of small valid images, one per option set
the driver lists (over a random raw base) and a plain one: the header's
fields, the bitmap, the table, the journal's bytes, and well-formed journal
records with hostile fields. Every seed image was left unclean with records
in its journal (a flush, then a copy taken before the close), so every open
replays them.

Each case opens read-only, then read-write: reads everything, maps, and
(read-write) writes a little, flushes and reads it back. The outcome is
correct data or a CorefmtError with a one-line message, never another
exception, within a time limit per case and 64 MiB of traced memory.
Correct, where it can be known: a mutation of a field corefmt ignores (the
prefetch and copy-on-read tunables) reads the guest's data exactly; the
read-only and the read-write open read the same; a write reads back. A
short run is in the default suite; ``-m slow`` runs a long one
(FVD_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import random
import re
import struct
import tracemalloc
from pathlib import Path

import attrs
import pytest
from corefmt_fvd.driver import FvdDriver
from corefmt_fvd.layout import (
    BITMAP_RECORD,
    HEADER_STRUCT,
    JOURNAL_SECTOR,
    RECORD_BITMAP,
    RECORD_TABLE,
    TABLE_ENTRY,
    TABLE_RECORD_HEAD,
    FvdHeader,
)

import corefmt
from corefmt.errors import CorefmtError
from tests.fuzzing import CaseTimeout, time_limit
from tests.fvd.helpers import random_base

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

KiB, MiB = 1024, 1024 * 1024
SECTOR = 512
SIZE = MiB
#: Reads of a case stop here (a mutated virtual size may be huge).
READ_LIMIT = 16 * MiB
SHORT_EXAMPLES = 100
LONG_EXAMPLES = int(os.environ.get("FVD_FUZZ_EXAMPLES", "5000"))
#: Per case: seconds, traced bytes, and address space before allocations fail.
CASE_SECONDS = 5.0
MEMORY_BOUND = 64 * MiB
ADDRESS_SPACE_HEADROOM = 512 * MiB
#: Header fields corefmt does not act on: a mutation must read exactly.
IGNORED_FIELDS = frozenset(name for name in attrs.fields_dict(FvdHeader)
                           if "prefetch" in name or name in (
                               "copy_on_read", "max_outstanding_copy_on_read_data",
                               "num_prefetch_slots", "bytes_per_prefetch",
                               "unit_of_PrefetchProfileEntry_len"))
SPECIAL = (0, 1, 0xFF, 0x80, 511, 512, 4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
           1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1)


def _field_offsets() -> dict[str, tuple[int, int]]:
    """(offset, width) of every header field, from the struct's format."""
    codes = re.findall(r"(\d*)([a-zA-Z])", HEADER_STRUCT.format.lstrip("<"))
    offsets, at = {}, 0
    for field, (count, code) in zip(attrs.fields(FvdHeader), codes, strict=True):
        width = struct.calcsize("<" + count + code)
        offsets[field.name] = (at, width)
        at += width
    return offsets


FIELDS = _field_offsets()


@attrs.frozen
class Seed:
    name: str
    image: bytes
    #: The data file's name and bytes, if the set has one.
    data_file: tuple[str, bytes] | None
    guest: bytes
    regions: dict[str, tuple[int, int]]
    #: Journal sectors holding records.
    journal_sectors: tuple[int, ...]


def _random_base(path: Path) -> bytes:
    return random_base(path, SIZE, 21)


def _make_seed(folder: Path, name: str, options: str, base: Path | None) -> Seed:
    """An image with data and journal records, copied unclean (before its close)."""
    folder.mkdir()
    path = folder / "seed.fvd"
    backing = {"backing": str(base), "backing_format": "raw"} if base else {}
    corefmt.create(str(path), "fvd", SIZE, options=options, **backing)
    guest = bytearray(base.read_bytes() if base else bytes(SIZE))
    rng = random.Random(name)
    with corefmt.open(str(path), "fvd") as disk:
        for _ in range(6):  # partial blocks (copy-on-write), several chunks
            length = rng.randrange(1, 40) * SECTOR + rng.choice((0, 100))
            offset = rng.randrange(0, SIZE - length)
            data = rng.randbytes(length)
            disk.write(offset, data)
            guest[offset:offset + length] = data
        disk.flush()  # records in the journal, the regions in place not yet
        image = path.read_bytes()
        header = FvdHeader.unpack(image)
        data_file = None
        if header.data_file:
            data_file = (header.data_file, (folder / header.data_file).read_bytes())
    regions = {"header": (0, HEADER_STRUCT.size)}
    if header.bitmap_size:
        regions["bitmap"] = (header.bitmap_offset, header.bitmap_size)
    if header.compact:
        regions["table"] = (header.table_offset, header.table_size)
    sectors: tuple[int, ...] = ()
    if header.journal_size:
        regions["journal"] = (header.journal_offset, header.journal_size)
        sectors = tuple(at for at in range(header.journal_offset,
                                           header.journal_offset + header.journal_size,
                                           JOURNAL_SECTOR)
                        if any(image[at:at + JOURNAL_SECTOR]))
        assert sectors, f"{name}: no journal records"
    return Seed(name, image, data_file, bytes(guest), regions, sectors)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    directory = tmp_path_factory.mktemp("fvd-fuzz")
    base = directory / "base.raw"
    _random_base(base)
    made = {"plain": _make_seed(directory / "plain", "plain", "", None)}
    for number, options in enumerate(FvdDriver.stress_option_sets):
        name = options or "defaults"
        made[name] = _make_seed(directory / f"set{number}", name, options, base)
    return made


# -- mutations ----------------------------------------------------------------------------
def _value(draw: st.DrawFn, width: int, old: int) -> int:
    value = draw(st.one_of(st.sampled_from(SPECIAL), st.integers(0, (1 << 64) - 1)))
    if draw(st.booleans()):  # a bit flip of what is there
        value = old ^ (1 << draw(st.integers(0, 8 * width - 1)))
    return value & ((1 << (8 * width)) - 1)


@st.composite
def _change(draw: st.DrawFn, seed: Seed) -> tuple[str, int, bytes]:
    """(what, offset, bytes) of one mutation."""
    image = seed.image
    region = draw(st.sampled_from(sorted(seed.regions) + (["record"] if seed.journal_sectors
                                                          else [])))
    if region == "header":
        name = draw(st.sampled_from(sorted(FIELDS)))
        offset, width = FIELDS[name]
        if width > 8:  # a string: a few bytes anywhere in it
            at = offset + draw(st.integers(0, width - 1))
            return name, at, draw(st.binary(min_size=1, max_size=4))
        old = int.from_bytes(image[offset:offset + width], "little")
        return name, offset, _value(draw, width, old).to_bytes(width, "little")
    if region == "record":  # a well-formed record with hostile fields
        at = draw(st.sampled_from(seed.journal_sectors))
        at += draw(st.sampled_from((0, 16, 124, 496)))
        if draw(st.booleans()):
            record = BITMAP_RECORD.pack(RECORD_BITMAP, _value(draw, 4, 0),
                                        _value(draw, 8, 0) - (1 << 63))
        else:
            count = draw(st.integers(0, 130))
            entries = draw(st.lists(st.sampled_from((0, 1, 2, 0x7FFFFFFE, 0x80000001,
                                                     0xFFFFFFFF)), min_size=1, max_size=4))
            record = TABLE_RECORD_HEAD.pack(RECORD_TABLE, _value(draw, 4, 0), count) + b"".join(
                TABLE_ENTRY.pack(entry) for entry in entries)
        return "record", at, record
    start, length = seed.regions[region]
    if region == "journal" and draw(st.booleans()):  # mostly where the records are
        start, length = draw(st.sampled_from(seed.journal_sectors)), JOURNAL_SECTOR
    width = draw(st.sampled_from((1, 2, 4, 8)))
    offset = start + draw(st.integers(0, max(0, length - width)))
    if draw(st.booleans()):
        offset -= (offset - start) % width
    old = int.from_bytes(image[offset:offset + width], "little")
    return region, offset, _value(draw, width, old).to_bytes(width, "little")


@st.composite
def cases(draw: st.DrawFn, seeds: dict[str, Seed]) -> tuple[str, list[tuple[str, int, bytes]]]:
    name = draw(st.sampled_from(sorted(seeds)))
    return name, draw(st.lists(_change(seeds[name]), min_size=1, max_size=3))


# -- running a case -----------------------------------------------------------------------
def _clear(error: CorefmtError) -> None:
    text = str(error)
    assert text.strip() and "\n" not in text, f"not one clear line: {text!r}"


def _exercise(path: Path, read_only: bool) -> dict[int, bytes] | None:
    """Open, read everything (piece by piece), map, and (read-write) write a
    little and read it back; returns the pieces read (None: refused)."""
    pieces: dict[int, bytes] = {}
    try:
        with corefmt.open(str(path), "fvd", read_only=read_only) as disk:
            size = disk.virtual_size
            limit = min(size, READ_LIMIT)
            for start in range(0, limit, MiB):
                try:
                    pieces[start] = disk.read(start, min(MiB, limit - start))
                except CorefmtError as error:
                    _clear(error)
            try:
                disk.block_status(0, limit)
            except CorefmtError as error:
                _clear(error)
            if not read_only and limit:
                length = min(4 * KiB, limit)
                offset = random.Random(limit).randrange(0, limit - length + 1)
                data = random.Random(offset).randbytes(length)
                try:
                    disk.write(offset, data)
                    disk.flush()
                except CorefmtError as error:
                    _clear(error)
                else:
                    assert disk.read(offset, length) == data, "a write did not read back"
    except CorefmtError as error:
        _clear(error)
        return None
    return pieces


def run_case(folder: Path, seed: Seed, changes: list[tuple[str, int, bytes]]) -> None:
    from corefmt.stress.fuzz import _address_space_guard

    data = bytearray(seed.image)
    for _, offset, value in changes:
        data[offset:offset + len(value)] = value
    path = folder / "case.fvd"
    path.write_bytes(data)
    if seed.data_file is not None:
        (folder / seed.data_file[0]).write_bytes(seed.data_file[1])
    exact = all(what in IGNORED_FIELDS for what, _, _ in changes)
    tracemalloc.start()
    try:
        with _address_space_guard(ADDRESS_SPACE_HEADROOM), time_limit(CASE_SECONDS):
            read_only = _exercise(path, read_only=True)
            read_write = _exercise(path, read_only=False)
        peak = tracemalloc.get_traced_memory()[1]
    except CaseTimeout:
        pytest.fail(f"no result within {CASE_SECONDS} s: {seed.name} {changes}")
    except MemoryError:
        pytest.fail(f"allocation beyond {ADDRESS_SPACE_HEADROOM / MiB:.0f} MiB: "
                    f"{seed.name} {changes}")
    except AssertionError as error:
        raise AssertionError(f"{error}: {seed.name} {changes}") from None
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error} for {seed.name} {changes}")
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{peak / MiB:.0f} MiB for {seed.name} {changes}"
    if read_only is not None and read_write is not None:
        for start in read_only.keys() & read_write.keys():
            assert read_only[start] == read_write[start], (
                f"read-only and read-write opens read differently at {start}: "
                f"{seed.name} {changes}")
    if exact:
        for pieces in (read_only, read_write):
            for start, piece in (pieces or {}).items():
                assert piece == seed.guest[start:start + len(piece)], (
                    f"wrong data at {start} after an ignored field changed: "
                    f"{seed.name} {changes}")


def _fuzz(seeds: dict[str, Seed], tmp_path: Path, examples: int) -> None:
    @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                         derandomize=True, phases=[hypothesis.Phase.generate,
                                                   hypothesis.Phase.shrink],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cases(seeds))
    def case(drawn: tuple[str, list[tuple[str, int, bytes]]]) -> None:
        name, changes = drawn
        run_case(tmp_path, seeds[name], changes)

    case()


def test_every_seed_reads_back(seeds: dict[str, Seed], tmp_path: Path) -> None:
    for seed in seeds.values():
        run_case(tmp_path, seed, [("copy_on_read", FIELDS["copy_on_read"][0],
                                   seed.image[FIELDS["copy_on_read"][0]:][:4])])


def test_fuzz_short(seeds: dict[str, Seed], tmp_path: Path) -> None:
    _fuzz(seeds, tmp_path, SHORT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 5,000 cases take longer than the suite's 300 s per test
def test_fuzz_long(seeds: dict[str, Seed], tmp_path: Path) -> None:
    _fuzz(seeds, tmp_path, LONG_EXAMPLES)


def test_a_table_entry_at_the_last_chunk_id_refuses_writes_clearly(seeds: dict[str, Seed],
                                                                  tmp_path: Path) -> None:
    """Found by the fuzzer: an entry naming physical chunk 0x7FFFFFFE leaves
    no chunk id to allocate, and the refusal raised TypeError (StorageError
    built from one string) instead of a clear error."""
    seed = seeds["compact_image=on,chunk_size=4096,journal_size=4096"]
    run_case(tmp_path, seed, [("table", seed.regions["table"][0], b"\xfe")])


def test_a_write_across_chunks_that_share_storage_is_refused(seeds: dict[str, Seed],
                                                             tmp_path: Path) -> None:
    """Found by the long fuzz run: a journal TABLE record mapping 44 virtual
    chunks to physical chunk 0, then a 4 KiB write across two of them (7680-
    byte blocks over 8192-byte chunks): the write overwrote its own first
    half and did not read back. Such a write is now refused with one line."""
    seed = seeds["compact_image=on,chunk_size=8192,block_size=7680,storage_grow_unit=65536"]
    run_case(tmp_path, seed, [
        ("bitmap", seed.regions["bitmap"][0], b"\x00"),
        ("record", seed.regions["journal"][0],
         b"\xac\xf7\xe6\xb4\x00\x00\x00\x00,\x00\x00\x00\x00\x00\x00\x00")])

"""`corefmt amend -f fvd` (qemu-img update's attributes, spec §8.6): each
attribute lands in its header field and nothing else changes; refusals
change nothing; clean_shutdown=off survives the close (§10 #15); a compact
image grows only as far as its table region reaches (§10 #10)."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest
from corefmt_fvd.layout import FvdHeader
from corefmt_fvd.options import FvdAmendOptions

import corefmt
from corefmt import CorefmtError
from tests.fvd.helpers import cli

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
SECTOR = 512
COMPACT = "compact_image=on,chunk_size=64k,storage_grow_unit=256k,journal_size=64k"
CLEAN_SHUTDOWN = 4300


def amend(path: Path, options: str) -> tuple[int, str, str]:
    return cli("amend", "-f", "fvd", "-o", options, path)


def header(path: Path) -> FvdHeader:
    return FvdHeader.unpack(path.read_bytes()[:4336])


def fields(path: Path) -> dict:
    import attrs

    return attrs.asdict(header(path))


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def content(path: Path, backing: bool = True) -> bytes:
    with corefmt.open(str(path), "fvd", read_only=True, backing=backing) as node:
        return node.read(0, node.virtual_size)


def clean_flag(path: Path) -> int:
    with open(path, "rb") as file:
        file.seek(CLEAN_SHUTDOWN)
        return struct.unpack("<i", file.read(4))[0]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.raw"
    path.write_bytes(pattern(SIZE, 1))
    return path


def make(path: Path, options: str = "", base: Path | None = None, size: int = SIZE) -> Path:
    corefmt.create(str(path), "fvd", size, options=options,
                   backing=str(base) if base else None,
                   backing_format="raw" if base else None)
    with corefmt.open(str(path), "fvd") as node:
        node.write(100, pattern(70000, 2))
        node.write(3 * MiB, pattern(4096, 3))
    return path


def changed(before: dict, after: dict) -> dict:
    return {name: after[name] for name in after if after[name] != before[name]}


# -- every attribute ----------------------------------------------------------------------
#: (create options, with a base, amend options, the header fields it must change).
ATTRIBUTES = [
    ("", False, "size=8M", {"virtual_disk_size": 8 * MiB}),
    ("", False, "size=5000000", {"virtual_disk_size": 5000192}),  # rounded up to 512
    ("journal_size=64k", True, "size=6M", {"virtual_disk_size": 6 * MiB}),
    (COMPACT, False, "size=64M", {"virtual_disk_size": 64 * MiB}),
    ("journal_size=64k", True, "base_img=copy.raw", {"base_img": "copy.raw"}),
    ("journal_size=64k", True, "backing_file=copy.raw", {"base_img": "copy.raw"}),
    ("journal_size=64k", True, "base_img_fmt=", {"base_img_fmt": ""}),
    ("journal_size=64k", True, "backing_fmt=", {"base_img_fmt": ""}),
    ("data_file=img.data", False, "data_file=moved.data", {"data_file": "moved.data"}),
    ("data_file=img.data", False, "data_file_fmt=raw", {"data_file_fmt": "raw"}),
    ("", False, "need_zero_init=on", {"need_zero_init": 1}),
    ("journal_size=64k", True, "copy_on_read=on", {"copy_on_read": 1}),
    ("journal_size=64k,copy_on_read=on", True, "copy_on_read=off", {"copy_on_read": 0}),
    ("journal_size=64k", True, "max_outstanding_copy_on_read_data=1M",
     {"max_outstanding_copy_on_read_data": MiB}),
    ("journal_size=64k", True, "max_num_outstanding_prefetch_writes=7", {"num_prefetch_slots": 7}),
    ("journal_size=64k,block_size=64k", True, "bytes_per_prefetch=100k",  # up to a block
     {"bytes_per_prefetch": 128 * KiB}),
    ("journal_size=64k", True, "prefetch_min_read_throughput_threshold=99",
     {"prefetch_min_read_throughput": 99}),
    ("journal_size=64k", True, "prefetch_min_write_throughput_threshold=98",
     {"prefetch_min_write_throughput": 98}),
    ("journal_size=64k", True, "prefetch_perf_calc_alpha=33", {"prefetch_perf_calc_alpha": 33}),
    ("journal_size=64k", True, "prefetch_read_throughput_measure_time=250",
     {"prefetch_read_throughput_measure_time": 250}),
    ("journal_size=64k", True, "prefetch_write_throughput_measure_time=260",
     {"prefetch_write_throughput_measure_time": 260}),
    ("journal_size=64k", True, "prefetch_over_threshold_throttle_time=0",
     {"prefetch_throttle_time": 0}),
    ("journal_size=64k", True, "prefetch_start_delay=5", {"prefetch_start_delay": 5}),
    ("journal_size=64k,prefetch_start_delay=5", True, "prefetch_start_delay=0",
     {"prefetch_start_delay": -1}),
    ("", False, "clean_shutdown=off", {"clean_shutdown": 0}),
    ("journal_size=64k", True,
     "copy_on_read=on,need_zero_init=on,prefetch_perf_calc_alpha=1,size=5M",
     {"copy_on_read": 1, "need_zero_init": 1, "prefetch_perf_calc_alpha": 1,
      "virtual_disk_size": 5 * MiB}),
]


@pytest.mark.parametrize(("create", "backed", "options", "expected"), ATTRIBUTES,
                         ids=[case[2] for case in ATTRIBUTES])
def test_attribute(tmp_path, base, create, backed, options, expected):
    path = make(tmp_path / "img.fvd", create, base if backed else None)
    shutil.copy(base, tmp_path / "copy.raw")
    before_fields, before = fields(path), content(path)
    assert amend(path, options) == (0, "", "")
    assert changed(before_fields, fields(path)) == expected
    if "data_file=" in options:  # the image now names the moved file
        (tmp_path / "img.data").rename(tmp_path / "moved.data")
    after = content(path)
    assert after[:len(before)] == before
    assert after[len(before):] == bytes(len(after) - len(before))
    assert cli("check", path)[0] == 0


def test_base_img_is_used(tmp_path, base):
    """A new base with other content: reads of blocks not copied come from it."""
    path = make(tmp_path / "img.fvd", "block_size=64k,journal_size=64k", base)
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x42" * SIZE)
    assert amend(path, "base_img=other.raw,base_img_fmt=raw") == (0, "", "")
    data = content(path)
    assert data[2 * MiB:2 * MiB + 4096] == b"\x42" * 4096
    assert data[100:70100] == pattern(70000, 2)


@pytest.mark.parametrize("option", ["base_img", "backing_file"])
def test_moved_base_is_repaired(tmp_path, base, option):
    """Renaming the base opens the image without its chain (spec §10 #2: the
    2011 driver could not repair a moved base), so the old base may be gone."""
    path = make(tmp_path / "img.fvd", "journal_size=64k", base)
    expected = content(path)
    base.rename(tmp_path / "moved.raw")
    assert cli("info", "--backing-chain", path)[0] == 1  # info alone opens no chain
    assert amend(path, f"{option}=moved.raw") == (0, "", "")
    assert content(path) == expected
    assert header(path).base_img == "moved.raw"


def test_moved_base_is_repaired_through_the_api(tmp_path, base):
    """Opened without its backing, the image takes the new path."""
    path = make(tmp_path / "img.fvd", "journal_size=64k", base)
    expected = content(path)
    base.rename(tmp_path / "moved.raw")
    with corefmt.open(str(path), "fvd", backing=False) as node:
        node.layer().image.amend(FvdAmendOptions(base_img="moved.raw"))
    assert content(path) == expected


def test_prefetch_fields_without_a_base(tmp_path):
    """Tuning fields are only numbers in the header: stored, unused."""
    path = make(tmp_path / "img.fvd")
    assert amend(path, "prefetch_perf_calc_alpha=50,bytes_per_prefetch=8k") == (0, "", "")
    assert (header(path).prefetch_perf_calc_alpha, header(path).bytes_per_prefetch) == (50,
                                                                                        8192)


# -- refusals -----------------------------------------------------------------------------
REFUSALS = [
    ("", False, "size=2M", "shrinking is not supported"),
    ("", False, "base_img=copy.raw", "created without a base image"),
    ("", False, "base_img_fmt=raw", "created without a base image"),
    ("journal_size=64k", True, "base_img=", "still reads data from its base"),
    ("journal_size=64k", True, "base_img_fmt=bogus", "unknown format 'bogus'"),
    ("journal_size=64k", True, "base_img=copy.raw,backing_file=other.raw", "disagree"),
    ("", False, "data_file=some.data", "keep their data in a separate data file"),
    ("", False, "data_file_fmt=raw", "needs an image with a separate data file"),
    ("data_file=img.data", False, "data_file=", "cannot be cleared"),
    ("data_file=img.data", False, "data_file_fmt=bogus", "unknown format 'bogus'"),
    ("", False, "copy_on_read=on", "copy_on_read needs a base image"),
    ("journal_size=64k", True, "max_outstanding_copy_on_read_data=0", "must be positive"),
    ("journal_size=64k", True, "bytes_per_prefetch=1k", "at least 4096"),
    ("journal_size=64k", True, "prefetch_perf_calc_alpha=101", "between 0 and 100"),
    ("journal_size=64k", True, "max_num_outstanding_prefetch_writes=0", "between 1 and"),
    ("journal_size=64k", True, "copy_on_read=maybe", "expects 'on' or 'off'"),
    (COMPACT, False, "size=65M", "can grow to 67108864 bytes at most"),
    # Refused as a whole: the valid attributes before the bad one are not written.
    ("journal_size=64k", True, "copy_on_read=on,need_zero_init=on,base_img=", "still reads"),
    ("", False, "bogus=1", "Invalid parameter 'bogus'"),
    ("", False, "compact_image=on", "only supported for image creation"),
]


@pytest.mark.parametrize(("create", "backed", "options", "message"), REFUSALS,
                         ids=[case[2] for case in REFUSALS])
def test_refusal(tmp_path, base, create, backed, options, message):
    path = make(tmp_path / "img.fvd", create, base if backed else None)
    shutil.copy(base, tmp_path / "copy.raw")
    before = path.read_bytes()
    status, out, err = amend(path, options)
    assert (status, out) == (1, "")
    assert message in err and err.startswith("corefmt: "), err
    assert path.read_bytes() == before


def test_same_size_changes_nothing(tmp_path):
    path = make(tmp_path / "img.fvd", COMPACT)
    before = path.read_bytes()
    assert amend(path, f"size={SIZE}") == (0, "", "")
    assert path.read_bytes() == before


# -- clean_shutdown -------------------------------------------------------------------------
def test_clean_shutdown_off_survives_the_close(tmp_path):
    """§10 #15: the original's close set it back to TRUE. The journal's
    records stay valid, so the next open replays them harmlessly; that
    session's close marks the image clean again."""
    path = make(tmp_path / "img.fvd", COMPACT)
    expected = content(path)
    assert amend(path, "clean_shutdown=off") == (0, "", "")
    assert clean_flag(path) == 0
    _status, out, _ = cli("info", path)
    assert "clean shutdown: false" in out
    assert content(path) == expected
    with corefmt.open(str(path), "fvd") as node:
        assert node.layer().image.opened_unclean
    assert clean_flag(path) == 1


def test_clean_shutdown_off_through_the_api_with_writes(tmp_path):
    """Writes after the amend, in the same session: the close writes the
    metadata in place and still leaves the flag off."""
    path = make(tmp_path / "img.fvd", COMPACT)
    with corefmt.open(str(path), "fvd") as node:
        node.layer().image.amend(FvdAmendOptions(clean_shutdown=False))
        node.write(2 * MiB, b"w" * 5000)
    assert clean_flag(path) == 0
    assert cli("check", path)[0] == 0  # everything in place: nothing only the journal has
    assert content(path)[2 * MiB:2 * MiB + 5000] == b"w" * 5000


def test_clean_shutdown_on_writes_the_journal_in_place_first(tmp_path):
    """A crashed image marked clean by hand would lose what only its journal
    holds; amend first puts the (replayed) metadata in place."""
    path = tmp_path / "img.fvd"
    corefmt.create(str(path), "fvd", SIZE, options=COMPACT)
    crashed = tmp_path / "crashed.fvd"
    with corefmt.open(str(path), "fvd") as node:
        node.write(0, pattern(3 * 65536, 4))
        node.flush()
        shutil.copyfile(path, crashed)
    expected = content(path)
    assert clean_flag(crashed) == 0
    assert amend(crashed, "clean_shutdown=on") == (0, "", "")
    assert clean_flag(crashed) == 1
    assert cli("check", crashed)[0] == 0
    assert content(crashed) == expected


def test_clean_shutdown_on_in_use(tmp_path):
    """In a session whose records are in the journal only: clean_shutdown=on
    writes them in place before the flag, so a power cut right after it
    loses nothing."""
    path = make(tmp_path / "img.fvd", COMPACT)
    crashed = tmp_path / "crashed.fvd"
    with corefmt.open(str(path), "fvd") as node:
        node.write(MiB, b"k" * 4096)
        node.flush()
        node.layer().image.amend(FvdAmendOptions(clean_shutdown=True))
        assert clean_flag(path) == 1
        shutil.copyfile(path, crashed)
    assert content(crashed)[MiB:MiB + 4096] == b"k" * 4096
    assert cli("check", crashed)[0] == 0


def test_header_rewrite_keeps_an_unclean_flag(tmp_path):
    """An image in use (records in its journal, flag off on disk): an amend of
    another field must not mark it clean behind the journal's back."""
    path = make(tmp_path / "img.fvd", COMPACT)
    crashed = tmp_path / "crashed.fvd"
    with corefmt.open(str(path), "fvd") as node:
        node.write(MiB, b"j" * 4096)
        node.flush()
        node.layer().image.amend(FvdAmendOptions(need_zero_init=True))
        assert clean_flag(path) == 0
        shutil.copyfile(path, crashed)
    assert content(crashed)[MiB:MiB + 4096] == b"j" * 4096  # replayed: the journal counted


# -- size -----------------------------------------------------------------------------------
def test_compact_grow_limit(tmp_path):
    """64 entries of a 4 KiB table region: 1024 fit before the journal, so
    64 MiB of 64 KiB chunks, not a sector more."""
    path = make(tmp_path / "img.fvd", COMPACT)
    fields_before = header(path)
    assert fields_before.journal_offset == fields_before.table_offset + 4096
    status, _out, err = amend(path, f"size={64 * MiB + 512}")
    assert status == 1
    assert ("a compact image with 65536-byte chunks can grow to 67108864 bytes at most"
            in err)
    assert amend(path, "size=64M") == (0, "", "")
    with corefmt.open(str(path), "fvd") as node:
        node.write(64 * MiB - 4096, b"e" * 4096)
        assert node.read(64 * MiB - 4096, 4096) == b"e" * 4096
    assert cli("check", path)[0] == 0
    after = header(path)
    assert (after.journal_offset, after.journal_size) == (fields_before.journal_offset,
                                                          fields_before.journal_size)


def test_compact_grow_with_a_bitmap(tmp_path, base):
    """Bitmap, table, journal: the table may use its region up to the journal;
    the bitmap and the base size stay as they are."""
    path = make(tmp_path / "img.fvd", f"{COMPACT},block_size=64k", base)
    before = header(path)
    assert amend(path, "size=64M") == (0, "", "")
    after = header(path)
    assert (after.base_img_size, after.bitmap_size, after.block_size) == (
        before.base_img_size, before.bitmap_size, before.block_size)
    data = content(path)
    assert data[:SIZE] == content(path)[:SIZE]
    assert data[SIZE:] == bytes(60 * MiB)
    assert amend(path, "size=65M")[0] == 1


def test_compact_grow_rewrites_the_table_padding(tmp_path):
    """A mapping left in the padding (past the 64 entries) must not become
    chunk 100's mapping: the table region is rewritten before the header
    grows."""
    path = make(tmp_path / "img.fvd", COMPACT)
    table = header(path).table_offset
    with open(path, "r+b") as file:
        file.seek(table + 4 * 100)
        file.write(struct.pack("<I", 0))
    assert amend(path, "size=8M") == (0, "", "")
    assert content(path)[100 * 65536:101 * 65536] == bytes(65536)
    with open(path, "rb") as file:
        file.seek(table + 4 * 100)
        assert file.read(4) == b"\xff" * 4


def test_plain_grow_zeroes_what_lies_past_the_old_end(tmp_path):
    """Bytes past the data region's end (no write puts any there) must not
    appear as data when the disk grows."""
    path = make(tmp_path / "img.fvd")
    metadata = header(path).metadata_size
    with open(path, "ab") as file:
        file.truncate(metadata + SIZE)
        file.write(b"\x99" * 8192)
    assert amend(path, "size=5M") == (0, "", "")
    assert content(path)[SIZE:] == bytes(MiB)


def test_data_file_grows_with_the_disk(tmp_path):
    path = make(tmp_path / "img.fvd", "data_file=img.data")
    assert (tmp_path / "img.data").stat().st_size == SIZE
    assert amend(path, "size=6M") == (0, "", "")
    assert (tmp_path / "img.data").stat().st_size == 6 * MiB


def test_truncate_through_the_api(tmp_path):
    """Image.truncate is the same resize: grow only, compact within its region."""
    path = make(tmp_path / "img.fvd", COMPACT)
    with corefmt.open(str(path), "fvd") as node:
        node.truncate(8 * MiB)
        assert node.virtual_size == 8 * MiB
        with pytest.raises(CorefmtError, match="shrinking is not supported"):
            node.truncate(MiB)
        with pytest.raises(CorefmtError, match="can grow to"):
            node.truncate(128 * MiB)
        node.write(7 * MiB, b"t" * 512)
    assert header(path).virtual_disk_size == 8 * MiB
    assert content(path)[7 * MiB:7 * MiB + 512] == b"t" * 512
    assert cli("check", path)[0] == 0


# -- the command line -------------------------------------------------------------------------
def test_option_help_lists_the_options():
    status, out, err = cli("amend", "-f", "fvd", "-o", "help")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "Amend options for 'fvd':"
    names = {line.split("=")[0].strip() for line in lines[1:]}
    import attrs

    assert {field.name for field in attrs.fields(FvdAmendOptions)} <= names
    assert {"backing_file", "backing_fmt"} <= names


def test_cli_size_and_copy_on_read(tmp_path, base):
    """The brief's example: size and a flag in one -o."""
    path = make(tmp_path / "img.fvd", "journal_size=64k", base)
    assert amend(path, "size=8M,copy_on_read=on") == (0, "", "")
    assert (header(path).virtual_disk_size, header(path).copy_on_read) == (8 * MiB, 1)
    _status, out, _ = cli("info", path)
    assert "virtual size: 8 MiB" in out and "copy on read: true" in out

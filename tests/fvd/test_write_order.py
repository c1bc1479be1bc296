"""The order FVD's metadata reaches the disk in, seen through a recording
storage: what a crash between two writes would leave."""

from __future__ import annotations

import random
import shutil

from corefmt_fvd.layout import (
    JOURNAL_SECTOR,
    RECORD_BITMAP,
    RECORD_TABLE,
    TABLE_ENTRY,
    FvdHeader,
    TableRecord,
    pack_sector,
    unpack_sector,
)

import corefmt
from corefmt import CheckFix, Storage
from corefmt.block.chain import open_graph

MiB = 1024 * 1024


class Recording(Storage):
    """Passes everything on; remembers writes and flushes in order."""

    def __init__(self, inner: Storage):
        super().__init__(inner.path, inner.read_only)
        self.inner = inner
        self.log: list[tuple[str, int, bytes]] = []

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, offset, buf):
        self.inner.readinto(offset, buf)

    def _write(self, offset, data):
        self.log.append(("write", offset, bytes(data)))
        self.inner.write(offset, data)

    def _truncate(self, size):
        self.inner.truncate(size)

    def flush(self):
        self.log.append(("flush", 0, b""))
        self.inner.flush()

    def data_run(self, offset, length):
        return self.inner.data_run(offset, length)

    def write_zeroes(self, offset, length, unmap=False):
        self.log.append(("zeroes", offset, b""))
        self.inner.write_zeroes(offset, length, unmap)

    def close(self):
        self.inner.close()


def _base(tmp_path, size=4 * MiB):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(7).randbytes(size))
    return str(base)


def _recorded(disk):
    image = disk.layer().image
    recorder = Recording(image.storage)
    image.storage = image.data = recorder
    return image, recorder


def _record_kinds(raw: bytes) -> set[int]:
    kinds = set()
    for at in range(0, len(raw), JOURNAL_SECTOR):
        (kind,) = TABLE_ENTRY.unpack_from(raw, at)
        kinds.add(kind)
    return kinds


def test_table_records_are_durable_before_the_bitmap_records(tmp_path):
    """A flush of a compact image over a base writes its TABLE sectors and
    flushes them before any BITMAP sector: a journal write torn between the
    two never marks blocks whose chunks are unmapped."""
    path = str(tmp_path / "top.fvd")
    corefmt.create(path, "fvd", 4 * MiB, backing=_base(tmp_path), backing_format="raw",
                   options="compact_image=on,chunk_size=4096,block_size=4096")
    with corefmt.open(path, read_only=False) as disk:
        image, recorder = _recorded(disk)
        header: FvdHeader = image.header
        journal = range(header.journal_offset, header.journal_offset + header.journal_size)
        for index in range(200):  # > 125 chunks: more than one TABLE sector
            disk.write(index * 4096 * 3, b"x" * 4096)
        disk.flush()
        log = recorder.log
    journal_writes = [(number, _record_kinds(raw)) for number, (kind, offset, raw)
                      in enumerate(log) if kind == "write" and offset in journal]
    assert journal_writes, "the flush wrote no journal"
    table_at = [number for number, kinds in journal_writes if RECORD_TABLE in kinds]
    bitmap_at = [number for number, kinds in journal_writes if RECORD_BITMAP in kinds]
    assert table_at and bitmap_at
    flushes = [number for number, (kind, _, _) in enumerate(log) if kind == "flush"]
    assert any(max(table_at) < flush < min(bitmap_at) for flush in flushes), log


def test_grown_storage_is_not_zeroed_by_writing(tmp_path):
    """After a reopen, chunks in storage grown but never written are holes:
    handing them out writes no zeros (a leaked chunk with data still is)."""
    path = str(tmp_path / "top.fvd")
    corefmt.create(path, "fvd", 64 * MiB, options="compact_image=on,chunk_size=65536,"
                   "storage_grow_unit=16M")
    with corefmt.open(path, read_only=False) as disk:
        disk.write(0, b"a" * 4096)  # grows the storage by 16 MiB
    with corefmt.open(path, read_only=False) as disk:
        image, recorder = _recorded(disk)
        for index in range(1, 50):
            disk.write(index * 65536, b"b" * 4096)
        zeroing = [entry for entry in recorder.log if entry[0] == "zeroes"
                   and entry[1] >= image.data_offset]
        assert zeroing == []
        writes = [len(raw) for kind, offset, raw in recorder.log
                  if kind == "write" and offset >= image.data_offset]
        assert writes and max(writes) == 4096
    with corefmt.open(path) as disk:
        assert disk.read(65536, 65536) == b"b" * 4096 + bytes(61440)


def test_check_copying_a_shared_chunk_leaves_no_record_that_maps_it_back(tmp_path):
    """check -r all gives a second user of a physical chunk its own copy; the
    journal is zeroed, so a later unclean open cannot replay the old mapping."""
    path = str(tmp_path / "top.fvd")
    corefmt.create(path, "fvd", 4 * MiB, options="compact_image=on,chunk_size=65536")
    with corefmt.open(path, read_only=False) as disk:
        disk.write(0, b"a" * 65536)
        disk.write(65536, b"b" * 65536)
        disk.flush()
        crashed = str(tmp_path / "crashed.fvd")
        shutil.copyfile(path, crashed)  # unclean, with both mappings in the journal
    with open(crashed, "rb") as file:
        header = FvdHeader.unpack(file.read(4336))
    with open(crashed, "r+b") as file:  # chunk 1 shares chunk 0's storage
        file.seek(header.table_offset)
        file.write(TABLE_ENTRY.pack(0) * 2)
        file.seek(header.journal_offset)  # and so does the journal's record
        sector = bytearray(file.read(JOURNAL_SECTOR))
    records = [TableRecord(0, (0x80000000, 0x80000000)) if isinstance(record, TableRecord)
               else record for record in unpack_sector(sector)]
    with open(crashed, "r+b") as file:  # moved to sector 3: new records start at 0
        file.seek(header.journal_offset)
        file.write(bytes(JOURNAL_SECTOR) * 3 + pack_sector(records))
    with open_graph(crashed, read_only=False, for_check=True) as disk:
        result = disk.layer().image.check(CheckFix.ALL)
    assert result.corruptions_fixed
    with corefmt.open(crashed, read_only=False) as disk:
        disk.write(65536, b"c" * 512)
        disk.write(5 * 65536, b"d" * 512)  # a new chunk: a record, the image unclean
        assert disk.read(0, 512) == b"a" * 512
        again = str(tmp_path / "again.fvd")
        disk.flush()
        shutil.copyfile(crashed, again)  # unclean again: the journal is replayed
    with corefmt.open(again) as disk:
        assert disk.read(65536, 512) == b"c" * 512
        assert disk.read(0, 512) == b"a" * 512

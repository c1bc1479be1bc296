"""FVD's metadata journal: 512-byte sectors of BITMAP and TABLE records,
written at a bump cursor and replayed after an unclean shutdown.

The journal has no epoch: every record ever written stays valid (bitmap
bits are only set, a chunk once mapped is never remapped), so replay
applies every sector, old ones included, in any order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from corefmt_fvd.layout import (
    BITMAP_RECORD,
    JOURNAL_SECTOR,
    TABLE_ENTRY,
    TABLE_ONLY_ENTRIES,
    TABLE_RECORD_HEAD,
    BitmapRecord,
    JournalRecord,
    TableRecord,
    pack_sector,
    unpack_sector,
)

#: A BITMAP record counts sectors in a u32.
MAX_RECORD_SECTORS = 0xFFFFFFFF // 8 * 8
#: Journal bytes read at once during replay.
REPLAY_READ = 1024 * 1024


def table_records(entries: dict[int, int]) -> list[TableRecord]:
    """TABLE records for chunk -> entry, one per run of consecutive chunks,
    none longer than a sector holds."""
    records: list[TableRecord] = []
    run: list[int] = []
    first = previous = -2
    for chunk in sorted(entries):
        if chunk != previous + 1 or len(run) == TABLE_ONLY_ENTRIES:
            if run:
                records.append(TableRecord(first, tuple(run)))
            first, run = chunk, []
        run.append(entries[chunk])
        previous = chunk
    if run:
        records.append(TableRecord(first, tuple(run)))
    return records


def bitmap_records(ranges: Iterable[tuple[int, int]]) -> list[BitmapRecord]:
    """BITMAP records for byte ranges [start, end) (sector aligned), merged."""
    records: list[BitmapRecord] = []
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        first, stop = start // JOURNAL_SECTOR, -(-end // JOURNAL_SECTOR)
        while first < stop:
            count = min(stop - first, MAX_RECORD_SECTORS)
            records.append(BitmapRecord(first, count))
            first += count
    return records


def record_size(record: JournalRecord) -> int:
    if isinstance(record, BitmapRecord):
        return BITMAP_RECORD.size
    return TABLE_RECORD_HEAD.size + TABLE_ENTRY.size * len(record.entries)


def pack_records(records: list[JournalRecord]) -> bytes:
    """Records packed greedily into whole sectors (none crosses a sector)."""
    sectors: list[list[JournalRecord]] = []
    room = 0
    for record in records:
        size = record_size(record)
        if size > room:
            sectors.append([])
            room = JOURNAL_SECTOR
        sectors[-1].append(record)
        room -= size
    return b"".join(pack_sector(sector) for sector in sectors)


class Journal:
    """Where the journal lies and where the next record set goes."""

    def __init__(self, offset: int, size: int):
        self.offset = offset
        self.sectors = size // JOURNAL_SECTOR
        self.cursor = 0

    @property
    def enabled(self) -> bool:
        return self.sectors > 0

    def room(self) -> int:
        """Sectors left before the journal must be recycled."""
        return self.sectors - self.cursor

    def take(self, sectors: int) -> int:
        """Byte offset for ``sectors`` new sectors (the caller checked room)."""
        at = self.offset + self.cursor * JOURNAL_SECTOR
        self.cursor += sectors
        return at

    def reset(self) -> None:
        """After the whole bitmap and table are durable: start over at sector 0."""
        self.cursor = 0


def iter_sectors(read: Callable[[int, int], bytes], journal: Journal
                 ) -> Iterator[tuple[int, bytes]]:
    """(byte offset, sector bytes) of every journal sector, read in large pieces."""
    total = journal.sectors * JOURNAL_SECTOR
    for done in range(0, total, REPLAY_READ):
        piece = read(journal.offset + done, min(REPLAY_READ, total - done))
        if piece.count(0) == len(piece):
            continue  # never written: nothing to replay
        for at in range(0, len(piece), JOURNAL_SECTOR):
            yield journal.offset + done + at, piece[at:at + JOURNAL_SECTOR]


def replay_records(read: Callable[[int, int], bytes], journal: Journal
                   ) -> Iterator[tuple[int, JournalRecord]]:
    """Every record of the journal with its sector's offset, as the original replays them."""
    for offset, sector in iter_sectors(read, journal):
        for record in unpack_sector(sector):
            yield offset, record

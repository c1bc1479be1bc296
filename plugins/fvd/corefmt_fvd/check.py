"""qemu-img check for FVD (the 2011 driver had none): the header, the
table, the bitmap and the journal are checked against each other and
against the storage, and reported in qemu-img check's categories.

What is checked, and how it counts (each ERROR line is one corruption,
each leaked chunk one leak; "Warning:" lines count nothing):

* the header, beyond what opening refuses: a data region off a 4 KiB
  boundary, unused bytes before it (the 2011 driver's journal_size quirk
  for plain images, spec §10 #11), a bitmap larger than its blocks need,
  bytes_per_prefetch not a multiple of the block size, a journal too small
  to journal every table entry once (all warnings: the image reads right),
  and need_zero_init on storage that does not read unwritten areas as
  zeros (a corruption: such blocks may read garbage);
* the table (compact images), as replayed: every entry inside the data
  storage, no physical chunk used by two virtual chunks, no entry at or
  past the next chunk to allocate, the table region's padding EMPTY (a
  resize would make it entries);
* the bitmap of a compact image: a block marked as in this image must have
  its chunks allocated, or it reads as zeros instead of the base's data
  (spec §10 #6, #7);
* the journal, every sector (``unpack_sector(strict=True)``): a malformed
  record, a TABLE record for chunks the table does not have (or in an
  image without a table) or naming an impossible chunk id is one
  corruption per sector. Records are never cleared (§10 #14): stale
  records from before a recycle are already in the table and bitmap and
  are not reported. Against the table and bitmap regions on disk:

  - a record mapping a chunk the table maps elsewhere is a corruption;
  - in an image not closed cleanly (opened for check, or read-only: a
    read-write open writes its replay at once), each chunk mapping and
    each run of bitmap blocks only the journal holds is a corruption, as
    qemu reports a dirty lazy-refcounts qcow2 image: the metadata regions
    miss it, only a replay sees it;
  - in an image marked clean, such records mean a later recovery would
    change what it reads: one corruption per sector;

* leaks (compact images): a physical chunk below the last used one that
  no entry uses (FVD allocates at a cursor and has no free list: it stays
  leaked), and storage past the last used chunk beyond one storage grow
  unit. Storage up to one grow unit past the last used chunk is the
  growth the driver preallocates (and hands out next), not a leak.

Repair (``-r leaks`` and ``-r all``, on an image opened read-write):

* both write the replayed metadata in place and set clean_shutdown, as
  any read-write open then close does (``close_clean``): the journal-only
  mappings become fixed corruptions; not when the journal and the table
  disagree (which one holds the data is unknown);
* ``-r all`` also zeroes the journal sectors reported (once the metadata
  is in place they hold nothing the regions do not), rewrites the table
  region's padding, and gives each extra user of a shared physical chunk
  a copy of it (every virtual chunk reads what it read before);
* ``-r leaks`` (and ``all``) truncates storage past the last used chunk,
  only when no corruption is left.

Never repaired: entries past the storage, blocks without their chunks,
disagreeing mappings, need_zero_init (zero the storage, then
``amend -o need_zero_init=off``), leaked chunks below the last used one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from corefmt import CheckFix, CheckResult
from corefmt_fvd.bitmap import FvdBitmap
from corefmt_fvd.journal import iter_sectors
from corefmt_fvd.layout import (
    CHUNK_ID_MASK,
    CLEAN_SHUTDOWN_OFFSET,
    EMPTY_ENTRY,
    HEADER_REGION,
    JOURNAL_SECTOR,
    MAX_CHUNK_ID,
    MIXED_TABLE_ENTRIES,
    PAGE,
    SECTOR,
    TABLE_ENTRY,
    TRUE,
    BitmapRecord,
    MalformedRecord,
    TableRecord,
    div_round_up,
    round_up,
    unpack_sector,
)
from corefmt_fvd.table import ChunkTable

if TYPE_CHECKING:
    from corefmt_fvd.image import FvdImage

CORRUPTION, LEAK = "corruption", "leak"
# What repairs a finding (None: nothing does).
BY_RECOVERY = "recovery"  # writing the replayed metadata in place (any -r)
BY_SECTOR = "sector"  # zeroing a journal sector (-r all)
BY_PADDING = "padding"  # rewriting the table region (-r all)
BY_COPY = "copy"  # a copy of a shared chunk (-r all)
BY_TRUNCATE = "truncate"  # cutting storage past the last used chunk (-r leaks)


@attrs.define
class _Finding:
    kind: str
    text: str
    count: int = 1
    repair: str | None = None
    #: What the repair works on (a sector offset, a physical chunk...).
    key: Any = None
    fixed: bool = False


def _as_fix(fix: CheckFix | bool) -> CheckFix:
    """``check(True)`` / ``check(False)`` as stress and fuzz call it."""
    if isinstance(fix, bool):
        return CheckFix.ALL if fix else CheckFix.NONE
    return fix


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _chunks(first: int, last: int) -> str:
    return f"chunk {first}" if first == last else f"chunks {first}-{last}"


def check_image(image: FvdImage, fix: CheckFix | bool) -> CheckResult:
    """Check (and with ``fix``, repair) an open FVD image."""
    fix = _as_fix(fix)
    read_only = image.context.read_only
    if read_only:
        fix = CheckFix.NONE
    else:
        image.flush()  # records waiting in memory go to the journal first
    result = CheckResult()
    with image.lock:
        checker = _Checker(image, result)
        checker.examine()
        if fix != CheckFix.NONE:
            checker.repair(fix)
        checker.report()
    return result


class _Checker:
    def __init__(self, image: FvdImage, result: CheckResult):
        self.image = image
        self.res = result
        self.header = image.header
        self.storage = image.storage
        self.findings: list[_Finding] = []
        self.warnings: list[str] = []
        context = image.context
        #: An unclean image whose replay is in memory only (a read-write open
        #: that is not check's writes it in place at once).
        self.needs_recovery = image.opened_unclean and (context.read_only or context.for_check)
        self.conflicts = False

    # -- helpers ----------------------------------------------------------------------
    def corruption(self, text: str, repair: str | None = None, key: Any = None) -> None:
        self.findings.append(_Finding(CORRUPTION, text, 1, repair, key))

    def leak(self, text: str, count: int, repair: str | None = None, key: Any = None) -> None:
        self.findings.append(_Finding(LEAK, text, count, repair, key))

    def warn(self, text: str) -> None:
        self.warnings.append(f"Warning: {text}")

    def on_disk_clean(self) -> bool:
        flag = self.storage.read(CLEAN_SHUTDOWN_OFFSET, 4)
        return int.from_bytes(flag, "little") == TRUE

    # -- examining --------------------------------------------------------------------
    def examine(self) -> None:
        image = self.image
        self.check_header()
        self.region_table = self.read_table_region()
        self.region_bitmap = self.read_bitmap_region()
        self.check_journal()
        if image.table is not None:
            self.check_table()
            if image.bitmap is not None:
                self.check_bitmap_chunks()
        self.res.image_end_offset = self.image_end()

    def check_header(self) -> None:
        header, image = self.header, self.image
        if not header.data_file and header.data_offset % PAGE:
            self.warn(f"the data region starts at {header.data_offset}, not on a {PAGE}-byte "
                      "boundary")
        ends = [HEADER_REGION]
        if header.has_bitmap:
            ends.append(header.bitmap_offset + header.bitmap_size)
        if header.compact:
            ends.append(header.table_offset + header.table_size)
        if header.journal_size:
            ends.append(header.journal_offset + header.journal_size)
        last = round_up(max(ends), PAGE)
        if header.metadata_size > last:
            self.warn(f"{header.metadata_size - last} bytes before the data region (metadata "
                      f"size {header.metadata_size}) belong to no metadata region")
        if header.has_bitmap:
            blocks = div_round_up(header.base_img_size, header.block_size)
            needed = round_up(div_round_up(blocks, 8), PAGE)
            if header.bitmap_size > needed:
                self.warn(f"the bitmap has {header.bitmap_size} bytes, its {blocks} blocks of "
                          f"{header.block_size} bytes need {needed}")
            if header.bytes_per_prefetch % header.block_size:
                self.warn(f"bytes_per_prefetch {header.bytes_per_prefetch} is not a multiple of "
                          f"the block size {header.block_size}")
        if header.compact and header.journal_size:
            needed = div_round_up(header.table_entries, MIXED_TABLE_ENTRIES)
            if header.journal_size // JOURNAL_SECTOR < needed:
                self.warn(f"the journal has {header.journal_size // JOURNAL_SECTOR} sectors, "
                          f"fewer than the {needed} the 2011 driver needs to journal every "
                          "table entry once")
        if (self.needs_recovery and not header.journal_size
                and (image.table is not None or image.bitmap is not None)):
            self.warn("the image was not closed cleanly and has no journal: metadata changes "
                      "since it was last written in place may be lost")
        if header.need_zero_init and not image.data.has_zero_init():
            self.corruption("need_zero_init is set but the data storage does not read "
                            "unwritten areas as zeros (zero it, then amend "
                            "need_zero_init=off)")

    def read_table_region(self) -> ChunkTable | None:
        header = self.header
        if self.image.table is None:
            return None
        raw = self.storage.read(header.table_offset, header.table_size)
        entries = header.table_entries
        padding = raw[entries * TABLE_ENTRY.size:]
        if padding.count(0xFF) != len(padding):
            bad = sum(1 for (value,) in TABLE_ENTRY.iter_unpack(padding) if value != EMPTY_ENTRY)
            self.corruption(f"table padding: {bad} entries past the table's {entries} are not "
                            "EMPTY", BY_PADDING)
        return ChunkTable(raw, entries)

    def read_bitmap_region(self) -> FvdBitmap | None:
        header = self.header
        if self.image.bitmap is None:
            return None
        raw = self.storage.read(header.bitmap_offset, header.bitmap_size)
        return FvdBitmap(raw, header.block_size, header.base_img_size)

    def check_journal(self) -> None:
        image = self.image
        journal = image.journal
        if not journal.enabled:
            return
        table, region_table, region_bitmap = image.table, self.region_table, self.region_bitmap
        clean = self.on_disk_clean()
        #: Sector offset -> why it is wrong (the first reason found).
        bad: dict[int, str] = {}
        #: Chunk -> (physical, sector) of mappings only the journal has.
        journal_only: dict[int, tuple[int, int]] = {}
        mapped: dict[int, int] = {}
        missing = (FvdBitmap(bytes(len(region_bitmap.bits)), region_bitmap.block_size,
                             region_bitmap.base_size) if region_bitmap is not None else None)
        unreflected: dict[int, str] = {}
        for offset, sector in iter_sectors(self.storage.read, journal):
            number = (offset - journal.offset) // JOURNAL_SECTOR
            try:
                unpack_sector(sector, strict=True)
            except MalformedRecord as error:
                bad[offset] = f"{error} at byte {error.offset}"
            for record in unpack_sector(sector):
                if isinstance(record, BitmapRecord):
                    if region_bitmap is not None and missing is not None:
                        found = self.missing_blocks(record, region_bitmap, missing)
                        if found and offset not in unreflected:
                            unreflected[offset] = f"{_blocks(*found)} marked"
                    continue
                assert isinstance(record, TableRecord)
                count = len(record.entries)
                if table is None or region_table is None:
                    bad.setdefault(offset, "TABLE record in an image without a table")
                    continue
                if record.first_chunk + count > len(table):
                    bad.setdefault(offset, f"TABLE record for chunks {record.first_chunk}.."
                                   f"{record.first_chunk + count - 1} of a table of "
                                   f"{len(table)}")
                    continue
                for index, entry in enumerate(record.entries):
                    if entry == EMPTY_ENTRY:
                        continue
                    physical, chunk = entry & CHUNK_ID_MASK, record.first_chunk + index
                    if physical > MAX_CHUNK_ID:
                        bad.setdefault(offset, f"TABLE record maps chunk {chunk} to "
                                       f"physical chunk {physical}, past the largest id")
                        continue
                    on_disk = region_table.physical(chunk)
                    earlier = mapped.setdefault(chunk, physical)
                    if on_disk not in (None, physical) or earlier != physical:
                        where = "the table" if on_disk not in (None, physical) else \
                            "an earlier record"
                        other = on_disk if where == "the table" else earlier
                        if clean:
                            bad.setdefault(offset, f"maps chunk {chunk} to physical chunk "
                                           f"{physical}, {where} to {other}")
                        else:
                            self.conflicts = True
                            self.corruption(f"chunk {chunk} maps to physical chunk {other} in "
                                            f"{where} and to {physical} in journal sector "
                                            f"{number}")
                        continue
                    if on_disk is None:
                        journal_only.setdefault(chunk, (physical, offset))
                        unreflected.setdefault(offset, f"chunk {chunk} -> {physical}")
        if clean:
            for offset, what in unreflected.items():
                bad.setdefault(offset, f"records an image closed cleanly does not have "
                               f"({what}): a recovery would apply them")
        for offset in sorted(bad):
            number = (offset - journal.offset) // JOURNAL_SECTOR
            self.corruption(f"journal sector {number} (offset {offset:#x}): {bad[offset]}",
                            BY_SECTOR, offset)
        if clean or not self.needs_recovery:
            return
        for chunk, (physical, _offset) in sorted(journal_only.items()):
            self.corruption(f"chunk {chunk} -> physical chunk {physical} is only in the "
                            "journal: the image was not closed cleanly", BY_RECOVERY)
        if missing is not None:
            block, end = 0, missing.blocks
            while block < end:
                block = missing.run_end(block, False, end)
                if block >= end:
                    break
                stop = missing.run_end(block, True, end)
                self.corruption(f"{_blocks(block, stop - 1)} marked in this image only in the "
                                "journal: the image was not closed cleanly", BY_RECOVERY)
                block = stop

    @staticmethod
    def missing_blocks(record: BitmapRecord, region: FvdBitmap, missing: FvdBitmap
                       ) -> tuple[int, int] | None:
        """Mark in ``missing`` the record's blocks ``region`` lacks; the first
        and last of them (None: the region has them all)."""
        start = max(record.first_sector, 0) * SECTOR
        end = min((record.first_sector + record.nb_sectors) * SECTOR, region.base_size)
        if record.nb_sectors <= 0 or start >= end:
            return None
        block, stop = start // region.block_size, div_round_up(end, region.block_size)
        first = last = None
        while block < stop:
            if region.test(block):
                block = region.run_end(block, True, stop)
                continue
            run_end = region.run_end(block, False, stop)
            missing.set_blocks(block, run_end)
            first = block if first is None else first
            last = run_end - 1
            block = run_end
        return None if first is None else (first, last if last is not None else first)

    def check_table(self) -> None:
        image = self.image
        table = image.table
        assert table is not None
        chunk_size, data_offset = image.chunk_size, image.data_offset
        storage_size = image.data.size()
        available = storage_size - data_offset
        owners: dict[int, list[int]] = {}
        allocated = fragmented = 0
        next_contiguous: int | None = None
        for chunk, entry in enumerate(table.entries):
            if entry == EMPTY_ENTRY:
                continue
            physical = entry & CHUNK_ID_MASK
            allocated += 1
            if next_contiguous is not None and physical != next_contiguous:
                fragmented += 1
            next_contiguous = physical + 1
            owners.setdefault(physical, []).append(chunk)
            if physical >= image.used_chunks:
                self.corruption(f"chunk {chunk} maps to physical chunk {physical}, at or past "
                                f"the next chunk to allocate ({image.used_chunks})")
            if (physical + 1) * chunk_size > available:
                self.corruption(f"chunk {chunk} maps to physical chunk {physical} at offset "
                                f"{data_offset + physical * chunk_size:#x}, past the end of "
                                f"the data storage ({storage_size} bytes)")
        for physical in sorted(owners):
            users = owners[physical]
            if len(users) > 1:
                self.corruption(f"physical chunk {physical} is used by chunks "
                                f"{', '.join(map(str, users))}", BY_COPY, physical)
        self.res.total_clusters = len(table)
        self.res.allocated_clusters = allocated
        self.res.fragmented_clusters = fragmented
        self.res.compressed_clusters = 0
        # Leaks: chunks below the storage end no entry uses.
        used = max(owners) + 1 if owners else 0
        in_storage = div_round_up(max(available, 0), chunk_size)
        for physical in range(min(used, in_storage)):
            if physical not in owners:
                self.leak(f"chunk {physical} at offset {data_offset + physical * chunk_size:#x}: "
                          "no table entry maps it", 1)
        if _is_device(image.data.path):
            return  # a device's size is not the image's to decide
        grow = max(self.header.storage_grow_unit, chunk_size)
        tail = in_storage - max(used, 0) - div_round_up(grow, chunk_size)
        if tail > 0:
            first = in_storage - tail
            self.leak(f"{_chunks(first, in_storage - 1)} at offset "
                      f"{data_offset + first * chunk_size:#x} past the last used chunk and "
                      f"its storage grow unit ({tail} chunks)", tail, BY_TRUNCATE)

    def check_bitmap_chunks(self) -> None:
        """Compact image with a base: no block marked as in this image may
        overlap an EMPTY chunk (walked over the runs of EMPTY chunks)."""
        image = self.image
        bitmap, table = image.bitmap, image.table
        assert bitmap is not None and table is not None
        block_size, chunk_size, base = bitmap.block_size, image.chunk_size, bitmap.base_size
        entries = table.entries
        limit = min(div_round_up(base, chunk_size), len(entries))
        chunk = 0
        while chunk < limit:
            if entries[chunk] != EMPTY_ENTRY:
                chunk += 1
                continue
            run_end = chunk + 1
            while run_end < limit and entries[run_end] == EMPTY_ENTRY:
                run_end += 1
            block = chunk * chunk_size // block_size
            stop = div_round_up(min(run_end * chunk_size, base), block_size)
            while block < stop:
                block = bitmap.run_end(block, False, stop)
                if block >= stop:
                    break
                marked_end = bitmap.run_end(block, True, stop)
                hole = max(chunk, block * block_size // chunk_size)
                self.corruption(f"{_blocks(block, marked_end - 1)} marked as in this image, "
                                f"but chunk {hole} is not allocated: they read as zeros, not "
                                "as the base's data")
                block = marked_end
            chunk = run_end

    def image_end(self) -> int:
        image, header = self.image, self.header
        if image.table is not None:
            if header.data_file:
                return header.metadata_size
            used = image.table.used()
            return max(header.metadata_size, image.data_offset + used * image.chunk_size)
        if header.data_file:
            return header.metadata_size
        return max(header.metadata_size, self.storage.size())

    # -- repairing --------------------------------------------------------------------
    def repair(self, fix: CheckFix) -> None:
        image = self.image
        if self.conflicts:
            return  # which of the two mappings holds the data is unknown: nothing is written
        image.stay_unclean = False
        image.close_clean()  # the replayed metadata in place, clean_shutdown set
        self.mark(BY_RECOVERY)
        if fix & CheckFix.ERRORS:
            self.zero_sectors()
            rewrite = self.mark(BY_PADDING)
            copied = self.copy_shared_chunks()
            if rewrite or copied:
                image._metadata_changed = True
                image.close_clean()
            if copied:
                image.zero_journal()  # old records would map the copies back
        if fix & CheckFix.LEAKS and not any(finding.kind == CORRUPTION and not finding.fixed
                                            for finding in self.findings):
            self.truncate_tail()

    def mark(self, repair: str) -> bool:
        found = False
        for finding in self.findings:
            if finding.repair == repair:
                finding.fixed = found = True
        return found

    def zero_sectors(self) -> None:
        """Once the metadata is in place, the journal holds nothing it needs."""
        for finding in self.findings:
            if finding.repair == BY_SECTOR:
                self.storage.write(finding.key, bytes(JOURNAL_SECTOR))
                finding.fixed = True
        self.storage.flush()

    def copy_shared_chunks(self) -> bool:
        """Each user of a shared chunk but the first gets a copy of it."""
        image = self.image
        table = image.table
        copied = False
        for finding in self.findings:
            if finding.repair != BY_COPY or table is None:
                continue
            physical = finding.key
            chunk_size, data_offset = image.chunk_size, image.data_offset
            if data_offset + (physical + 1) * chunk_size > image.data.size():
                continue  # past the storage too: nothing to copy
            users = [chunk for chunk in range(len(table)) if table.physical(chunk) == physical]
            image.used_chunks = max(image.used_chunks, table.used())
            data = image.data.read(data_offset + physical * chunk_size, chunk_size)
            for chunk in users[1:]:
                image._allocate(chunk)
                target = table.physical(chunk)
                assert target is not None
                image.data.write(data_offset + target * chunk_size, data)
            finding.fixed = copied = True
        return copied

    def truncate_tail(self) -> None:
        """Storage past the last used chunk goes (the grow unit too: growth
        makes it again); the end is worked out again here, after any copies."""
        image = self.image
        for finding in self.findings:
            if finding.repair != BY_TRUNCATE or image.table is None:
                continue
            end = image.data_offset + image.table.used() * image.chunk_size
            data = image.data
            data.flush()
            if data.size() > end:
                data.truncate(end)
                data.flush()
            finding.fixed = True

    # -- reporting --------------------------------------------------------------------
    def report(self) -> None:
        res = self.res
        res.messages.extend(self.warnings)
        for finding in self.findings:
            if finding.fixed:
                word = "Repairing"
                if finding.kind == CORRUPTION:
                    res.corruptions_fixed += finding.count
                else:
                    res.leaks_fixed += finding.count
            elif finding.kind == CORRUPTION:
                word = "ERROR"
                res.corruptions += finding.count
            else:
                word = "Leaked"
                res.leaks += finding.count
            res.messages.append(f"{word} {finding.text}")
        # qemu-img check --output=json leaves out the counters that are 0.
        for name in ("total_clusters", "allocated_clusters", "fragmented_clusters",
                     "compressed_clusters", "image_end_offset"):
            if not getattr(res, name):
                setattr(res, name, None)


def _is_device(path: str | None) -> bool:
    from corefmt_fvd.image import _is_device as is_device

    return bool(path) and is_device(path or "")

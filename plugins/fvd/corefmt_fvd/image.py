"""An open FVD image: reads through the bitmap and the table, writes with
copy-on-write from the base, and metadata made durable through the journal.

Durability (the original had no barriers, spec §10 #5; these are corefmt's):

1. a write's data (with the base's bytes around a partial block) goes to
   the data storage; the in-memory bitmap and table change at once, and
   the records that describe the change wait in memory;
2. the next flush makes the data durable first (a barrier), then writes
   the waiting records into the journal and flushes it: a flushed write is
   on disk, and no record points at data that is not (``journal_commit=
   write`` does this at every write instead of at the flush);
3. when the records do not fit (or there is no journal), the whole table
   and then the whole bitmap are written in place, each flushed before the
   next: a crash between them leaves a mapped chunk the bitmap does not
   use yet, never a bitmap bit without its chunk (§10 #6);
4. copy-on-read and prefetch fills (``RequestFlags.FILL``) set only the
   in-memory bitmap: a crash costs fetching them again, never data.

A write's records cover every chunk it stored, its copy-on-write blocks
included (§10 #7). The header's clean_shutdown is cleared before the first
record, set again by a clean close; an unclean image's journal is replayed
at every open, read-only ones included, in memory (§10 #4).
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
import subprocess
from collections.abc import Callable
from typing import Any

from corefmt import (
    BackingRef,
    CheckFix,
    CheckResult,
    Extent,
    Image,
    ImageContext,
    ImageError,
    Limits,
    RequestFlags,
    Storage,
    StorageError,
    sync,
)
from corefmt.fills import FillPolicy
from corefmt_fvd import events
from corefmt_fvd.base_version import read_record, write_record
from corefmt_fvd.bitmap import FvdBitmap
from corefmt_fvd.header import unpack_header
from corefmt_fvd.journal import Journal, bitmap_records, pack_records, replay_records, table_records
from corefmt_fvd.layout import (
    BUILTIN_LVEXTEND,
    CLEAN_SHUTDOWN_OFFSET,
    EMPTY_ENTRY,
    FALSE,
    HEADER_SIZE,
    MAX_CHUNK_ID,
    SECTOR,
    TRUE,
    BitmapRecord,
    TableRecord,
)
from corefmt_fvd.node_storage import as_storage
from corefmt_fvd.table import ChunkTable

#: When records reach the journal: at the guest's flush, or at every write.
COMMIT_AT_FLUSH, COMMIT_AT_WRITE = "flush", "write"
_FILL = int(RequestFlags.FILL)
#: How long an add_storage_cmd may run.
ADD_STORAGE_TIMEOUT = 600


class FvdImage(Image):
    request_alignment = SECTOR

    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        path = context.path
        file_size = storage.size()
        self.header = header = unpack_header(storage.read(0, HEADER_SIZE), path, file_size)
        self.virtual_size = header.virtual_disk_size
        self.base_size = header.base_img_size if header.has_bitmap else 0
        if header.has_bitmap:
            self.backing = BackingRef(header.base_img, header.base_img_fmt or None,
                                      read_record(storage, header.base_img))
        options = context.options
        self.commit_mode = getattr(options, "journal_commit", COMMIT_AT_FLUSH)
        self.allow_add_storage_cmd = bool(getattr(options, "allow_add_storage_cmd", False))
        self.data: Storage = storage
        self.data_child = "file"
        if header.data_file:
            fmt = header.data_file_fmt or None
            child = context.open_child("data_file", header.data_file,
                                       format=None if fmt == "raw" else fmt)
            self.data = as_storage(child)
            self.data_child = "data_file"
        self.data_offset = header.data_offset
        self.lock = sync.Lock()  # every metadata change and copy-on-write, one at a time
        self.bitmap: FvdBitmap | None = None
        #: What is durable or waits in records (None: the same as ``bitmap``);
        #: fills set only ``bitmap`` (the fresh one, spec §3.2).
        self._journaled: FvdBitmap | None = None
        if header.has_bitmap:
            raw = storage.read(header.bitmap_offset, header.bitmap_size)
            self.bitmap = FvdBitmap(raw, header.block_size, header.base_img_size)
        self.table: ChunkTable | None = None
        self.chunk_size = header.chunk_size if header.compact else 0
        if header.compact:
            raw = storage.read(header.table_offset, header.table_size)
            self.table = ChunkTable(raw, header.table_entries)
        self.journal = Journal(header.journal_offset, header.journal_size)
        self.opened_unclean = not header.clean_shutdown
        self._on_disk_clean = bool(header.clean_shutdown)
        #: amend clean_shutdown=off: the close leaves the image marked unclean (§10 #15).
        self.stay_unclean = False
        self._pending_ranges: list[tuple[int, int]] = []
        self._pending_chunks: set[int] = set()
        self._metadata_changed = False
        #: Fills since the metadata was last written in place (never journaled).
        self._unpersisted_fills = False
        if self.opened_unclean and self.journal.enabled and (self.bitmap or self.table):
            self._replay()
            self._metadata_changed = True
        self.used_chunks = self.table.used() if self.table is not None else 0
        #: Chunks below this were on disk at open: one handed out again after
        #: a crash leaked it holds old bytes, and is zeroed where not written.
        self._fresh_chunks_from = self._chunks_in_storage()
        if (self._metadata_changed and not context.read_only and not context.for_check):
            with self.lock:
                self._write_metadata()

    # -- opening ----------------------------------------------------------------------
    def _replay(self) -> None:
        """Apply every journal record (§5.4): bits into both bitmaps, entries into
        the table; a record naming chunks the table does not have is refused."""
        table, bitmap = self.table, self.bitmap
        for offset, record in replay_records(self.storage.read, self.journal):
            if isinstance(record, BitmapRecord):
                if bitmap is not None:
                    bitmap.set_range(record.first_sector * SECTOR, record.nb_sectors * SECTOR)
                continue
            assert isinstance(record, TableRecord)
            if table is None:
                continue
            if record.first_chunk + len(record.entries) > len(table):
                if self.context.for_check:
                    continue  # check reports it (and skips it, as replay does here)
                raise ImageError(self.context.path, "FVD journal", offset,
                                 f"TABLE record for chunks {record.first_chunk}.."
                                 f"{record.first_chunk + len(record.entries) - 1} of a table "
                                 f"of {len(table)}")
            for index, entry in enumerate(record.entries):
                if entry == EMPTY_ENTRY:
                    continue
                physical = entry & ~0x80000000
                if physical > MAX_CHUNK_ID:
                    if self.context.for_check:
                        continue
                    raise ImageError(self.context.path, "FVD journal", offset,
                                     f"TABLE record maps to chunk {physical}")
                table.assign(record.first_chunk + index, physical, dirty=False)

    def _chunks_in_storage(self) -> int:
        if self.table is None:
            return 0
        available = max(self.data.size() - self.data_offset, 0)
        return -(-available // self.chunk_size)

    # -- what the block layer asks --------------------------------------------------
    @property
    def limits(self) -> Limits:
        block = self.header.block_size if self.bitmap is not None else SECTOR
        return Limits(request_alignment=SECTOR, zeroes_alignment=SECTOR,
                      discard_alignment=SECTOR, copy_granularity=block,
                      allocation_granularity=block)

    @property
    def cluster_size(self) -> int | None:  # type: ignore[override]
        return None

    @property
    def dirty(self) -> bool:
        return self.opened_unclean

    def has_zero_init(self) -> bool:
        return self.data.has_zero_init() or self.table is not None

    def block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self.virtual_size)
        bitmap = self.bitmap
        if bitmap is not None and offset < self.base_size:
            block = offset // bitmap.block_size
            limit = -(-min(end, self.base_size) // bitmap.block_size)
            while True:  # without the lock: a write may set this bit between the two
                in_base = not bitmap.test(block)
                run_end = bitmap.run_end(block, not in_base, limit)
                if run_end > block:
                    break
            stop = run_end * bitmap.block_size
            if in_base:  # the base part only: a block may straddle the base's end
                return Extent(offset, min(stop, end, self.base_size) - offset, data=False,
                              zero=False, allocated=False)
            if stop < self.base_size:
                end = min(end, stop)
        return self._own_status(offset, end - offset)

    def _own_status(self, offset: int, length: int) -> Extent:
        """Status of data this image holds (not in the base)."""
        end = offset + length
        table = self.table
        if table is None:
            host = self.data_offset + offset
            is_data, run = self.data.data_run(host, length)
            return Extent(offset, run, data=is_data, zero=not is_data,
                          host_offset=host if is_data else None, host_child=self.data_child)
        chunk_size = self.chunk_size
        chunk = offset // chunk_size
        physical = table.physical(chunk)
        stop = min((chunk + 1) * chunk_size, end)
        while stop < end:
            following = table.physical(stop // chunk_size)
            if (physical is None) != (following is None) or (
                    physical is not None and following != physical + (stop // chunk_size - chunk)):
                break
            stop = min(stop + chunk_size, end)
        if physical is None:
            return Extent(offset, stop - offset, data=False, zero=True)
        host = self.data_offset + physical * chunk_size + offset % chunk_size
        return Extent(offset, stop - offset, data=True, zero=False, host_offset=host,
                      host_child=self.data_child)

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = memoryview(buf)
        table = self.table
        if table is None:
            self.data.readinto(self.data_offset + offset, view)
            return
        chunk_size = self.chunk_size
        done = 0
        while done < len(view):
            at = offset + done
            chunk, inside = divmod(at, chunk_size)
            piece = min(chunk_size - inside, len(view) - done)
            physical = table.physical(chunk)
            if physical is None:
                view[done:done + piece] = bytes(piece)
            else:
                self.data.readinto(self.data_offset + physical * chunk_size + inside,
                                   view[done:done + piece])
            done += piece

    # -- writes -----------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview, flags: RequestFlags | int = 0
              ) -> None:
        view = memoryview(data).cast("B")
        fill = bool(int(flags) & _FILL)
        if self._plain(offset, offset + len(view)):
            self.data.write(self.data_offset + offset, view)
            return
        with self.lock:
            self._write_slow(offset, view, fill)
            if not fill and self.commit_mode == COMMIT_AT_WRITE:
                self._commit()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     flags: RequestFlags | int = 0) -> None:
        """Zeros without writing zero bytes where the layout allows: whole
        blocks are zeroed in the data storage (compact: in whole chunks, see
        _zero_chunks); partial blocks still in the base take the write path."""
        fill = bool(int(flags) & _FILL)
        # A fill's zeros come from a hole of the base: punched, they stay one.
        unmap = unmap or fill
        end = offset + length
        with self.lock:
            start, stop = self._whole_blocks(offset, end)
            if start >= stop:
                self._write_slow(offset, memoryview(bytes(length)), fill)
            else:
                if start > offset:
                    self._write_slow(offset, memoryview(bytes(start - offset)), fill)
                self._zero_run(start, stop, fill, unmap)
                if end > stop:
                    self._write_slow(stop, memoryview(bytes(end - stop)), fill)
            if not fill and self.commit_mode == COMMIT_AT_WRITE:
                self._commit()

    def _whole_blocks(self, start: int, end: int) -> tuple[int, int]:
        """The part of [start, end) that needs no copy-on-write: whole blocks
        (or anything in a block this image holds, or past the base)."""
        bitmap = self.bitmap
        if bitmap is None:
            return start, end
        block = bitmap.block_size
        if start < self.base_size and start % block and not bitmap.test(start // block):
            start = min(start - start % block + block, end)
        if end < self.base_size and end % block and not bitmap.test(end // block):
            end = max(end - end % block, start)
        return start, end

    def _zero_run(self, start: int, end: int, fill: bool, unmap: bool) -> None:
        def store(allocated: list[int]) -> None:
            if self.table is None:
                self.data.write_zeroes(self.data_offset + start, end - start, unmap=unmap)
            else:
                self._zero_chunks(start, end, fill, allocated, unmap)

        self._stored(start, end, fill, store)

    def _zero_chunks(self, start: int, end: int, fill: bool, allocated: list[int],
                     unmap: bool) -> None:
        """Whole chunks are zeroed without zero bytes: a new chunk reads as
        zeros already (an EMPTY one past the base stays EMPTY), a mapped one
        is zeroed in the storage. A marked block always has its chunk (check's
        rule), so a range the base holds still gets one."""
        table = self.table
        assert table is not None
        chunk_size = self.chunk_size
        position = start
        while position < end:
            chunk = position // chunk_size
            piece_end = min((chunk + 1) * chunk_size, end)
            if position % chunk_size or piece_end - position < chunk_size:
                self._store_chunks(position, memoryview(bytes(piece_end - position)), fill,
                                   allocated)
            elif table.physical(chunk) is not None:
                host = self.data_offset + table.physical(chunk) * chunk_size
                self.data.write_zeroes(host, chunk_size, unmap=unmap)
            elif position < self.base_size:
                self._allocate(chunk)  # zeroed there if it was storage used before
                allocated.append(chunk)
            position = piece_end

    def _plain(self, start: int, end: int) -> bool:
        """Whether a write needs no copy-on-write and no metadata: a plain
        image, or blocks already durable in this image (the fast path)."""
        if self.table is not None:
            return False
        bitmap = self._journaled or self.bitmap
        if bitmap is None or start >= self.base_size:
            return True
        return bitmap.all_set(start // bitmap.block_size,
                              -(-min(end, self.base_size) // bitmap.block_size))

    def _write_slow(self, start: int, view: memoryview, fill: bool) -> None:
        end = start + len(view)
        store_start, store_end = start, end
        bitmap = self.bitmap
        read_below = self.context.read_below
        head = tail = b""
        if bitmap is not None and start < self.base_size:
            block = bitmap.block_size
            if start % block and not bitmap.test(start // block):
                store_start = start - start % block
                head = read_below(store_start, start - store_start)
            if end % block and end - 1 < self.base_size and not bitmap.test((end - 1) // block):
                store_end = min(end - end % block + block, self.base_size)
                tail = read_below(end, store_end - end)
        payload: bytes | memoryview = view if not head and not tail else b"".join(
            (head, view, tail))
        if head or tail:
            self.context.emit(events.COW_WRITE)

        def store(allocated: list[int]) -> None:
            if self.table is not None:
                self._store_chunks(store_start, memoryview(payload), fill, allocated)
            else:
                self.data.write(self.data_offset + store_start, payload)

        self._stored(store_start, store_end, fill, store)

    def _stored(self, start: int, end: int, fill: bool,
                store: Callable[[list[int]], None]) -> None:
        """Run ``store`` (it lists the chunks it allocates), then note the
        metadata. If it fails, reads must not see what a later flush will not
        journal: the chunks stay leaked, their entries empty again, and blocks
        only copy-on-read had put here (the store may have landed in them)
        read from the base again."""
        allocated: list[int] = []
        try:
            store(allocated)
        except BaseException:
            for chunk in allocated:
                self.table.entries[chunk] = EMPTY_ENTRY
            self._forget_fills(start, end)
            raise
        self._note_written(start, end, fill)

    def _forget_fills(self, start: int, end: int) -> None:
        """Blocks of [start, end) set in the fresh bitmap only (by fills, never
        journaled) read from the base again: the stale bitmap is untouched."""
        bitmap, journaled = self.bitmap, self._journaled
        if bitmap is None or journaled is None or start >= self.base_size:
            return
        block = bitmap.block_size
        for index in range(start // block, -(-min(end, self.base_size) // block)):
            if bitmap.test(index) and not journaled.test(index):
                bitmap.bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def _note_written(self, start: int, end: int, fill: bool) -> None:
        """The in-memory metadata for stored data, and the records it needs."""
        self._metadata_changed = True
        self._unpersisted_fills = self._unpersisted_fills or fill
        first, last = start, end  # what the TABLE records cover
        bitmap = self.bitmap
        if bitmap is not None and start < self.base_size:
            clipped = min(end, self.base_size)
            if fill:
                if self._journaled is None:
                    self._journaled = bitmap.copy()
                bitmap.set_range(start, clipped - start)
            else:
                journaled = self._journaled or bitmap
                block = bitmap.block_size
                if not journaled.all_set(start // block, -(-clipped // block)):
                    self._pending_ranges.append((start, clipped))
                    journaled.set_range(start, clipped - start)
                    # The record sets whole blocks: one copy-on-read filled has
                    # chunks this write did not touch, mapped only in memory.
                    first = min(first, start - start % block)
                    last = max(last, min(-(-clipped // block) * block, self.base_size))
                if journaled is not bitmap:
                    bitmap.set_range(start, clipped - start)
        table = self.table
        if table is not None and not fill:
            for chunk in range(first // self.chunk_size, -(-last // self.chunk_size)):
                if table.dirty(chunk):
                    self._pending_chunks.add(chunk)

    def _store_chunks(self, start: int, payload: memoryview, fill: bool,
                      allocated: list[int]) -> None:
        """Write through the table, allocating chunks in order (§4.2); a chunk
        handed out again after a crash is zeroed where this write misses it."""
        table = self.table
        assert table is not None
        chunk_size = self.chunk_size
        end = start + len(payload)
        first, last = start // chunk_size, (end - 1) // chunk_size
        for chunk in range(first, last + 1):
            if table.physical(chunk) is None:
                self._allocate(chunk)
                allocated.append(chunk)
        if last > first:
            self._refuse_shared(first, last)
        done = 0
        while done < len(payload):
            at = start + done
            chunk, inside = divmod(at, chunk_size)
            physical = table.physical(chunk)
            assert physical is not None
            run_chunks = 1
            while (chunk + run_chunks <= last
                   and table.physical(chunk + run_chunks) == physical + run_chunks):
                run_chunks += 1
            piece = min(run_chunks * chunk_size - inside, len(payload) - done)
            self.data.write(self.data_offset + physical * chunk_size + inside,
                            payload[done:done + piece])
            done += piece

    def _refuse_shared(self, first: int, last: int) -> None:
        """Chunks one write stores into must be distinct: in a corrupt table
        two virtual chunks may map one physical chunk, and the write would
        overwrite its own data (check -r all gives each its own copy)."""
        table = self.table
        assert table is not None
        seen: dict[int, int] = {}
        for chunk in range(first, last + 1):
            physical = table.physical(chunk)
            other = seen.setdefault(physical, chunk)  # type: ignore[arg-type]
            if other != chunk:
                raise ImageError(self.context.path, "FVD table", self.header.table_offset,
                                 f"virtual chunks {other} and {chunk} share physical chunk "
                                 f"{physical} (corefmt check -r all repairs it)")

    def _allocate(self, chunk: int) -> None:
        table = self.table
        assert table is not None
        physical = self.used_chunks
        if physical > MAX_CHUNK_ID:
            raise StorageError(self.context.path, "chunk allocation", OSError(
                errno.ENOSPC, "FVD compact image has no chunk ids left"))
        self.context.emit(events.CHUNK_ALLOC)
        chunk_size = self.chunk_size
        needed = self.data_offset + (physical + 1) * chunk_size
        if self.data.size() < needed:
            self._grow_storage(needed)
        if physical < self._fresh_chunks_from:
            # Maybe leaked by a crash, with old bytes: whatever this write does
            # not cover must read as zeros (or come from the base, which the
            # bitmap says). Storage grown but never written is a hole already.
            host = self.data_offset + physical * chunk_size
            is_data, run = self.data.data_run(host, chunk_size)
            if is_data or run < chunk_size:
                self.data.write_zeroes(host, chunk_size)
        self.used_chunks = physical + 1
        table.assign(chunk, physical, dirty=True)

    def _grow_storage(self, needed: int) -> None:
        """Grow the data storage by storage_grow_unit (§4.2): by truncate, or by
        the image's add_storage_cmd when the user allowed running it."""
        header = self.header
        grow = max(header.storage_grow_unit, self.chunk_size)
        command = header.add_storage_cmd
        target = self.data.path or ""
        if command and self.allow_add_storage_cmd and _is_device(target):
            argv = (["/sbin/lvextend", f"-L+{grow}B", target] if command == BUILTIN_LVEXTEND
                    else [*shlex.split(command), str(grow), target])
            try:
                subprocess.run(argv, check=True, timeout=ADD_STORAGE_TIMEOUT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError) as error:
                raise StorageError(self.context.path, "add_storage_cmd", OSError(
                    getattr(error, "errno", None) or errno.EIO, str(error))) from None
        else:
            self.data.truncate(max(self.data.size(), needed - self.chunk_size) + grow)
        if self.data.size() < needed:
            raise StorageError(self.context.path, "storage growth", OSError(
                errno.ENOSPC, "Could not allocate more storage space"))

    # -- durability -------------------------------------------------------------------
    @property
    def _pending(self) -> bool:
        return bool(self._pending_ranges or self._pending_chunks)

    def _mark_unclean(self) -> None:
        """clean_shutdown = FALSE on disk before the first record or in-place update."""
        if self._on_disk_clean:
            self.context.emit(events.HEADER_UPDATE)
            self.storage.write(CLEAN_SHUTDOWN_OFFSET, FALSE.to_bytes(4, "little"))
            self.storage.flush()
            self._on_disk_clean = False

    def _data_barrier(self) -> None:
        """Data durable before any record or table entry that makes it visible."""
        self.context.emit(events.DATA_BARRIER)
        self.data.flush()

    def _commit(self) -> None:
        """Write the waiting records into the journal (or, when they do not fit,
        recycle: the whole metadata in place)."""
        if not self._pending:
            return
        journal = self.journal
        if not journal.enabled:
            self._write_metadata()
            return
        table = self.table
        table_raw = b""
        if table is not None and self._pending_chunks:
            table_raw = pack_records(table_records({chunk: table.entries[chunk]
                                                    for chunk in self._pending_chunks}))
        bitmap_raw = pack_records(bitmap_records(self._pending_ranges))
        if (len(table_raw) + len(bitmap_raw)) // SECTOR > journal.room():
            self._write_metadata()
            return
        self._mark_unclean()
        self._data_barrier()
        # TABLE sectors are durable before the BITMAP records that send reads
        # to their chunks: a torn journal write never marks a block whose
        # chunk is unmapped (the base's data would read as zeros).
        for raw in (table_raw, bitmap_raw):
            if raw:
                self.context.emit(events.JOURNAL_WRITE)
                self.storage.write(journal.take(len(raw) // SECTOR), raw)
                self.storage.flush()
        if table is not None:
            for chunk in self._pending_chunks:
                table.clean(chunk)
        self._pending_chunks.clear()
        self._pending_ranges.clear()

    def _write_metadata(self) -> None:
        """The whole table, then the whole bitmap, in place, each flushed (the
        journal's recycle, and what a clean close and a recovery do)."""
        self._mark_unclean()
        self._data_barrier()
        header = self.header
        if self.table is not None:
            self.context.emit(events.TABLE_UPDATE)
            self.storage.write(header.table_offset, self.table.pack())
            self.storage.flush()
            self.table.clean_all()
        if self.bitmap is not None:
            self.context.emit(events.BITMAP_UPDATE)
            self.storage.write(header.bitmap_offset, self.bitmap.bits)
            self.storage.flush()
            self._journaled = None
        self._pending_chunks.clear()
        self._pending_ranges.clear()
        self._unpersisted_fills = False
        self.journal.reset()

    def zero_journal(self) -> None:
        """Every journal sector zeroed (the lock is held, the metadata in place):
        after a repair remaps a chunk, no old record may map it back."""
        journal = self.journal
        if journal.enabled:
            self.context.emit(events.JOURNAL_WRITE)
            self.storage.write_zeroes(journal.offset, journal.sectors * SECTOR)
            self.storage.flush()
            journal.reset()

    def flush(self) -> None:
        with self.lock:
            if self._pending:
                self._commit()
                return
        self.data.flush()
        if self.data is not self.storage:
            self.storage.flush()

    def close(self) -> None:
        try:
            if not self.context.read_only and not self.context.for_check:
                with self.lock:
                    self.close_clean()
            elif not self.context.read_only:
                self.data.flush()
        finally:
            if self.data is not self.storage:
                self.data.close()
            self.storage.close()

    def close_clean(self) -> None:
        """Everything in place and clean_shutdown set (the lock is held)."""
        if self._metadata_changed or not self._on_disk_clean or self.opened_unclean:
            self.context.emit(events.CLOSE_FLUSH)
            self._write_metadata()
            self._metadata_changed = False
            if self.stay_unclean:
                return
            self.context.emit(events.HEADER_UPDATE)
            self.storage.write(CLEAN_SHUTDOWN_OFFSET, TRUE.to_bytes(4, "little"))
            self.storage.flush()
            self._on_disk_clean = True
            self.opened_unclean = False
        else:
            self.data.flush()

    # -- fills (copy-on-read, prefetch) ----------------------------------------------
    def fill_policy(self) -> FillPolicy:
        from corefmt_fvd.fills import fill_policy

        return fill_policy(self.header)

    def persist_fills(self) -> None:
        """Fills durable (prefetch checkpoints): the metadata in place, data
        first, as a recycle does; they are never journaled (spec §3.2)."""
        with self.lock:
            if self._unpersisted_fills:
                self._write_metadata()

    def mark_self_contained(self) -> None:
        """Prefetch finished (§7.2): every bit set, the metadata in place, then
        all_data_in_fvd_img, so later opens never open the base."""
        from corefmt_fvd.fills import mark_self_contained

        with self.lock:
            mark_self_contained(self)

    # -- size -------------------------------------------------------------------------
    def truncate(self, size: int) -> None:
        """Grow the virtual disk (qemu-img update size=: only the size changes; a
        compact image only as far as its table region reaches, §10 #10)."""
        from corefmt_fvd.amend import resize

        with self.lock:
            resize(self, size)

    # -- format verbs -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        from corefmt_fvd.info import format_specific

        return format_specific(self)

    def check(self, fix: CheckFix = CheckFix.NONE) -> CheckResult:
        from corefmt_fvd.check import check_image

        return check_image(self, fix)

    def amend(self, options: Any, progress: Any = None, *, size: int | None = None,
              backing: tuple[str | None, str | None] | None = None, **_: Any) -> None:
        from corefmt_fvd.amend import amend_image

        with self.lock:
            amend_image(self, options, size=size, backing=backing)

    def set_backing(self, reference: BackingRef | None) -> None:
        """rebase/stream: ``base_img``/``base_img_fmt`` rewritten as amend does
        (no backing only once all_data_in_fvd_img is set: the core marks the
        image self-contained first)."""
        from corefmt_fvd.amend import amend_image

        path = reference.path if reference is not None else ""
        fmt = (reference.format or "") if reference is not None else ""
        with self.lock:
            amend_image(self, None, backing=(path, fmt))
            identity = reference.identity if reference is not None else None
            if self.header.has_bitmap and (identity or read_record(self.storage, path)):
                write_record(self.storage, path, identity)
            self.backing = reference if self.header.has_bitmap else None

    def write_header(self) -> None:
        """The 4336-byte header in place (amend), flushed."""
        self.context.emit(events.HEADER_UPDATE)
        self.storage.write(0, self.header.pack())
        self.storage.flush()
        self._on_disk_clean = bool(self.header.clean_shutdown)


def _is_device(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


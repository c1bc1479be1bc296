"""tablemap: a two-level mapping in the image file, data in an external data file.

Image file (big endian)::

    0       header: magic 'TBLMAP01', u64 virtual size, u32 block size,
            u32 table size, u32 L1 entries, u32 default L2 cache entries
            (0: every table up to 32 MiB), u16 lengths of the backing path,
            the backing format and the data file name, then the three strings
    4096    L1: one u64 per L2 table (0 = none), in 512-byte chunks
    ...     L2 tables from the first 4 KiB boundary after L1 (``metadata
            start``), appended, ``table size`` bytes each: one u64 per block,
            the block's offset in the data file (0 = unallocated; data block 0
            is never used, so 0 is free to mean "none")

Data file: data blocks of ``block size`` bytes, appended from offset
``block size`` on.

The L2 cache holds ``l2_cache_entries`` tables: the open option, else the
header's default (create option), else every table up to 32 MiB of them.

Crash safety is write ordering, all of it through corefmt's MetadataCache:

- a new data block is written, and a cache *barrier* flushes the data file
  before the L2 table that points at it is written back;
- L1 chunks live in a cache of their own that *depends on* the L2 cache: an
  L1 chunk is written only after every dirty L2 table is written and the
  image file flushed, so an L1 entry never points at an unwritten table
  (L1 chunks are written by flushes, which take the allocation lock).

Events (``context.emit``): ``data_alloc`` before a new data block is
written, ``l2_alloc`` before a new L2 table is first written, ``l2_update``
before an L2 table is written back again, ``l1_update`` before an L1 chunk
is written.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import attrs

from corefmt import (
    PROBE_CERTAIN,
    PROBE_NO,
    BackingRef,
    CheckFix,
    CheckResult,
    CorefmtError,
    Extent,
    FormatDriver,
    Image,
    ImageContext,
    ImageError,
    Limits,
    MetadataCache,
    RequestFlags,
    Storage,
    choice,
    option,
    sync,
)

MAGIC = b"TBLMAP01"
HEADER = struct.Struct(">8sQIIIIHHH")
L1_OFFSET = 4096
L1_CHUNK = 512
ENTRY = struct.Struct(">Q")
ALIGNMENT = 512
BLOCK_SIZES = (4096, 65536)
TABLE_SIZES = (512, 1024, 2048, 4096)
#: An L1 of at most 16 MiB: a header asking for more is refused, not trusted.
MAX_L1_ENTRIES = 2 * 1024 * 1024
#: The default L2 cache holds every table, up to this many bytes of them.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
DATA_FILE_SUFFIX = ".data"

EVENT_DATA_ALLOC = "data_alloc"
EVENT_L2_ALLOC = "l2_alloc"
EVENT_L2_UPDATE = "l2_update"
EVENT_L1_UPDATE = "l1_update"


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _not_negative(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative (got {value})")


@attrs.frozen
class TableMapCreateOptions:
    block_size: int = option(4096, "data block size", converter=int,
                             validator=choice(*BLOCK_SIZES))
    table_size: int = option(4096, "L2 table size in bytes (u64 entries)", converter=int,
                             validator=choice(*TABLE_SIZES))
    l2_cache_entries: int = option(0, "default L2 cache size in tables, recorded in the "
                                      "header (0: every table, up to 32 MiB)",
                                   converter=int, validator=_not_negative)
    data_file: str = option("", "data file name, relative to the image "
                                "(default: the image's name + '.data')")


@attrs.frozen
class TableMapOpenOptions:
    l2_cache_entries: int = option(0, "L2 tables the cache holds (0: the image's default; "
                                      "corefmt's cache keeps at least 4)",
                                   converter=int, validator=_not_negative)


@attrs.frozen
class Geometry:
    size: int
    block_size: int
    table_size: int

    @property
    def entries_per_table(self) -> int:
        return self.table_size // ENTRY.size

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def l1_entries(self) -> int:
        return -(-self.blocks // self.entries_per_table)

    @property
    def l1_chunks(self) -> int:
        return max(1, -(-self.l1_entries * ENTRY.size // L1_CHUNK))

    @property
    def metadata_start(self) -> int:
        """Where L2 tables start: the first 4 KiB boundary after the L1."""
        return _align_up(L1_OFFSET + self.l1_chunks * L1_CHUNK, 4096)


class _EventStorage(Storage):
    """The image file as a cache sees it: every write-back names its event first
    (blkdebug on the image file then fails exactly that write).

    Write-backs run in whichever request evicts a table, so two may append
    to the file at once; they take turns on a ``corefmt.sync`` lock, which
    the stress scheduler sees (a wait inside the storage below it does not)."""

    def __init__(self, inner: Storage, emit: Callable[[str], None],
                 event_for: Callable[[int], str], lock: sync.Lock,
                 written: Callable[[int], object] = lambda _: None):
        super().__init__(inner.path, inner.read_only)
        self.inner = inner
        self.request_alignment = inner.request_alignment
        self._emit = emit
        self._event_for = event_for
        self._lock = lock
        self._written = written

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self.inner.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        with self._lock:
            self._emit(self._event_for(offset))
            self.inner.write(offset, data)
            self._written(offset)

    _write = write

    def _truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def flush(self) -> None:
        self.inner.flush()


class TableMapImage(Image):
    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        self.request_alignment = ALIGNMENT
        file_size = storage.size()
        if file_size < HEADER.size:
            raise ImageError(context.path, "header", 0,
                             f"file is {file_size} bytes, shorter than the header")
        (magic, size, block_size, table_size, l1_entries, cache_entries,
         path_len, fmt_len, data_len) = HEADER.unpack(storage.read(0, HEADER.size))
        if magic != MAGIC:
            raise ImageError(context.path, "header", 0, "bad magic")
        if block_size not in BLOCK_SIZES:
            raise ImageError(context.path, "header", 16, f"bad block size {block_size}")
        if table_size not in TABLE_SIZES:
            raise ImageError(context.path, "header", 20, f"bad table size {table_size}")
        if HEADER.size + path_len + fmt_len + data_len > L1_OFFSET:
            raise ImageError(context.path, "header", 32, "names too long for the header")
        self.geometry = geometry = Geometry(size, block_size, table_size)
        if l1_entries > MAX_L1_ENTRIES or l1_entries != geometry.l1_entries:
            raise ImageError(context.path, "header", 24,
                             f"{l1_entries} L1 entries do not map virtual size {size}")
        if file_size < geometry.metadata_start:
            raise ImageError(context.path, "L1 table", L1_OFFSET,
                             f"file is {file_size} bytes, shorter than its L1 table")
        names = storage.read(HEADER.size, path_len + fmt_len + data_len)
        if path_len:
            self.backing = BackingRef(self._name(names[:path_len], "backing file name"),
                                      self._name(names[path_len:path_len + fmt_len],
                                                 "backing format") or None)
        self.data_name = self._name(names[path_len + fmt_len:], "data file name")
        if not self.data_name:
            raise ImageError(context.path, "header", 36, "no data file name")
        self.virtual_size = size
        self.block_size = self.cluster_size = block_size
        self.table_size = table_size
        self.epl = geometry.entries_per_table
        raw = storage.read(L1_OFFSET, l1_entries * ENTRY.size)
        self.l1 = list(struct.unpack(f">{l1_entries}Q", raw))
        self.data: Storage = context.open_child("data_file", self.data_name)
        requested = getattr(context.options, "l2_cache_entries", 0)
        self.cache_entries = requested or cache_entries or max(
            1, min(l1_entries, DEFAULT_CACHE_BYTES // table_size))
        # Tables allocated this session and not yet written: their first
        # write-back is an l2_alloc, every later one an l2_update.
        self._unwritten: set[int] = set()
        writes = sync.Lock()
        self._l2_io = _EventStorage(storage, context.emit, self._l2_event, writes,
                                    written=self._unwritten.discard)
        self.l2_cache = MetadataCache("tablemap L2", self._l2_io, table_size,
                                      self.cache_entries)
        self.l1_cache = MetadataCache(
            "tablemap L1",
            _EventStorage(storage, context.emit, lambda _: EVENT_L1_UPDATE, writes),
            L1_CHUNK, geometry.l1_chunks)
        self.lock = sync.Lock()  # allocations, flushes and check one at a time
        self._barrier_pending = False
        #: Entries found unusable at open (check reports them, ERRORS fixes them):
        #: L1 indices, and block indices.
        self.bad_tables: set[int] = set()
        self.bad_blocks: set[int] = set()
        self._scan(file_size, self.data.size())

    def _name(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ImageError(self.context.path, "header", HEADER.size,
                             f"{what} is not UTF-8") from None

    def _l2_event(self, offset: int) -> str:
        return EVENT_L2_ALLOC if offset in self._unwritten else EVENT_L2_UPDATE

    # -- references ---------------------------------------------------------------
    def _table_problem(self, table: int, file_size: int) -> str | None:
        if table % self.table_size or table < self.geometry.metadata_start:
            return f"points at {table:#x}, not an L2 table slot"
        if table + self.table_size > file_size:
            return f"points at {table:#x}, past the end of the image file ({file_size} bytes)"
        return None

    def _block_problem(self, host: int, data_size: int) -> str | None:
        if host % self.block_size or host == 0:
            return f"points at {host:#x}, not a data block"
        if host + self.block_size > data_size:
            return f"points at {host:#x}, past the end of the data file ({data_size} bytes)"
        return None

    def _read_table(self, table: int) -> tuple[int, ...]:
        with self.l2_cache.get(table) as handle:
            return struct.unpack(f">{self.epl}Q", handle.data)

    def _scan(self, file_size: int, data_size: int) -> None:
        """Where new tables and blocks go: after everything the tables use and
        after the files' ends (after a crash a file may be shorter or longer
        than what the tables use; space past either is never reused)."""
        next_table = max(self.geometry.metadata_start, _align_up(file_size, self.table_size))
        next_block = max(self.block_size, _align_up(data_size, self.block_size))
        for i, table in enumerate(self.l1):
            if not table:
                continue
            if self._table_problem(table, file_size):
                self.bad_tables.add(i)
                continue
            next_table = max(next_table, table + self.table_size)
            for j, host in enumerate(self._read_table(table)):
                if not host:
                    continue
                if self._block_problem(host, data_size):
                    self.bad_blocks.add(i * self.epl + j)
                else:
                    next_block = max(next_block, host + self.block_size)
        self.next_table, self.next_block = next_table, next_block

    def _hosts(self, index: int, count: int) -> tuple[int, ...]:
        """Data file offsets of ``count`` blocks from ``index``, all in one table."""
        i, j = divmod(index, self.epl)
        if i in self.bad_tables:
            raise ImageError(self.context.path, "L1 entry", L1_OFFSET + i * ENTRY.size,
                             f"L2 table {i} {self._table_problem(self.l1[i], self.storage.size())}")
        table = self.l1[i]
        if not table:
            return (0,) * count
        with self.l2_cache.get(table) as handle:
            hosts = struct.unpack_from(f">{count}Q", handle.data, j * ENTRY.size)
        if self.bad_blocks:
            for block in range(index, index + count):
                if block in self.bad_blocks:
                    raise ImageError(self.context.path, "L2 entry",
                                     table + (block % self.epl) * ENTRY.size,
                                     f"block {block} points outside the data file")
        return hosts

    def _each_block(self, offset: int, length: int):
        """(block index, offset inside it, length, host) for a range, a table at a time."""
        position, end = offset, offset + length
        while position < end:
            index = position // self.block_size
            table_end = min(end, (index // self.epl + 1) * self.epl * self.block_size)
            last = (table_end - 1) // self.block_size
            hosts = self._hosts(index, last - index + 1)
            for host in hosts:
                inside = position % self.block_size
                step = min(self.block_size - inside, end - position)
                yield position // self.block_size, inside, step, host
                position += step

    # -- requests -----------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=ALIGNMENT, zeroes_alignment=ALIGNMENT,
                      discard_alignment=ALIGNMENT, copy_granularity=self.block_size)

    def block_status(self, offset: int, length: int) -> Extent:
        first: int | None = None
        expected = 0
        run_end = offset
        for _, inside, step, host in self._each_block(offset, length):
            if first is None:
                first, expected = host, host + inside
            elif (host != 0) != (first != 0) or (host and host + inside != expected):
                break
            run_end += step
            expected += step
        if first:
            inside = offset % self.block_size
            return Extent(offset, run_end - offset, data=True, zero=False, allocated=True,
                          host_offset=first + inside, host_child="data_file")
        return Extent(offset, run_end - offset, data=False, zero=False, allocated=False)

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        for index, inside, step, host in self._each_block(offset, len(buf)):
            if not host:
                raise ImageError(self.context.path, "read", offset + done,
                                 f"block {index} is not allocated")
            self.data.readinto(host + inside, buf[done:done + step])
            done += step

    def write(self, offset: int, data: bytes | memoryview,
              flags: RequestFlags = RequestFlags.NONE) -> None:
        view = memoryview(data).cast("B")
        done = 0
        for index, inside, step, host in self._each_block(offset, len(view)):
            piece = view[done:done + step]
            if host:
                self.data.write(host + inside, piece)
            else:
                self._allocate(index, inside, piece)
            done += step
        if flags & RequestFlags.FUA:
            self.flush()

    def _allocate(self, index: int, inside: int, piece: memoryview) -> None:
        """Write a block that had no data block: a new one, then the tables."""
        with self.lock:
            host = self._hosts(index, 1)[0]
            if host:  # another request allocated it meanwhile
                self.data.write(host + inside, piece)
                return
            if inside == 0 and len(piece) == self.block_size:
                block: bytes | bytearray | memoryview = piece
            else:  # copy-on-write: the rest of the block is what lies below
                start = index * self.block_size
                block = bytearray(self.block_size)
                available = min(self.block_size, self.virtual_size - start)
                block[:available] = self.context.read_below(start, available)
                block[inside:inside + len(piece)] = piece
            host, self.next_block = self.next_block, self.next_block + self.block_size
            self.context.emit(EVENT_DATA_ALLOC)
            self.data.write(host, block)
            self._order_data_before_l2()
            i, j = divmod(index, self.epl)
            table = self.l1[i]
            if table:
                handle = self.l2_cache.get(table)
            else:
                table, self.next_table = self.next_table, self.next_table + self.table_size
                self._unwritten.add(table)
                handle = self.l2_cache.table_empty(table)
            with handle:
                self._set_l2(handle, j, host)
            if not self.l1[i]:
                self._set_l1(i, table)

    # The three ordering steps, one method each (the broken variants in the
    # tests override exactly one of them).
    def _order_data_before_l2(self) -> None:
        """No L2 table is written back before the data file is flushed."""
        if not self._barrier_pending:
            self._barrier_pending = True
            self.l2_cache.add_barrier(self._data_barrier)

    def _data_barrier(self) -> None:
        # Cleared first: a block written after this point needs a later flush.
        self._barrier_pending = False
        self.data.flush()

    def _set_l2(self, handle, j: int, host: int) -> None:
        ENTRY.pack_into(handle.data, j * ENTRY.size, host)
        handle.mark_dirty()

    def _set_l1(self, i: int, table: int) -> None:
        """Point L1 entry ``i`` at ``table``: written only after the L2 cache is durable."""
        self.l1_cache.depends_on(self.l2_cache)
        where = L1_OFFSET + i * ENTRY.size
        chunk = where - (where - L1_OFFSET) % L1_CHUNK
        with self.l1_cache.get(chunk) as handle:
            ENTRY.pack_into(handle.data, where - chunk, table)
            handle.mark_dirty()
        self.l1[i] = table

    # -- the rest of the Image interface ---------------------------------------------
    def has_zero_init(self) -> bool:
        """A new image maps nothing: it reads as zeros (or as its backing)."""
        return True

    def flush(self) -> None:
        # Under the allocation lock: no L1 entry can be set (and no dependency
        # of the L1 cache on the L2 cache) between the L2 flush and the L1 one.
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        self.data.flush()  # overwritten blocks need no table update, only this
        self.l2_cache.flush(storage=True)  # also writes tables whose write-back failed
        # Always, even with no dirty chunk: one may be on its way to the disk in
        # another request's flush, and this flush must wait for it to be durable.
        self.l1_cache.flush(storage=True)

    def close(self) -> None:
        try:
            if not self.context.read_only:
                self.flush()
        finally:
            self.storage.close()

    def info(self) -> dict[str, object]:
        return {"data-file": self.data_name, "table-size": self.table_size,
                "l2-cache-entries": self.l2_cache.capacity,
                "l2-cache-hits": self.l2_cache.hits, "l2-cache-misses": self.l2_cache.misses}

    def check(self, fix: CheckFix | bool = CheckFix.NONE) -> CheckResult:
        """Leaks: table slots and data blocks nothing points at. Corruptions:
        references that are misaligned, past a file's end, or shared."""
        fix = fix if isinstance(fix, CheckFix) else (CheckFix.ALL if fix else CheckFix.NONE)
        if self.context.read_only:
            fix = CheckFix.NONE
        result = CheckResult()
        with self.lock:
            if not self.context.read_only:
                self._flush()
            self._check(result, fix)
        return result

    def _check(self, result: CheckResult, fix: CheckFix) -> None:
        path = self.context.path
        file_size, data_size = self.storage.size(), self.data.size()
        tables: dict[int, int] = {}
        blocks: dict[int, int] = {}

        def corrupt(message: str, repair: Callable[[], None]) -> None:
            result.corruptions += 1
            result.messages.append(f"{path}: {message}")
            if fix & CheckFix.ERRORS:
                repair()
                result.corruptions_fixed += 1

        for i, table in enumerate(self.l1):
            if not table:
                continue
            problem = self._table_problem(table, file_size)
            if problem is None and table in tables:
                problem = f"points at {table:#x}, shared with L1 entry {tables[table]}"
            if problem is not None:
                corrupt(f"L1 entry {i} {problem}", lambda i=i: self._clear_l1(i))
                continue
            tables[table] = i
            for j, host in enumerate(self._read_table(table)):
                if not host:
                    continue
                block = i * self.epl + j
                problem = self._block_problem(host, data_size)
                if problem is None and host in blocks:
                    problem = f"points at {host:#x}, shared with block {blocks[host]}"
                if problem is not None:
                    corrupt(f"block {block} {problem}",
                            lambda t=table, j=j, b=block: self._clear_l2(t, j, b))
                    continue
                blocks[host] = block
        if fix & CheckFix.ERRORS:
            self._flush()
        table_slots = range(self.geometry.metadata_start, _align_up(file_size, self.table_size),
                            self.table_size)
        block_slots = range(self.block_size, _align_up(data_size, self.block_size),
                            self.block_size)
        leaked_tables = [slot for slot in table_slots if slot not in tables]
        leaked_blocks = [slot for slot in block_slots if slot not in blocks]
        result.leaks = len(leaked_tables) + len(leaked_blocks)
        if result.leaks:
            result.messages.append(f"{path}: {len(leaked_tables)} L2 table slots and "
                                   f"{len(leaked_blocks)} data blocks are not referenced")
        table_end = max([self.geometry.metadata_start,
                         *(table + self.table_size for table in tables)])
        block_end = max([self.block_size, *(host + self.block_size for host in blocks)])
        if fix & CheckFix.LEAKS and result.leaks:
            # Leaks at the files' ends go; a leak between used slots stays.
            fixed = sum(1 for slot in leaked_tables if slot >= table_end)
            fixed += sum(1 for slot in leaked_blocks if slot >= block_end)
            if fixed:
                self.storage.truncate(table_end)
                self.data.truncate(block_end)
                self.storage.flush()
                self.data.flush()
                self.next_table, self.next_block = table_end, block_end
                result.leaks_fixed = fixed
        result.image_end_offset = self.storage.size()
        result.total_clusters = self.geometry.blocks
        result.allocated_clusters = len(blocks)

    def _clear_l1(self, i: int) -> None:
        self._set_l1(i, 0)
        self.bad_tables.discard(i)
        for block in range(i * self.epl, (i + 1) * self.epl):
            self.bad_blocks.discard(block)

    def _clear_l2(self, table: int, j: int, block: int) -> None:
        with self.l2_cache.get(table) as handle:
            self._set_l2(handle, j, 0)
        self.bad_blocks.discard(block)


class TableMapDriver(FormatDriver):
    name = "tablemap"
    create_options = TableMapCreateOptions
    open_options = TableMapOpenOptions
    supports_backing = True
    stress_option_sets = ("", "table_size=512,l2_cache_entries=4", "block_size=65536")
    image_class = TableMapImage

    def probe(self, head: bytes, path: str | None) -> int:
        return PROBE_CERTAIN if head.startswith(MAGIC) else PROBE_NO

    def create(self, storage: Storage, size: int, options: TableMapCreateOptions,
               backing: BackingRef | None, *, context=None) -> None:
        if context is None or context.path is None:
            raise CorefmtError("tablemap: creating an image needs a create context "
                               "(its data file is created next to it)")
        geometry = Geometry(size, options.block_size, options.table_size)
        if geometry.l1_entries > MAX_L1_ENTRIES:
            raise CorefmtError(f"tablemap: virtual size {size} needs more than "
                               f"{MAX_L1_ENTRIES} L2 tables")
        data_name = options.data_file or os.path.basename(context.path) + DATA_FILE_SUFFIX
        path = (backing.path if backing else "").encode()
        fmt = ((backing.format or "") if backing else "").encode()
        data = data_name.encode()
        if HEADER.size + len(path) + len(fmt) + len(data) > L1_OFFSET:
            raise CorefmtError("tablemap: backing and data file names are too long")
        child = context.create_child("data_file", data_name)
        child.flush()
        storage.write(0, HEADER.pack(MAGIC, size, options.block_size, options.table_size,
                                     geometry.l1_entries, options.l2_cache_entries,
                                     len(path), len(fmt), len(data)))
        storage.write(HEADER.size, path + fmt + data)
        storage.write_zeroes(L1_OFFSET, geometry.metadata_start - L1_OFFSET)

    def open(self, storage: Storage, context: ImageContext) -> TableMapImage:
        return self.image_class(storage, context)

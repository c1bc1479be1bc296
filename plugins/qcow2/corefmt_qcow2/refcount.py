"""Reference counts: the refcount table (kept whole in memory) and refcount
blocks (in corefmt's MetadataCache), cluster allocation and freeing.

Ordering rules (the caller holds the image's metadata lock):

- a cluster's new refcount is durable before any table that uses it is
  written: the L2 cache depends on this cache for each allocation;
- a freed cluster's refcount drops only after the references to it are gone
  on disk (this cache depends on the L2 cache), and the cluster is not
  handed out again until a flush has written those references away
  (``quarantine``): a crash can leak it, never hand it to two owners;
- a new refcount block is written and flushed before the table entry that
  points at it; a new table before the header that points at it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from corefmt import ImageError, MetadataCache, Storage
from corefmt_qcow2 import events
from corefmt_qcow2.events import EventStorage
from corefmt_qcow2.layout import ENTRY, REFCOUNT_TABLE_OFFSET_MASK, div_round_up

#: Quarantined clusters are let go by a flush; past this many the caller flushes.
QUARANTINE_LIMIT = 4096
#: Room a grown refcount table leaves for more blocks (qemu grows by half).
TABLE_GROWTH_NUMERATOR, TABLE_GROWTH_DENOMINATOR = 3, 2


class RefcountCorruption(ImageError):
    """Impossible refcount metadata: the image is marked corrupt."""


def get_refcount(data: bytearray | bytes, index: int, bits: int) -> int:
    """Entry ``index`` of a refcount block; sub-byte entries fill each byte
    from its least significant bit (qemu's get_refcount_ro0..2)."""
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(data[index * width:(index + 1) * width], "big")
    per_byte = 8 // bits
    return (data[index // per_byte] >> (index % per_byte * bits)) & ((1 << bits) - 1)


def set_refcount(data: bytearray, index: int, bits: int, value: int) -> None:
    if bits >= 8:
        width = bits // 8
        data[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = index % per_byte * bits
    mask = ((1 << bits) - 1) << shift
    data[index // per_byte] = (data[index // per_byte] & ~mask) | (value << shift)


@functools.cache
def _nonzero_fields_table(bits: int) -> bytes:
    """byte -> how many of its ``bits``-wide fields are not zero."""
    mask = (1 << bits) - 1
    return bytes(sum(1 for shift in range(0, 8, bits) if value >> shift & mask)
                 for value in range(256))


def count_nonzero(data: bytes | bytearray, bits: int) -> int:
    """How many refcounts in a block are not zero (C loops, not Python ones)."""
    if bits < 8:
        return sum(bytes(data).translate(_nonzero_fields_table(bits)))
    code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
    words = memoryview(bytes(data)).cast(code)
    return len(words) - words.tolist().count(0)


class Refcounts:
    """The image's refcounts and its free-space allocator."""

    def __init__(self, storage: Storage, path: str | None, cluster_size: int, bits: int,
                 table_offset: int, table_clusters: int, cache_entries: int,
                 emit: Callable[[str], None],
                 set_table: Callable[[int, int], None]):
        self.storage = storage
        self.path = path
        self.cluster_size = cluster_size
        self.bits = bits
        self.max_refcount = (1 << bits) - 1
        self.entries_per_block = cluster_size * 8 // bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = storage.read(table_offset, table_clusters * cluster_size)
        self.table = [value for (value,) in ENTRY.iter_unpack(raw)]
        self.cache = MetadataCache(
            "qcow2 refcount blocks", EventStorage(storage, emit, events.REFBLOCK_UPDATE),
            cluster_size, cache_entries)
        self._emit = emit
        self._set_table = set_table
        #: Bumped when the table moves or gains a block (metadata places change).
        self.layout_version = 0
        #: Clusters freed since the last flush: not reused before it.
        self.quarantine: set[int] = set()
        #: Clusters being allocated right now: their refcount is not set yet.
        self._reserved: set[int] = set()
        self.free_index = 0
        #: Where the next compressed cluster's bytes go, inside a partly used
        #: host cluster (0: start a new one); see allocate_bytes.
        self.free_byte_offset = 0
        #: First cluster index past everything allocated or in the file.
        self.high_water = div_round_up(storage.size(), cluster_size)
        self.high_water = max(self.high_water, self._last_counted() + 1)

    def _last_counted(self) -> int:
        """The last cluster with a refcount: after a crash or a failed write
        refcounts can reach past the end of the file (-1: none)."""
        scanned: set[int] = set()  # a hostile table may name one block many times
        for block_index in range(len(self.table) - 1, -1, -1):
            offset = self.table[block_index] & REFCOUNT_TABLE_OFFSET_MASK
            if not offset or offset % self.cluster_size or offset in scanned:
                continue
            scanned.add(offset)
            data = self.storage.read(offset, self.cluster_size).rstrip(b"\0")
            if not data:
                continue
            last_byte = len(data) - 1
            if self.bits >= 8:
                index = last_byte // (self.bits // 8)
            else:
                per_byte = 8 // self.bits
                index = last_byte * per_byte + per_byte - 1
                while not get_refcount(data, index, self.bits):
                    index -= 1
            return block_index * self.entries_per_block + index
        return -1

    # -- lookups ----------------------------------------------------------------------
    def block_offset(self, block_index: int) -> int:
        """Where refcount block ``block_index`` is (0: none), checked."""
        if block_index >= len(self.table):
            return 0
        entry = self.table[block_index]
        offset = entry & REFCOUNT_TABLE_OFFSET_MASK
        if entry & ~REFCOUNT_TABLE_OFFSET_MASK:
            raise RefcountCorruption(self.path, "refcount table",
                                     self.table_offset + block_index * ENTRY.size,
                                     f"reserved bits set in entry {entry:#x}")
        if offset and (offset % self.cluster_size
                       or offset + self.cluster_size > self.high_water * self.cluster_size):
            raise RefcountCorruption(
                self.path, "refcount table", self.table_offset + block_index * ENTRY.size,
                f"refcount block {block_index} at {offset:#x} is not a valid cluster")
        return offset

    def get(self, cluster: int) -> int:
        block_index, index = divmod(cluster, self.entries_per_block)
        offset = self.block_offset(block_index)
        if not offset:
            return 0
        with self.cache.get(offset) as handle:
            return get_refcount(handle.data, index, self.bits)

    def count_used(self, clusters: int, limit: int) -> int:
        """Clusters below ``clusters`` with a refcount, counting stops at ``limit``."""
        count = 0
        for block_index in range(div_round_up(clusters, self.entries_per_block)):
            offset = self.block_offset(block_index)
            if not offset:
                continue
            with self.cache.get(offset) as handle:
                data = bytes(handle.data)
            first = block_index * self.entries_per_block
            if first + self.entries_per_block > clusters:
                count += sum(1 for index in range(clusters - first)
                             if get_refcount(data, index, self.bits))
            else:
                count += count_nonzero(data, self.bits)
            if count >= limit:
                break
        return count

    def _is_free(self, cluster: int) -> bool:
        return (cluster not in self.quarantine and cluster not in self._reserved
                and self.get(cluster) == 0)

    # -- changes ----------------------------------------------------------------------
    def update(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount; the new count."""
        block_index, index = divmod(cluster, self.entries_per_block)
        offset = self._ensure_block(block_index)
        with self.cache.get(offset) as handle:
            value = get_refcount(handle.data, index, self.bits) + delta
            if value < 0 or value > self.max_refcount:
                raise RefcountCorruption(
                    self.path, "refcount block", offset,
                    f"refcount of cluster {cluster} would become {value} "
                    f"(range 0..{self.max_refcount})")
            set_refcount(handle.data, index, self.bits, value)
            handle.mark_dirty()
        if value == 0:
            self.free_index = min(self.free_index, cluster)
            if self.free_byte_offset // self.cluster_size == cluster:
                # The partly used compressed cluster is free: once reused it
                # is someone else's, so packing must not continue in it.
                self.free_byte_offset = 0
        return value

    def allocate(self, count: int = 1) -> int:
        """``count`` contiguous free clusters with refcount 1; their offset."""
        start = self._find_free(count)
        self._reserved.update(range(start, start + count))
        self.high_water = max(self.high_water, start + count)
        try:
            self._take_run(start, count)
        finally:
            self._reserved.difference_update(range(start, start + count))
        self.high_water = max(self.high_water, start + count)
        if count == 1 or start == self.free_index:
            self.free_index = start + count
        return start * self.cluster_size

    def _take_run(self, start: int, count: int) -> None:
        """Refcount 1 for the free clusters ``start..start+count``: one slice
        assignment per refcount block where entries are whole bytes (a
        multi-cluster write allocates thousands at once), else, or where a
        count is unexpectedly not zero, one ``update`` each (which reports it)."""
        epb = self.entries_per_block
        cluster = start
        while cluster < start + count:
            block_index, index = divmod(cluster, epb)
            run = min(start + count, (block_index + 1) * epb) - cluster
            offset = self._ensure_block(block_index)
            taken = False
            if self.bits >= 8:
                width = self.bits // 8
                with self.cache.get(offset) as handle:
                    entries = slice(index * width, (index + run) * width)
                    if handle.data[entries] == bytes(run * width):
                        handle.data[entries] = (1).to_bytes(width, "big") * run
                        handle.mark_dirty()
                        taken = True
            if not taken:
                for each in range(cluster, cluster + run):
                    self.update(each, 1)
            cluster += run

    def allocate_bytes(self, size: int) -> int:
        """``size`` bytes (at most a cluster) for a compressed cluster, packed
        right after the previous one as qemu's qcow2_alloc_bytes packs them:
        every host cluster the bytes touch gains one reference, so a host
        cluster shared by several compressed clusters is freed with the last.

        A partly used cluster is given up (a new one started) when its
        refcount is full, or when it has dropped to zero: its compressed
        clusters were freed, and a freed cluster is not reused before the
        references to it are gone on disk."""
        cs = self.cluster_size
        offset = self.free_byte_offset
        if offset:
            count = self.get(offset // cs)
            if count in (0, self.max_refcount) or offset // cs in self.quarantine:
                offset = 0
        room = cs - offset % cs if offset else 0
        if room < size:
            new = self._find_free(1)
            if offset and new * cs == offset + room:  # the next cluster is free: span it
                extra = [new]
            else:
                offset, extra = new * cs, [new]
            self._reserved.update(extra)
            self.high_water = max(self.high_water, new + 1)
        else:
            extra = []
        try:
            for cluster in range(offset // cs, (offset + size - 1) // cs + 1):
                self.update(cluster, 1)
        finally:
            self._reserved.difference_update(extra)
        if extra and extra[0] == self.free_index:
            self.free_index = extra[0] + 1
        self.free_byte_offset = (offset + size) if (offset + size) % cs else 0
        return offset

    def free(self, offset: int, count: int = 1) -> None:
        """Drop one reference to each cluster; clusters that reach 0 wait in
        quarantine until the next flush."""
        first = offset // self.cluster_size
        for cluster in range(first, first + count):
            if self.update(cluster, -1) == 0:
                self.quarantine.add(cluster)

    def release_quarantine(self) -> None:
        """After a flush made every dropped reference durable."""
        if self.quarantine:
            self.free_index = min(self.free_index, min(self.quarantine))
            self.quarantine.clear()

    def _find_free(self, count: int) -> int:
        """The first run of ``count`` free clusters from ``free_index``
        (everything past the high water mark is free)."""
        # Clusters in use for good at the start are skipped once, not on
        # every multi-cluster allocation (a rebase's writes rescanned the
        # whole image each time). One at refcount 0 stops it: quarantined
        # or reserved, it is free later.
        while self.free_index < self.high_water:
            used = self._used_run(self.free_index)
            if not used:
                break
            self.free_index = min(self.high_water, self.free_index + used)
        cluster, run = self.free_index, 0
        while run < count and cluster + run < self.high_water:
            if self._is_free(cluster + run):
                run += 1
            else:
                cluster, run = cluster + run + 1, 0
        return cluster

    def _used_run(self, cluster: int) -> int:
        """How many clusters from ``cluster`` on, inside its refcount block,
        have a refcount (0: it has none). Byte-wide entries are searched for
        a zero entry at C speed: a rebase of a 1.7 GB image spent 65 ms
        asking them one by one on its first allocation."""
        block_index, index = divmod(cluster, self.entries_per_block)
        offset = self.block_offset(block_index)
        if not offset:
            return 0
        with self.cache.get(offset) as handle:
            data = bytes(handle.data)
        if self.bits < 8:  # sub-byte entries: one by one, from the block in hand
            run = index
            while run < self.entries_per_block and get_refcount(data, run, self.bits):
                run += 1
            return run - index
        width = self.bits // 8
        zero = bytes(width)
        position = index * width
        while True:
            found = data.find(zero, position)
            if found < 0:
                return self.entries_per_block - index
            if found % width == 0:
                return found // width - index
            position = found + width - found % width  # a match across entries

    # -- refcount blocks and the table -----------------------------------------------
    def _ensure_block(self, block_index: int) -> int:
        """The offset of refcount block ``block_index``, allocating it."""
        if block_index >= len(self.table):
            self._grow_table(block_index + 1)
        offset = self.block_offset(block_index)
        if offset:
            return offset
        self._emit(events.REFBLOCK_ALLOC)
        new = self._find_free(1)
        self._reserved.add(new)
        self.high_water = max(self.high_water, new + 1)
        try:
            block = bytearray(self.cluster_size)
            if new // self.entries_per_block == block_index:
                # The block counts itself (qemu puts it at the start of its range).
                set_refcount(block, new % self.entries_per_block, self.bits, 1)
            else:
                self.update(new, 1)
                self.cache.flush(storage=True)
            new_offset = new * self.cluster_size
            self.storage.write(new_offset, block)
            self.storage.flush()
            self._emit(events.REFTABLE_UPDATE)
            # Memory follows the disk, as qemu's hook-up does: the entry is
            # durable before the block is used, and a failed write leaves the
            # block unknown here (leaked at worst), never known here and
            # absent there. A torn entry is rewritten before any cluster of
            # the block's range can be handed out again.
            self.storage.write(self.table_offset + block_index * ENTRY.size,
                               ENTRY.pack(new_offset))
            self.storage.flush()
            self.table[block_index] = new_offset
            self.layout_version += 1
        finally:
            self._reserved.discard(new)
        if new >= self.free_index:
            self.free_index = new + 1
        return new_offset

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to the end of the file, bigger; new refcount
        blocks for the area it takes are laid down with it (self-describing)."""
        self._emit(events.REFTABLE_GROW)
        cs, per_block = self.cluster_size, self.entries_per_block
        self.cache.flush(storage=True)  # blocks on disk before they are read for the move
        start = max(self.high_water, div_round_up(self.storage.size(), cs))
        table_clusters, new_blocks, missing = 0, 0, []
        while True:
            end = start + new_blocks + table_clusters
            needed = max(min_entries, div_round_up(end, per_block), len(self.table))
            wanted_table = div_round_up(
                needed * TABLE_GROWTH_NUMERATOR // TABLE_GROWTH_DENOMINATOR * ENTRY.size, cs)
            missing = [index for index in range(start // per_block, div_round_up(end, per_block))
                       if index >= len(self.table) or not self.table[index]]
            if (wanted_table, len(missing)) == (table_clusters, new_blocks):
                break
            table_clusters, new_blocks = wanted_table, len(missing)
        area = range(start, start + new_blocks + table_clusters)
        table = self.table + [0] * (table_clusters * cs // ENTRY.size - len(self.table))
        blocks: dict[int, bytearray] = {}
        for position, block_index in enumerate(missing):
            table[block_index] = (start + position) * cs
            blocks[block_index] = bytearray(cs)
        old = self.table
        self.table = table  # existing blocks are found through the new table from here on
        self.high_water = max(self.high_water, area.stop)
        for cluster in area:
            block_index, index = divmod(cluster, per_block)
            if block_index in blocks:
                set_refcount(blocks[block_index], index, self.bits, 1)
            else:
                self.update(cluster, 1)
        try:
            self.cache.flush(storage=True)
            for position, block_index in enumerate(missing):
                self.storage.write((start + position) * cs, blocks[block_index])
            new_table_offset = (start + new_blocks) * cs
            self.storage.write(new_table_offset,
                               b"".join(ENTRY.pack(value) for value in table))
            self.storage.flush()
            old_offset, old_clusters = self.table_offset, self.table_clusters
            self._set_table(new_table_offset, table_clusters)  # header, flushed
        except BaseException:
            self.table = old
            raise
        self.table_offset, self.table_clusters = new_table_offset, table_clusters
        self.layout_version += 1
        # Nothing points at the old table any more: its clusters are free now.
        for cluster in range(old_offset // cs, old_offset // cs + old_clusters):
            if self.update(cluster, -1) == 0:
                self.free_index = min(self.free_index, cluster)

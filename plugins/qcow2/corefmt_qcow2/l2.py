"""L2 entries: what one guest cluster (or, with extended L2 entries, one of
its 32 subclusters) is, as qcow2.txt's "Cluster mapping" defines it."""

from __future__ import annotations

import functools
import struct

from corefmt_qcow2.layout import (
    COMPRESSED_SECTOR,
    ENTRY,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_ALLOC_MASK,
    SUBCLUSTER_ZERO_SHIFT,
)

# What a cluster or subcluster is (qemu's QCow2SubclusterType).
UNALLOCATED_PLAIN = 0  # falls through to the backing image
UNALLOCATED_ALLOC = 1  # extended L2: a host cluster exists, this subcluster is not in it
ZERO_PLAIN = 2
ZERO_ALLOC = 3  # reads as zeros; the host cluster stays reserved
NORMAL = 4
COMPRESSED = 5
INVALID = 6

#: Kinds whose data comes from the host cluster at ``entry & OFFSET_MASK``.
HAS_HOST = (UNALLOCATED_ALLOC, ZERO_ALLOC, NORMAL)


def kind_of(entry: int, bitmap: int | None, subcluster: int = 0, data_file: bool = False) -> int:
    """The kind of a cluster (``bitmap`` None) or of one subcluster.

    With an external data file, host offset 0 is a real place: clusters
    there always have refcount 1, so COPIED tells "at 0" from "none" (qemu's
    qcow2_get_cluster_type)."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    host = bool(entry & OFFSET_MASK) or (data_file and bool(entry & OFLAG_COPIED))
    if bitmap is None:
        if entry & OFLAG_ZERO:
            return ZERO_ALLOC if host else ZERO_PLAIN
        return NORMAL if host else UNALLOCATED_PLAIN
    allocated = bitmap >> subcluster & 1
    zero = bitmap >> (SUBCLUSTER_ZERO_SHIFT + subcluster) & 1
    if allocated and zero:
        return INVALID
    if zero:
        return ZERO_ALLOC if host else ZERO_PLAIN
    if allocated:
        return NORMAL if host else INVALID
    return UNALLOCATED_ALLOC if host else UNALLOCATED_PLAIN


def alloc_bits(first: int, count: int) -> int:
    """Allocation bits of subclusters ``first`` .. ``first + count - 1``."""
    return ((1 << count) - 1) << first


ALL_ZEROES = SUBCLUSTER_ALLOC_MASK << SUBCLUSTER_ZERO_SHIFT


class CompressedLayout:
    """Where a compressed cluster's bytes are (qcow2.txt: bits 0..x-1 the host
    offset, bits x..61 the count of further 512-byte sectors)."""

    def __init__(self, cluster_bits: int):
        self.offset_bits = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.offset_bits) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def locate(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed entry."""
        offset = entry & self.offset_mask
        sectors = (entry >> self.offset_bits & self.sectors_mask) + 1
        return offset, sectors * COMPRESSED_SECTOR - (offset % COMPRESSED_SECTOR)

    def sectors_span(self, entry: int) -> tuple[int, int]:
        """(first byte, bytes) the entry's whole sectors take, for refcounts."""
        offset = entry & self.offset_mask
        sectors = (entry >> self.offset_bits & self.sectors_mask) + 1
        start = offset - offset % COMPRESSED_SECTOR
        return start, sectors * COMPRESSED_SECTOR


def continuing_entries(data: bytes | bytearray, index: int, entry: int, step: int,
                       limit: int) -> int:
    """How many standard (8-byte) entries after ``index`` continue ``entry``:
    entry ``index + j`` equals ``entry + j * step`` (``step`` 0: the same
    entry again, e.g. unallocated; a cluster size: contiguous host
    clusters), at most ``limit``.

    Runs are measured by comparing packed expected entries with the table,
    galloping (1, 2, 4, ... entries at a time, halving on a mismatch), so a
    run of n entries costs O(log n) memcmps instead of n unpacks, and a
    short run costs about as much as one entry."""
    matched, width = 0, 1
    start = (index + 1) * ENTRY.size
    while matched < limit:
        count = min(width, limit - matched)
        first = entry + (matched + 1) * step
        expected = (entries_struct(count).pack(*range(first, first + count * step, step))
                    if step else entries_struct(1).pack(first) * count)
        at = start + matched * ENTRY.size
        if data[at:at + count * ENTRY.size] == expected:
            matched += count
            width *= 2
        elif count == 1:
            break
        else:
            width = count // 2
    return matched


@functools.lru_cache(maxsize=64)
def entries_struct(count: int) -> struct.Struct:
    """``count`` big-endian standard entries (runs gallop and writes batch
    up to MAX_BATCH_BYTES: few distinct counts)."""
    return struct.Struct(f">{count}Q")

"""L2 entries: what one guest cluster (or, with extended L2 entries, one of
its 32 subclusters) is, as qcow2.txt's "Cluster mapping" defines it."""

from __future__ import annotations

import zlib

from corefmt_qcow2.layout import (
    COMPRESSED_SECTOR,
    COMPRESSION_ZSTD,
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
#: zlib's raw deflate with a 4 KiB window: what qemu writes and reads.
ZLIB_WINDOW_BITS = -12


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


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes | None:
    """A compressed cluster's content, or None if it does not decompress to
    exactly one cluster (the stored length is rounded up to sectors, so
    trailing bytes after the stream are expected)."""
    if compression_type == COMPRESSION_ZSTD:
        import zstandard

        out = bytearray()
        try:  # a stream reader: a hostile frame cannot make more than a cluster
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
            while len(out) < cluster_size:
                chunk = reader.read(cluster_size - len(out))
                if not chunk:
                    break
                out += chunk
        except zstandard.ZstdError:
            return None
    else:
        try:
            out = zlib.decompressobj(ZLIB_WINDOW_BITS).decompress(data, cluster_size)
        except zlib.error:
            return None
    if len(out) < cluster_size:
        return None
    return bytes(out[:cluster_size])

"""qcow2's measure: what qemu 7.2's qcow2_measure computes.

The fully allocated size is qcow2_calc_prealloc_size's: a header cluster,
the L2 tables, the L1 table (whole clusters), and the refcount table and
blocks that refcount all of these and themselves (qemu's fixed point,
qcow2_refcount_metadata_size). The required size is that less the data
clusters that would stay unallocated: for a source image, every cluster
holding data somewhere in its chain counts (zero ranges do not), for
``--size`` none, with preallocation=falloc/full all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt import MeasureResult, OptionError
from corefmt.ops.convert import chain_extents
from corefmt_qcow2.layout import (
    MAX_L1_BYTES,
    MIN_EXTL2_CLUSTER_SIZE,
    VERSION_2,
    VERSION_3,
    div_round_up,
)

if TYPE_CHECKING:
    from corefmt import BackingRef
    from corefmt.block.node import BlockNode
    from corefmt_qcow2.options import Qcow2CreateOptions

L1E_SIZE = 8
L2E_SIZE_NORMAL, L2E_SIZE_EXTENDED = 8, 16
REFTABLE_ENTRY_SIZE = 8
DEFAULT_REFCOUNT_BITS = 16
#: The compat words qemu's measure takes (create takes more).
MEASURE_VERSIONS = {"0.10": VERSION_2, "1.1": VERSION_3}
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
UINT64 = 2**64


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> int:
    """qcow2_refcount_metadata_size: bytes of refcount blocks and table for
    ``clusters`` clusters, found as the fixed point where the refcount
    metadata also refcounts itself."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = div_round_up(clusters + table + blocks, refcounts_per_block)
        table = div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += div_round_up(table, 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: the fully allocated image, metadata included."""
    aligned = round_up(total_size, cluster_size)
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta = cluster_size  # the header
    l2_entries = round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += l2_entries * l2e_size
    l1_entries = round_up(l2_entries * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += l1_entries * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def allocated_bytes(source: BlockNode, cluster_size: int) -> int:
    """Bytes of the clusters that hold data anywhere in the source's chain,
    walked as qemu does: a data range counts from its cluster's start to the
    end of its last cluster, and the walk goes on from there; zero ranges
    are skipped."""
    required = 0
    offset = 0
    for extent in chain_extents(source):
        if extent.end <= offset:
            continue
        start = max(offset, extent.offset)
        if extent.zero or not extent.data or extent.node is None:
            offset = extent.end
            continue
        end = round_up(extent.end, cluster_size)
        required += start % cluster_size + (end - start)
        offset = end
    return required


def persistent_bitmaps_size(source: BlockNode, cluster_size: int) -> int | None:
    """qcow2_get_persistent_dirty_bitmap_size for the source's own bitmaps
    (in-use ones too: qemu loads them), or None where the source cannot have
    any (qemu prints no bitmaps line)."""
    from corefmt_qcow2.bitmaps import BITMAP_TABLE_ENTRY_SIZE, bitmap_bytes, entry_size
    from corefmt_qcow2.image import Qcow2Image

    image = getattr(source, "image", None)
    if not isinstance(image, Qcow2Image) or image.header.version < VERSION_3:
        return None
    total = directory_bytes = 0
    for bitmap in image.bitmaps.bitmaps:
        clusters = div_round_up(bitmap_bytes(source.virtual_size, bitmap.granularity),
                                cluster_size)
        total += clusters * cluster_size
        total += round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory_bytes += entry_size(len(bitmap.name.encode()))
    return total + round_up(directory_bytes, cluster_size)


def measure(size: int, options: Qcow2CreateOptions, source: BlockNode | None,
            backing: BackingRef | None = None) -> MeasureResult:
    """qcow2_measure: its checks in its order and words, then the sizes."""
    extended_l2 = options.extended_l2
    cluster_size = options.cluster_size
    if extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise OptionError("Extended L2 entries are only supported with cluster sizes of "
                          f"at least {MIN_EXTL2_CLUSTER_SIZE} bytes")
    version = MEASURE_VERSIONS.get(options.compat)
    if version is None:
        raise OptionError(f"Invalid compatibility level: '{options.compat}'")
    refcount_bits = options.refcount_bits
    if version < VERSION_3 and refcount_bits != DEFAULT_REFCOUNT_BITS:
        raise OptionError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use compat=1.1 or greater)")
    if options.preallocation not in PREALLOCATION_MODES:
        raise OptionError(f"invalid parameter value: {options.preallocation}")
    if options.encrypt_format == "luks":
        raise OptionError("encrypted qcow2 images are not supported by corefmt "
                          "(encrypt.format=luks)")

    virtual_size = round_up(size, cluster_size) % UINT64
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    l2_tables = div_round_up(virtual_size // cluster_size, cluster_size // l2e_size)
    if l2_tables * L1E_SIZE > MAX_L1_BYTES:
        raise OptionError("The image size is too large (try using a larger cluster size)")

    required = 0
    if source is not None:
        virtual_size = round_up(source.virtual_size, cluster_size)
        # A new image's backing file may share nothing with the source: all counts.
        required = (virtual_size if backing is not None
                    else allocated_bytes(source, cluster_size))
    if options.preallocation in ("full", "falloc"):
        required = virtual_size
    fully_allocated = prealloc_size(virtual_size, cluster_size,
                                    refcount_bits.bit_length() - 1, extended_l2)
    bitmaps = None
    if version >= VERSION_3 and source is not None:
        bitmaps = persistent_bitmaps_size(source, cluster_size)
    return MeasureResult(required=fully_allocated - virtual_size + required,
                         fully_allocated=fully_allocated, bitmaps=bitmaps)

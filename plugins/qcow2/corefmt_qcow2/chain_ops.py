"""What the chain verbs ask of a qcow2 image: rewrite the backing name
(rebase, stream: qemu's qcow2_change_backing_file) and empty the image
after a commit (qemu's qcow2_make_empty).

make_empty takes qemu's two paths. A v3 image without snapshots, bitmaps
or a data file whose L1 table fits beside the header, refcount table and
one refcount block in a single block's range is rebuilt from scratch and
its file cut to those clusters (qemu's make_completely_empty): after a
commit the top is as small as a new one. Any other image gets a full
discard of each cluster (the L2 entry becomes 0, so reads go to the
backing file again, and the host cluster's reference is dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt.capabilities import HeaderFull
from corefmt.driver import BackingRef
from corefmt.errors import InvalidRequest, NotSupported
from corefmt_qcow2 import events, l2
from corefmt_qcow2.amend import _update_header
from corefmt_qcow2.layout import (
    ENTRY,
    EXT_BACKING_FORMAT,
    INCOMPAT_DIRTY,
    MAX_BACKING_NAME,
    VERSION_3,
    div_round_up,
)

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image


def set_backing(image: Qcow2Image, reference: BackingRef | None) -> None:
    """The backing name and format in the header, in one durable cluster-0
    write (the caller holds the image's lock and flushed the data first)."""
    path = reference.path if reference is not None else None
    if path and image.data_file_raw:
        # The raw data file alone would no longer show the disk.
        raise InvalidRequest("a raw external data file cannot have a backing file")
    if path and len(path.encode()) > MAX_BACKING_NAME:
        raise InvalidRequest(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    header = image.header
    saved = (header.backing_file, list(header.extensions))
    header.backing_file = path or None
    fmt = reference.format if reference is not None else None
    header.set_extension(EXT_BACKING_FORMAT, fmt.encode() if path and fmt else None)
    header.set_backing_identity(reference.identity if reference is not None else None)
    try:
        header.pack(image.cluster_size)
    except ValueError:
        header.backing_file, header.extensions = saved
        raise HeaderFull("the backing file name does not fit in cluster 0") from None
    _update_header(image)
    image.backing = reference


#: Clusters a rebuilt empty image starts with before its L1 table: header,
#: refcount table, first refcount block (qemu's layout for a new image).
HEADER_CLUSTER, REFTABLE_CLUSTER, REFBLOCK_CLUSTER, FIRST_L1_CLUSTER = 0, 1, 2, 3


def make_empty(image: Qcow2Image) -> None:
    """Every guest cluster unallocated, its host cluster freed (the caller
    holds the image's lock)."""
    if image.data_file_raw:
        raise NotSupported("an image with a raw external data file cannot be emptied")
    if _can_rebuild(image):
        _rebuild_empty(image)
        return
    image.bitmaps.note(0, image.virtual_size)
    per_table = image.l2_entries
    clusters = -(-image.virtual_size // image.cluster_size)
    width = image.entry_size
    for l1_index in range(len(image.l1)):
        if not image.l2_table_offset(l1_index):
            continue  # no L2 table: nothing allocated in its range
        count = min(per_table, clusters - l1_index * per_table)
        table = image.writable_l2(l1_index)
        with image.l2_cache.get(table) as handle:
            old = [image._read_entries(handle.data, index) for index in range(count)]
            if not any(entry or bitmap for entry, bitmap in old):
                continue
            handle.data[:count * width] = bytes(count * width)
            handle.mark_dirty()
        for index, (entry, _bitmap) in enumerate(old):  # references go after the L2 change
            if entry & l2.OFLAG_COMPRESSED or image._has_host(entry):
                image._free_entry(entry, l1_index * per_table + index)
        image._bound_quarantine()
    image._flush()


def _l1_clusters(image: Qcow2Image) -> int:
    return div_round_up(len(image.l1) * ENTRY.size, image.cluster_size)


def _can_rebuild(image: Qcow2Image) -> bool:
    """qemu's condition for make_completely_empty: nothing but the active
    state holds clusters (no snapshot, bitmap or data file), the dirty bit
    exists (v3) to cover the rebuild, and the new metadata fits one block."""
    header = image.header
    return (header.version >= VERSION_3 and not header.nb_snapshots
            and not image.bitmaps.entries and not image.has_data_file
            and FIRST_L1_CLUSTER + _l1_clusters(image) <= image.refcounts.entries_per_block)


def _rebuild_empty(image: Qcow2Image) -> None:
    """qemu's make_completely_empty: header, an empty refcount table, one
    refcount block and a zeroed L1 table in the first clusters, the file
    cut after them. The dirty bit is durable first: a crash anywhere in
    between leaves an image whose refcounts the next read-write open
    rebuilds (as after a lazy-refcounts crash), and whose L1 entries are
    each either old (the top still holding what the commit copied down) or
    zero (reading the base, which holds the same data). The L1 zeroing is
    made durable before the first clusters are overwritten, where qemu
    writes both at once: an old L1 entry must never point at a cluster that
    has already become zeros."""
    cs = image.cluster_size
    l1_clusters = _l1_clusters(image)
    image._flush()
    image.l2_cache.clear()
    image._mark_dirty()
    image.context.emit(events.L1_UPDATE)
    image.storage.write(image.header.l1_table_offset, bytes(l1_clusters * cs))
    image.storage.flush()
    image.l1 = [0] * len(image.l1)
    image._l1_version += 1
    image._decompressed = None  # its entry may name new bytes from here on
    image._metadata_preallocated = None  # judged again on the new, small file
    image.storage.write(REFTABLE_CLUSTER * cs, bytes((2 + l1_clusters) * cs))
    header = image.header
    header.l1_table_offset = FIRST_L1_CLUSTER * cs
    header.refcount_table_offset, header.refcount_table_clusters = REFTABLE_CLUSTER * cs, 1
    image.context.emit(events.REFTABLE_UPDATE)
    image.storage.write(REFTABLE_CLUSTER * cs, ENTRY.pack(REFBLOCK_CLUSTER * cs))
    image.write_header()  # flushed: the new places are the image's from here on
    image.storage.truncate((FIRST_L1_CLUSTER + l1_clusters) * cs)
    image.refcounts = refcounts = image._load_refcounts()
    for cluster in range(FIRST_L1_CLUSTER + l1_clusters):
        refcounts.update(cluster, 1)
    refcounts.cache.make_durable()
    image.metadata_moved()
    header.incompatible_features &= ~INCOMPAT_DIRTY
    image.write_header()

"""What the chain verbs ask of a qcow2 image: rewrite the backing name
(rebase, stream: qemu's qcow2_change_backing_file) and empty the image
after a commit (qemu's qcow2_make_empty).

make_empty takes qemu's path that works for every image: a full discard
of each cluster (the L2 entry becomes 0, so reads go to the backing file
again, and the host cluster's reference is dropped). qemu 7.2 rebuilds a
v3 image without snapshots or bitmaps from scratch instead
(make_completely_empty, which also shrinks the file); the guest view and
``qemu-img map`` are the same, the file here keeps its length, and its
freed clusters are reused by later writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt.capabilities import HeaderFull
from corefmt.driver import BackingRef
from corefmt.errors import InvalidRequest, NotSupported
from corefmt_qcow2 import l2
from corefmt_qcow2.amend import _update_header
from corefmt_qcow2.layout import EXT_BACKING_FORMAT, MAX_BACKING_NAME

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
    try:
        header.pack(image.cluster_size)
    except ValueError:
        header.backing_file, header.extensions = saved
        raise HeaderFull("the backing file name does not fit in cluster 0") from None
    _update_header(image)
    image.backing = reference


def make_empty(image: Qcow2Image) -> None:
    """Every guest cluster unallocated, its host cluster freed (the caller
    holds the image's lock)."""
    if image.data_file_raw:
        raise NotSupported("an image with a raw external data file cannot be emptied")
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

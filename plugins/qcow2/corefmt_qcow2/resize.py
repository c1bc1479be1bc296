"""Changing a qcow2 image's virtual size (qemu's qcow2_co_truncate; the
grown part is preallocated by preallocate.py): growing makes the L1 table
big enough; shrinking drops the clusters past the new end first, so nothing
points outside the disk."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from corefmt import NotSupported, OptionError
from corefmt_qcow2.layout import ENTRY, MAX_L1_BYTES, VERSION_3, div_round_up
from corefmt_qcow2.options import PREALLOCATION_MODES

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

#: Most L1 entries an image may have: qemu opens no bigger table.
MAX_L1_ENTRIES = MAX_L1_BYTES // ENTRY.size


class L1TooLarge(OptionError):
    """The new size needs an L1 table qemu would refuse to open (its
    qcow2_grow_l1_table's -EFBIG); nothing has changed yet."""

    code = errno.EFBIG

    def __init__(self) -> None:
        super().__init__(f"Failed to grow the L1 table: {os.strerror(self.code)}")


def resize(image: Qcow2Image, size: int, preallocation: str = "off") -> None:
    """Set the virtual size (the caller holds the image's metadata lock; the
    caller preallocates the grown part afterwards)."""
    header = image.header
    if size % 512:
        raise OptionError("The new size must be a multiple of 512")
    if preallocation not in PREALLOCATION_MODES:
        raise NotSupported(f"Unsupported preallocation mode: {preallocation}")
    if preallocation != "off" and size < header.size:
        raise OptionError("Preallocation can't be used for shrinking an image")
    if header.nb_snapshots and header.version < VERSION_3:
        raise OptionError("Can't resize a v2 image which has snapshots")
    image.bitmaps.check_resize()  # qemu: consistent bitmaps follow the size, others refuse
    old_size = header.size
    cs = image.cluster_size
    entries = div_round_up(size, cs * image.l2_entries)
    if entries > MAX_L1_ENTRIES:
        raise L1TooLarge
    if size < header.size:
        first = div_round_up(size, cs)
        for cluster in range(first, div_round_up(header.size, cs)):
            if image.l2_table_offset(cluster // image.l2_entries):
                image.clear_cluster(cluster)
        for l1_index in range(entries, len(image.l1)):
            if image.l2_table_offset(l1_index):
                image.drop_l2(l1_index)
        image.flush_locked()
    elif entries > header.l1_size:
        image.grow_l1(entries)
    header.size = size
    image.virtual_size = size
    image.write_header()
    image.bitmaps.resized(old_size)

"""qemu-img amend for qcow2: qemu 7.2's qcow2_amend_options.

The steps run in qemu's order, with its refusals and messages:

1. the options are checked as qemu's loop over its option list does
   (``data_file`` needs an image with an external data file; ``data_file_raw``
   can only be cleared, never set on an existing image);
2. upgrade (compat 0.10 -> 1.1): the header is rewritten as version 3 with
   the feature name table;
3. a new refcount width (qemu's qcow2_change_refcount_order): new refcount
   blocks and table, carrying every cluster's stored refcount, are laid out
   past the end of the file (they count themselves), written and flushed;
   then the header switches to them and the old ones are freed;
4. ``data_file_raw`` off, ``data_file`` renamed, the header rewritten;
5. ``backing_file``/``backing_fmt`` other than the image's are refused;
6. ``lazy_refcounts`` on (v3 only) or off (refcounts flushed, the dirty bit
   cleared first);
7. ``size``: the image is resized;
8. downgrade (compat 1.1 -> 0.10, qemu's qcow2_downgrade): refused for a
   refcount width other than 16, an external data file, extended L2 entries
   and zstd compressed clusters; zero clusters are expanded as
   qcow2_expand_zero_clusters does (a plain one is deallocated, or with a
   backing file given a new zeroed cluster; a preallocated one is zeroed
   and becomes a normal cluster), flushed, and the header rewritten as
   version 2 (72 bytes, no feature table, other extensions kept).

Internal snapshots: corefmt does not rewrite snapshot tables or snapshot L2
tables, so an upgrade whose snapshot table needs qemu's v3 extra data and a
downgrade of an image with snapshots are refused (after qemu's own checks).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corefmt.errors import CorefmtError
from corefmt_qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPAT_VERSIONS,
    COMPRESSION_ZLIB,
    ENTRY,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SNAPSHOT_HEADER,
    TABLE_ENTRY_ALIGNMENT,
    V2_HEADER_LENGTH,
    V2_REFCOUNT_ORDER,
    V3_HEADER_LENGTH,
    VERSION_2,
    VERSION_3,
    div_round_up,
    feature_table,
)
from corefmt_qcow2.refcount import Refcounts, get_refcount, set_refcount

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

Progress = Callable[[int, int], None]

#: Extra data v3 requires: 64-bit VM state size and the virtual disk size.
SNAPSHOT_V3_EXTRA = 16
UINT32_MAX = 0xFFFFFFFF
#: Bytes of a refcount block scanned at once for non-zero entries.
SCAN_CHUNK = 512

# qemu's amend operations, for the progress it reports (QCOW2_UPGRADING...).
OPERATION_NONE, UPGRADING, CHANGING_REFCOUNT_ORDER, DOWNGRADING = range(4)


class AmendError(CorefmtError):
    """qemu refused to amend (the image may have been changed up to there)."""


def amend(image: Qcow2Image, options: Any, progress: Progress | None = None, *,
          size: int | None = None,
          backing: tuple[str | None, str | None] | None = None) -> None:
    """Amend an open (read-write) image; the caller holds its metadata lock.

    ``size``: qemu's ``size`` option (0 or None: unchanged); ``backing``:
    ``(backing_file, backing_fmt)`` when either was given (None for one not
    given), which must be the image's own.
    """
    header = image.header
    old_version = header.version
    new_version = COMPAT_VERSIONS[options.compat] if options.compat is not None else old_version
    raw_now = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
    data_file = options.data_file
    if data_file is not None and not image.has_data_file:
        raise AmendError("data-file can only be set for images that use an external data file")
    data_file_raw = raw_now if options.data_file_raw is None else options.data_file_raw
    if data_file_raw and not raw_now:
        raise AmendError("data-file-raw cannot be set on existing images")
    lazy = image.lazy if options.lazy_refcounts is None else options.lazy_refcounts
    refcount_bits = header.refcount_bits if options.refcount_bits is None \
        else options.refcount_bits

    report = _Progress(progress, (new_version != old_version)
                       + (refcount_bits != header.refcount_bits))

    # Upgrade first (some features need compat=1.1).
    if new_version > old_version:
        report.operation = UPGRADING
        _upgrade(image, report)

    if refcount_bits != header.refcount_bits:
        if new_version < VERSION_3 and refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility level "
                             "1.1 or above (use compat=1.1 or greater)")
        report.operation = CHANGING_REFCOUNT_ORDER
        change_refcount_order(image, refcount_bits, report)

    # data-file-raw blocks backing files, so it is cleared first.
    if data_file_raw:
        header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
    else:
        header.autoclear_features &= ~AUTOCLEAR_DATA_FILE_RAW
    image.data_file_raw = bool(image.has_data_file and data_file_raw)
    if data_file is not None:
        header.set_extension(EXT_DATA_FILE, data_file.encode() if data_file else None)
    _update_header(image)

    if backing is not None and backing != (header.backing_file, header.backing_format):
        raise AmendError("Cannot amend the backing file\n"
                         "You can use 'qemu-img rebase' instead.")

    if lazy != image.lazy:
        if lazy:
            if new_version < VERSION_3:
                raise AmendError("Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
            header.compatible_features |= COMPAT_LAZY_REFCOUNTS
            _update_header(image)
            image.lazy = True
        else:
            _mark_clean(image)
            header.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
            _update_header(image)
            image.lazy = False

    if size:
        from corefmt_qcow2.resize import resize

        resize(image, size)

    # Downgrade last (so unsupported features can be removed before).
    if new_version < old_version:
        report.operation = DOWNGRADING
        _downgrade(image, report)


class _Progress:
    """qemu's qcow2_amend_helper_cb: each operation's (done, total) as part of
    the whole amend's, the operations not started yet projected."""

    def __init__(self, callback: Progress | None, total_operations: int):
        self.callback = callback
        self.total_operations = max(total_operations, 1)
        self.operation = OPERATION_NONE
        self.last_operation = OPERATION_NONE
        self.offset_completed = 0
        self.operations_completed = 0
        self.last_work_size = 0

    def __call__(self, offset: int, work_size: int) -> None:
        if self.callback is None:
            return
        if self.operation != self.last_operation:
            if self.last_operation != OPERATION_NONE:
                self.offset_completed += self.last_work_size
                self.operations_completed += 1
            self.last_operation = self.operation
        self.last_work_size = work_size
        current = self.offset_completed + work_size
        projected = current * (self.total_operations - self.operations_completed - 1) \
            // (self.operations_completed + 1)
        if current + projected:
            self.callback(self.offset_completed + offset, current + projected)


def _update_header(image: Qcow2Image) -> None:
    """qcow2_update_header: the header, its extensions and the backing name,
    the rest of cluster 0 zeroed (no stale bytes of a longer old header)."""
    image.write_header()
    used = len(image.header.pack(image.cluster_size))
    image.storage.write(used, bytes(image.cluster_size - used))
    image.storage.flush()


def _mark_clean(image: Qcow2Image) -> None:
    """qcow2_mark_clean: refcounts made right on disk, then the dirty bit cleared."""
    if image.header.incompatible_features & INCOMPAT_DIRTY:
        image.flush_locked()
        image.header.incompatible_features &= ~INCOMPAT_DIRTY
        _update_header(image)


# -- snapshots ------------------------------------------------------------------------------
def _snapshots(image: Qcow2Image) -> list[tuple[int, int | None, int | None, int]]:
    """(vm_state_size, 64-bit vm_state_size, disk size, extra data size) of each
    internal snapshot (None where its extra data has no such field)."""
    header = image.header
    found: list[tuple[int, int | None, int | None, int]] = []
    position = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        raw = image.storage.read(position, SNAPSHOT_HEADER.size)
        if len(raw) < SNAPSHOT_HEADER.size:
            raise AmendError("Failed to read the snapshot table")
        (_l1_offset, _l1_size, id_size, name_size, _date, _nsec, _clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack(raw)
        extra = image.storage.read(position + SNAPSHOT_HEADER.size, min(extra_size, 16))
        large = struct.unpack_from(">Q", extra)[0] if len(extra) >= 8 else None
        disk = struct.unpack_from(">Q", extra, 8)[0] if len(extra) >= 16 else None
        found.append((vm_state, large, disk, extra_size))
        position += SNAPSHOT_HEADER.size + extra_size + id_size + name_size
        position += -position % TABLE_ENTRY_ALIGNMENT
    return found


# -- upgrade --------------------------------------------------------------------------------
def _upgrade(image: Qcow2Image, report: _Progress) -> None:
    """qcow2_upgrade: v2 -> v3 (snapshot tables qemu wrote are v3-ready)."""
    report(0, 2)
    if any(extra < SNAPSHOT_V3_EXTRA for *_, extra in _snapshots(image)):
        raise AmendError("corefmt cannot upgrade an image whose internal snapshots lack the "
                         "extra data compat=1.1 requires (qemu-img amend can)")
    report(1, 2)
    header = image.header
    header.version = VERSION_3
    header.header_length = V3_HEADER_LENGTH
    header.extra_header = b""
    header.compression_type = COMPRESSION_ZLIB
    header.set_extension(EXT_FEATURE_TABLE, feature_table())
    _update_header(image)
    report(2, 2)


# -- refcount width -------------------------------------------------------------------------
def _stored_refcounts(refcounts: Refcounts, report: _Progress) -> dict[int, int]:
    """Every cluster's non-zero stored refcount (leaks included, as qemu copies them)."""
    counts: dict[int, int] = {}
    bits, per_block = refcounts.bits, refcounts.entries_per_block
    entries_per_chunk = SCAN_CHUNK * 8 // bits
    zero_chunk = bytes(SCAN_CHUNK)
    blocks = len(refcounts.table)
    for block_index in range(blocks):
        report(block_index, 2 * blocks)
        offset = refcounts.block_offset(block_index)
        if not offset:
            continue
        with refcounts.cache.get(offset) as handle:
            data = bytes(handle.data)
        base = block_index * per_block
        for chunk in range(0, len(data), SCAN_CHUNK):
            if data[chunk:chunk + SCAN_CHUNK] == zero_chunk:
                continue
            first = chunk * 8 // bits
            for index in range(first, first + entries_per_chunk):
                value = get_refcount(data, index, bits)
                if value:
                    counts[base + index] = value
    return counts


def change_refcount_order(image: Qcow2Image, bits: int, report: _Progress) -> None:
    """New refcount structures of ``bits``-wide entries, self-describing, past
    the end of the file; the header switches to them once they are durable,
    then the old table and blocks are freed."""
    image.flush_locked()  # stored refcounts complete on disk, nothing quarantined
    old = image.refcounts
    cs = image.cluster_size
    counts = _stored_refcounts(old, report)
    max_refcount = (1 << bits) - 1
    for cluster in sorted(counts):
        if counts[cluster] > max_refcount:
            raise AmendError(f"Cannot decrease refcount entry width to {bits} bits: Cluster "
                             f"at offset {cluster * cs:#x} has a refcount of {counts[cluster]}")
    per_block = cs * 8 // bits
    used = {cluster // per_block for cluster in counts}
    start = max(old.high_water, div_round_up(image.storage.size(), cs))
    blocks: list[int] = []
    table_clusters = 0
    while True:
        end = start + len(blocks) + table_clusters
        wanted = sorted(used | {cluster // per_block for cluster in range(start, end)})
        wanted_table = div_round_up((wanted[-1] + 1) * ENTRY.size, cs)
        if (wanted, wanted_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = wanted, wanted_table
    table_offset = (start + len(blocks)) * cs
    table = [0] * (table_clusters * cs // ENTRY.size)
    contents = {block_index: bytearray(cs) for block_index in blocks}
    for position, block_index in enumerate(blocks):
        table[block_index] = (start + position) * cs
    for cluster in range(start, start + len(blocks) + table_clusters):
        counts[cluster] = 1
    for cluster, value in counts.items():
        block_index, index = divmod(cluster, per_block)
        set_refcount(contents[block_index], index, bits, value)
    for position, block_index in enumerate(blocks):
        report(len(old.table) + position * len(old.table) // max(len(blocks), 1),
               2 * len(old.table))
        image.storage.write((start + position) * cs, contents[block_index])
    image.storage.write(table_offset, b"".join(ENTRY.pack(value) for value in table))
    image.storage.flush()
    header = image.header
    old_table = (old.table_offset, old.table_clusters)
    old_blocks = [offset for offset in (old.block_offset(index) for index in range(len(old.table)))
                  if offset]
    header.refcount_order = bits.bit_length() - 1
    header.refcount_table_offset, header.refcount_table_clusters = table_offset, table_clusters
    _update_header(image)  # flushed: from here on the new structures are the image's
    image.refcounts = new = Refcounts(
        image.storage, image.context.path, cs, bits, table_offset, table_clusters,
        old.cache.capacity, image.context.emit, image._set_refcount_table)
    new.free(*old_table)
    for offset in old_blocks:
        new.free(offset, 1)
    image.flush_locked()
    report(2 * len(old.table), 2 * len(old.table))


# -- downgrade ------------------------------------------------------------------------------
def _downgrade(image: Qcow2Image, report: _Progress) -> None:
    """qcow2_downgrade to version 2."""
    header = image.header
    if header.refcount_order != V2_REFCOUNT_ORDER:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if image.has_data_file or header.extension(EXT_DATA_FILE) is not None:
        raise AmendError("Cannot downgrade an image with a data file")
    snapshots = _snapshots(image)
    for vm_state, large, disk, _extra in snapshots:
        state = large if large is not None else vm_state
        if state > UINT32_MAX or (disk if disk is not None else header.size) != header.size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    _mark_clean(image)
    incompatible = header.incompatible_features & ~INCOMPAT_COMPRESSION
    if incompatible:
        raise AmendError(f"Cannot downgrade an image with incompatible features "
                         f"{incompatible:#x} set")
    if snapshots:
        raise AmendError("corefmt cannot downgrade an image with internal snapshots (their "
                         "L2 tables are not rewritten; qemu-img amend can)")
    # No lazy refcounts from here on: what the expansion allocates is ordered
    # on disk and the dirty bit stays clear.
    image.lazy = False
    expand_zero_clusters(image, report)
    if header.incompatible_features & INCOMPAT_COMPRESSION:
        if _has_compressed_clusters(image):
            raise AmendError("Cannot downgrade an image with zstd compression type and "
                             "existing compressed clusters")
        header.incompatible_features &= ~INCOMPAT_COMPRESSION
        header.compression_type = COMPRESSION_ZLIB
    image.flush_locked()  # no zero flag left on disk before the header says v2
    header.compatible_features = 0
    header.autoclear_features = 0
    image.data_file_raw = False
    header.version = VERSION_2
    header.header_length = V2_HEADER_LENGTH
    header.refcount_order = V2_REFCOUNT_ORDER
    header.extra_header = b""
    header.set_extension(EXT_FEATURE_TABLE, None)
    _update_header(image)


def _l2_entries(image: Qcow2Image, table: int) -> list[int]:
    with image.l2_cache.get(table) as handle:
        return [value for (value,) in ENTRY.iter_unpack(bytes(handle.data))]


def expand_zero_clusters(image: Qcow2Image, report: _Progress) -> None:
    """qcow2_expand_zero_clusters on the active L1 table (no subclusters here:
    extended L2 images are refused before). Per L2 table: new clusters'
    refcounts, then the zeroed data, are durable before the table changes."""
    cs = image.cluster_size
    backed = image.backing is not None
    total = len(image.l1)
    for l1_index in range(total):
        table = image.l2_table_offset(l1_index)
        changes: list[tuple[int, int]] = []
        zeroed: list[int] = []
        for index, entry in enumerate(_l2_entries(image, table) if table else ()):
            if entry & OFLAG_COMPRESSED or not entry & OFLAG_ZERO:
                continue
            host = entry & OFFSET_MASK
            if not host and not backed:  # reads as zeros either way: deallocated
                changes.append((index, 0))
                continue
            if not host:
                host = image.refcounts.allocate(1)
            zeroed.append(host)
            changes.append((index, host | OFLAG_COPIED))
        if changes:
            image.refcounts.cache.flush(storage=True)
            for host in zeroed:
                image.storage.write_zeroes(host, cs)
            image.storage.flush()
            writable = image.writable_l2(l1_index)
            with image.l2_cache.get(writable) as handle:
                for index, entry in changes:
                    image.set_entry(handle, index, entry, None)
        report(l1_index + 1, total)


def _has_compressed_clusters(image: Qcow2Image) -> bool:
    for l1_index in range(len(image.l1)):
        table = image.l2_table_offset(l1_index)
        if table and any(entry & OFLAG_COMPRESSED for entry in _l2_entries(image, table)):
            return True
    return False


__all__ = ["AmendError", "amend", "change_refcount_order",
           "expand_zero_clusters"]

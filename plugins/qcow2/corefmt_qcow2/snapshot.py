"""Internal snapshots: create, apply (qemu's "goto"), delete, and loading one
read-only, in qemu 7.2's crash-safe order (block/qcow2-snapshot.c).

A snapshot is a copy of the active L1 table. Sharing its L2 tables and data
clusters is counted in their refcounts: every cluster reachable from an L1
table holds one reference per L1 table that reaches it, and an entry keeps
its COPIED flag only while its refcount is exactly 1 (the write path copies
anything without it first).

Ordering (a crash at any point leaves leaked clusters at worst, never a
cluster referenced more often than it is counted):

- create: flush; raise the refcount of every L2 table and data cluster the
  active L1 reaches (clearing COPIED where they became shared, the L2
  tables written only after the refcounts); copy the L1 to new clusters;
  write the new snapshot table to new clusters; flush; point the header at
  it (nb_snapshots and snapshots_offset in one write, flushed); free the old
  table.
- apply: resize to the snapshot's disk size if it differs; count the
  snapshot's clusters once more; flush; overwrite the active L1 in place;
  count the old active tree down; fix COPIED flags; flush.
- delete: write the table without the entry (as create does); only then
  count the snapshot's tree and L1 down; fix COPIED flags; flush.

Every table an operation will walk is checked first (offsets aligned and
inside the file, no refcount overflow), so a refusal changes nothing.
"""

from __future__ import annotations

import errno
import time
from collections import Counter
from typing import TYPE_CHECKING

from corefmt import OptionError, ReadOnlyError, SnapshotError, SnapshotInfo
from corefmt_qcow2 import events
from corefmt_qcow2.layout import (
    ENTRY,
    MAX_SNAPSHOTS,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    div_round_up,
)
from corefmt_qcow2.snapshot_table import (
    HEADER_SNAPSHOT_FIELDS,
    HEADER_SNAPSHOT_FIELDS_OFFSET,
    MAX_NAME_BYTES,
    NO_ICOUNT,
    SnapshotEntry,
    check_l1,
    pack_table,
    read_table,
)

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

NANOSECONDS, MICROSECONDS = 1_000_000_000, 1000
#: Per-cluster reference changes (qemu's addend): one more, one less, none
#: (only the COPIED flags are brought up to date).
INCREMENT, DECREMENT, FLAGS_ONLY = 1, -1, 0


class SnapshotTable:
    """An image's snapshot table as read at open (qemu reads it there too,
    and refuses the image if it is broken)."""

    def __init__(self, image: Qcow2Image):
        header = image.header
        self.entries: list[SnapshotEntry] = []
        self.size = 0
        if header.nb_snapshots:
            self.entries, self.size = read_table(
                image.storage, image.context.path, header.snapshots_offset,
                header.nb_snapshots, header.size)

    def find(self, ident: str | None, name: str | None) -> SnapshotEntry | None:
        """qemu's find_snapshot_by_id_and_name (either may be None)."""
        for entry in self.entries:
            if ((ident is None or _same(entry.id, ident))
                    and (name is None or _same(entry.name, name))):
                return entry
        return None

    def find_id_or_name(self, id_or_name: str) -> SnapshotEntry | None:
        """The entry with this id, else the first with this name."""
        return self.find(id_or_name, None) or self.find(None, id_or_name)

    def next_id(self) -> bytes:
        """qemu's find_new_snapshot_id: one more than the largest number an id starts with."""
        largest = max((_strtoul(entry.id_text) for entry in self.entries), default=0)
        return str((largest + 1) % (1 << 64)).encode()


def _same(stored: bytes, wanted: str) -> bool:
    return stored.split(b"\0", 1)[0] == wanted.encode("utf-8", "surrogateescape")


def _strtoul(text: str) -> int:
    """C's strtoul(text, NULL, 10) on a 64-bit system."""
    text = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if text[:1] in ("+", "-"):
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    digits = len(text) - len(text.lstrip("0123456789"))
    if not digits:
        return 0
    value = min(int(text[:digits]), (1 << 64) - 1)
    return value if sign > 0 else (-value) % (1 << 64)


# -- listing ------------------------------------------------------------------------------
def info_of(entry: SnapshotEntry) -> SnapshotInfo:
    return SnapshotInfo(id=entry.id_text, name=entry.name_text,
                        vm_state_size=entry.vm_state_size, date_sec=entry.date_sec,
                        date_nsec=entry.date_nsec, vm_clock_nsec=entry.vm_clock_nsec,
                        icount=None if entry.icount == NO_ICOUNT else entry.icount,
                        disk_size=entry.disk_size)


def snapshot_list(image: Qcow2Image) -> list[SnapshotInfo]:
    """The snapshots; none with an external data file (qemu: -ENOTSUP, which
    qemu-img shows as no snapshots)."""
    if image.has_data_file:
        return []
    return [info_of(entry) for entry in image.snapshots.entries]


# -- the operations -----------------------------------------------------------------------
def _writable(image: Qcow2Image) -> None:
    if image.context.read_only:
        raise ReadOnlyError(f"{image.context.path}: image is opened read-only")
    image._check_writable()
    if image.lazy:
        # Lazy refcounts order no refcount write before the L2 and L1 changes
        # that need it: the dirty bit makes a crash in between rebuild them
        # (found by corefmt stress -o lazy_refcounts=on, seed 22).
        image._mark_dirty()


def create(image: Qcow2Image, name: str) -> SnapshotInfo:
    """A new snapshot of the active state (the caller holds the image lock)."""
    _writable(image)
    table = image.snapshots
    if len(table.entries) >= MAX_SNAPSHOTS:
        raise SnapshotError(errno.EFBIG)
    if image.has_data_file:
        raise SnapshotError(errno.ENOTSUP)
    l1 = list(image.l1)
    _check_tree(image, l1, INCREMENT)
    image.flush_locked()
    now = time.time_ns()
    entry = SnapshotEntry(0, len(l1), table.next_id(),
                          name.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES],
                          date_sec=now // NANOSECONDS,
                          date_nsec=now % NANOSECONDS // MICROSECONDS * MICROSECONDS,
                          disk_size=image.virtual_size, icount=0)
    if _update_refcounts(image, l1, INCREMENT):
        _write_active_l1(image, l1)
    if l1:
        entry.l1_table_offset = image.refcounts.allocate(
            div_round_up(entry.l1_bytes, image.cluster_size))
        image.storage.write(entry.l1_table_offset, _pack_l1(l1))
    _write_table(image, [*table.entries, entry])
    return info_of(entry)


def apply(image: Qcow2Image, id_or_name: str) -> None:
    """Make a snapshot the active state (qemu's qcow2_snapshot_goto)."""
    _writable(image)
    if image.has_data_file:
        raise SnapshotError(errno.ENOTSUP)
    entry = image.snapshots.find_id_or_name(id_or_name)
    if entry is None:
        raise SnapshotError(errno.ENOENT)
    problem = check_l1(entry, image.cluster_size, image.storage.size())
    if problem:
        raise SnapshotError(errno.EFBIG if "large" in problem else errno.EINVAL, problem)
    snapshot_l1 = _read_l1(image, entry)
    _check_tree(image, snapshot_l1, INCREMENT)
    if entry.disk_size != image.virtual_size:
        from corefmt_qcow2.resize import L1TooLarge, resize

        try:
            resize(image, entry.disk_size)
        except L1TooLarge as error:  # a hostile disk_size: qemu's -EFBIG
            raise SnapshotError(error.code, str(error)) from None
        except OptionError as error:  # qemu: blk_truncate's error, then -ENOTSUP
            raise SnapshotError(errno.ENOTSUP, str(error)) from None
    if entry.l1_size > len(image.l1):
        image.grow_l1(entry.l1_size)
    new_l1 = snapshot_l1 + [0] * (len(image.l1) - len(snapshot_l1))
    _update_refcounts(image, new_l1, INCREMENT)
    image.flush_locked()  # the new references are counted before the L1 names them
    old_l1 = list(image.l1)
    _write_active_l1(image, new_l1)
    _update_refcounts(image, old_l1, DECREMENT)
    _fix_flags(image)
    image.flush_locked()


def delete(image: Qcow2Image, id_or_name: str) -> None:
    """Remove the snapshot with this id, else the first with this name
    (qemu-img's bdrv_snapshot_find, then qcow2_snapshot_delete)."""
    _writable(image)
    if image.has_data_file:
        raise SnapshotError(errno.ENOTSUP)
    entry = image.snapshots.find_id_or_name(id_or_name)
    if entry is None:
        raise SnapshotError(errno.ENOENT, "Can't find the snapshot")
    problem = check_l1(entry, image.cluster_size, image.storage.size())
    if problem:
        raise SnapshotError(errno.EFBIG if "large" in problem else errno.EINVAL, problem)
    snapshot_l1 = _read_l1(image, entry)
    _check_tree(image, snapshot_l1, DECREMENT)
    image.flush_locked()
    _write_table(image, [other for other in image.snapshots.entries if other is not entry])
    # Nothing names the snapshot on disk any more: its references go.
    _update_refcounts(image, snapshot_l1, DECREMENT)
    if entry.l1_size:
        image.refcounts.free(entry.l1_table_offset,
                             div_round_up(entry.l1_bytes, image.cluster_size))
    _fix_flags(image)
    image.flush_locked()


def load(image: Qcow2Image, ident: str | None, name: str | None) -> None:
    """Show a snapshot instead of the active state, on a read-only open
    (qemu's qcow2_snapshot_load_tmp)."""
    if not image.context.read_only:
        raise SnapshotError(errno.EINVAL, "Device is not readonly")
    entry = image.snapshots.find(ident, name)
    if entry is None:
        raise SnapshotError(errno.ENOENT, "Can't find snapshot")
    problem = check_l1(entry, image.cluster_size, image.storage.size())
    if problem:
        raise SnapshotError(errno.EFBIG if "large" in problem else errno.EINVAL, problem)
    image.show_l1(entry.l1_table_offset, _read_l1(image, entry))


# -- tables --------------------------------------------------------------------------------
def _read_l1(image: Qcow2Image, entry: SnapshotEntry) -> list[int]:
    raw = image.storage.read(entry.l1_table_offset, entry.l1_bytes)
    return [value for (value,) in ENTRY.iter_unpack(raw)]


def _pack_l1(l1: list[int]) -> bytes:
    return b"".join(ENTRY.pack(value) for value in l1)


def _write_active_l1(image: Qcow2Image, l1: list[int]) -> None:
    """The whole active L1 in place, durably (qemu's bdrv_pwrite_sync)."""
    image.context.emit(events.L1_UPDATE)
    image.storage.write(image.header.l1_table_offset, _pack_l1(l1))
    image.storage.flush()
    image.replace_l1(l1)


def _write_table(image: Qcow2Image, entries: list[SnapshotEntry]) -> None:
    """qemu's qcow2_write_snapshots: the table to new clusters, flushed with
    every refcount before the header points at it; the old one freed after."""
    cs = image.cluster_size
    raw = pack_table(entries)
    offset = image.refcounts.allocate(div_round_up(len(raw), cs)) if raw else 0
    image.flush_locked()
    if raw:
        image.context.emit(events.SNAPSHOT_TABLE_WRITE)
        image.storage.write(offset, raw)
    image.storage.flush()
    image.context.emit(events.HEADER_UPDATE)
    image.storage.write(HEADER_SNAPSHOT_FIELDS_OFFSET,
                        HEADER_SNAPSHOT_FIELDS.pack(len(entries), offset))
    image.storage.flush()
    header, table = image.header, image.snapshots
    old_offset, old_size = header.snapshots_offset, table.size
    old_count = header.nb_snapshots
    header.nb_snapshots, header.snapshots_offset = len(entries), offset
    table.entries, table.size = entries, len(raw)
    image.metadata_moved()
    if old_count and old_size:
        image.refcounts.free(old_offset, div_round_up(old_size, cs))


# -- refcounts ------------------------------------------------------------------------------
def _host_clusters(image: Qcow2Image, entry: int) -> range:
    """The host clusters an L2 entry holds a reference to (none: empty)."""
    cs = image.cluster_size
    if entry & OFLAG_COMPRESSED:
        start, length = image.compressed.locate(entry)
        return range(start // cs, (start + length - 1) // cs + 1)
    host = entry & OFFSET_MASK
    return range(host // cs, host // cs + 1) if host else range(0)


def _check_tree(image: Qcow2Image, l1: list[int], addend: int) -> None:
    """Refuse, before anything changes, a tree whose tables or clusters lie
    outside the file, or whose refcounts an increment would overflow."""
    cs, file_size = image.cluster_size, image.storage.size()
    file_clusters = div_round_up(file_size, cs)
    refcounts = image.refcounts
    counts: Counter[int] = Counter()
    for l1_index, l1_entry in enumerate(l1):
        table = l1_entry & OFFSET_MASK
        if not table:
            continue
        if table % cs:
            raise _corrupt(f"L2 table offset {table:#x} unaligned (L1 index: {l1_index:#x})")
        if table + cs > file_size:
            raise _corrupt(f"L2 table offset {table:#x} past the end of the file "
                           f"(L1 index: {l1_index:#x})")
        counts[table // cs] += 1
        with image.l2_cache.get(table) as handle:
            entries = [image._read_entries(handle.data, index)[0]
                       for index in range(image.l2_entries)]
        for l2_index, entry in enumerate(entries):
            host = entry & OFFSET_MASK
            if not entry & OFLAG_COMPRESSED and host % cs:
                raise _corrupt(f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                               f"{table:#x}, L2 index: {l2_index:#x})")
            clusters = _host_clusters(image, entry)
            if clusters and clusters.stop > file_clusters:
                raise _corrupt(f"Cluster allocation offset {host:#x} past the end of the "
                               f"file (L2 offset: {table:#x}, L2 index: {l2_index:#x})")
            if addend == INCREMENT:
                counts.update(clusters)
    if addend == INCREMENT:
        for cluster, more in counts.items():
            if refcounts.get(cluster) + more > refcounts.max_refcount:
                raise SnapshotError(errno.EINVAL)  # qemu-img says no more than that


def _corrupt(problem: str) -> SnapshotError:
    return SnapshotError(errno.EIO, problem)


def _change(image: Qcow2Image, cluster: int, addend: int) -> int:
    """Add ``addend`` to a cluster's refcount (0: just read it); the new
    count. A cluster that reaches 0 waits in quarantine for the next flush."""
    refcounts = image.refcounts
    if addend == FLAGS_ONLY:
        return refcounts.get(cluster)
    value = refcounts.update(cluster, addend)
    if value == 0:
        refcounts.quarantine.add(cluster)
    return value


def _flagged(entry: int, refcount: int) -> int:
    return entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED


def _update_refcounts(image: Qcow2Image, l1: list[int], addend: int) -> bool:
    """qemu's qcow2_update_snapshot_refcount over ``l1`` (changed in place:
    COPIED flags); whether ``l1`` changed. A changed L2 entry is written
    back only after the refcounts it follows from."""
    cs = image.cluster_size
    l1_changed = False
    for l1_index, l1_entry in enumerate(l1):
        table = l1_entry & OFFSET_MASK
        if not table:
            continue
        with image.l2_cache.get(table) as handle:
            for index in range(image.l2_entries):
                entry, bitmap = image._read_entries(handle.data, index)
                clusters = _host_clusters(image, entry)
                if not clusters:
                    continue
                if entry & OFLAG_COMPRESSED:  # never COPIED: only counted
                    for cluster in clusters:
                        _change(image, cluster, addend)
                    continue
                refcount = _change(image, clusters[0], addend)
                new_entry = _flagged(entry, refcount)
                if new_entry != entry:
                    image.l2_cache.depends_on(image.refcounts.cache)
                    image.set_entry(handle, index, new_entry, bitmap)
        refcount = _change(image, table // cs, addend)
        if refcount == 0:  # freed: a reuse of the cluster must not meet the old table
            image.l2_cache.forget(table)
        new_l1_entry = _flagged(l1_entry, refcount)
        if new_l1_entry != l1_entry:
            l1[l1_index] = new_l1_entry
            l1_changed = True
    return l1_changed


def _fix_flags(image: Qcow2Image) -> None:
    """COPIED on the active tree as its refcounts now say."""
    l1 = list(image.l1)
    if _update_refcounts(image, l1, FLAGS_ONLY):
        image.flush_locked()  # the L2 flags (and the refcounts they follow) first
        _write_active_l1(image, l1)

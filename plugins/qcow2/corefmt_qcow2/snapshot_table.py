"""qcow2's snapshot table (qcow2.txt "Snapshot table"): entries read and
written as the spec lays them out, checked as qemu 7.2 checks them at open.

An entry is a fixed 40-byte part, extra data (version 3 needs at least the
64-bit VM state size and the virtual disk size; qemu 7.2 adds the icount),
the id and the name, padded to 8 bytes. Extra data this driver does not
know is kept and written back unchanged, as qemu keeps it.
"""

from __future__ import annotations

import struct

import attrs

from corefmt import ImageError, Storage
from corefmt_qcow2.layout import (
    ENTRY,
    MAX_L1_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_HEADER,
    TABLE_ENTRY_ALIGNMENT,
    align_up,
)

#: qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE.
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS
#: The extra data fields, in order, and where each ends.
EXTRA_FIELDS = struct.Struct(">QQQ")
VM_STATE_END, DISK_SIZE_END, ICOUNT_END = 8, 16, 24
#: icount when the entry has none (qemu's -1ULL).
NO_ICOUNT = (1 << 64) - 1
#: The 32-bit VM state size field; a larger state is only in the extra data.
MAX_VM_STATE_32 = 0xFFFFFFFF
#: id and name sizes are 16-bit fields; qemu-img keeps names in 256-byte
#: buffers (a longer name is cut to 255 bytes), ids in 128-byte ones.
MAX_NAME_BYTES = 255
#: The header's nb_snapshots (4 bytes) and snapshots_offset (8), rewritten together.
HEADER_SNAPSHOT_FIELDS_OFFSET = 60
HEADER_SNAPSHOT_FIELDS = struct.Struct(">IQ")


@attrs.define
class SnapshotEntry:
    """One snapshot table entry (id and name as stored: bytes)."""

    l1_table_offset: int
    l1_size: int
    id: bytes
    name: bytes
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    #: The disk's size when the snapshot was taken (from the extra data, or
    #: the image's size for entries without it, as qemu assumes).
    disk_size: int = 0
    icount: int = NO_ICOUNT
    #: Extra data bytes past the fields above, kept as they are.
    unknown_extra: bytes = b""
    #: extra_data_size as stored (0 for a new entry: it gets every known field).
    extra_data_size: int = 0

    @property
    def id_text(self) -> str:
        return _c_string(self.id)

    @property
    def name_text(self) -> str:
        return _c_string(self.name)

    @property
    def l1_bytes(self) -> int:
        return self.l1_size * ENTRY.size

    def pack(self) -> bytes:
        """The entry as qemu writes it: all known extra fields, then the
        unknown ones, id, name (the caller pads to 8 bytes)."""
        extra = EXTRA_FIELDS.pack(self.vm_state_size, self.disk_size, self.icount)
        extra += self.unknown_extra
        vm_state_32 = self.vm_state_size if self.vm_state_size <= MAX_VM_STATE_32 else 0
        fixed = SNAPSHOT_HEADER.pack(self.l1_table_offset, self.l1_size, len(self.id),
                                     len(self.name), self.date_sec, self.date_nsec,
                                     self.vm_clock_nsec, vm_state_32, len(extra))
        return fixed + extra + self.id + self.name

    @classmethod
    def unpack(cls, raw: bytes, disk_size: int) -> tuple[SnapshotEntry, int]:
        """The entry at the start of ``raw`` and its length (unpadded);
        ``raw`` must hold all of it (see ``entry_length``)."""
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
         vm_state, extra_size) = SNAPSHOT_HEADER.unpack_from(raw)
        position = SNAPSHOT_HEADER.size
        extra = raw[position:position + extra_size]
        known = extra[:EXTRA_FIELDS.size] + bytes(max(0, EXTRA_FIELDS.size - extra_size))
        vm_large, extra_disk, icount = EXTRA_FIELDS.unpack(known)
        entry = cls(l1_offset, l1_size, b"", b"", date_sec, date_nsec, vm_clock,
                    vm_large if extra_size >= VM_STATE_END else vm_state,
                    extra_disk if extra_size >= DISK_SIZE_END else disk_size,
                    icount if extra_size >= ICOUNT_END else NO_ICOUNT,
                    bytes(extra[EXTRA_FIELDS.size:]), extra_size)
        position += extra_size
        entry.id = bytes(raw[position:position + id_size])
        position += id_size
        entry.name = bytes(raw[position:position + name_size])
        return entry, position + name_size


def entry_length(fixed: bytes) -> tuple[int, int]:
    """(extra data size, whole unpadded length) from an entry's fixed part."""
    (_l1, _size, id_size, name_size, _d, _n, _c, _v,
     extra_size) = SNAPSHOT_HEADER.unpack_from(fixed)
    return extra_size, SNAPSHOT_HEADER.size + extra_size + id_size + name_size


def _c_string(raw: bytes) -> str:
    """What qemu shows of a stored id or name: up to the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def read_table(storage: Storage, path: str | None, offset: int, count: int,
               disk_size: int) -> tuple[list[SnapshotEntry], int]:
    """The entries and the table's length in bytes (qemu's
    qcow2_read_snapshots: too much extra data or a table past 64 MiB are
    refused; so is one that runs past the end of the file)."""
    entries: list[SnapshotEntry] = []
    file_size = storage.size()
    position = offset
    for index in range(count):
        position = align_up(position, TABLE_ENTRY_ALIGNMENT)
        fixed = storage.read(position, SNAPSHOT_HEADER.size)
        if len(fixed) < SNAPSHOT_HEADER.size:
            raise _past_end(path, position, index)
        extra_size, length = entry_length(fixed)
        if extra_size > MAX_EXTRA_DATA:
            raise ImageError(path, "snapshot table", position, "Too much extra metadata in "
                             f"snapshot table entry {index}")
        if position + length - offset > MAX_TABLE_BYTES:
            raise ImageError(path, "snapshot table", offset, "Snapshot table is too big")
        if position + length > file_size:
            raise _past_end(path, position, index)
        entry, length = SnapshotEntry.unpack(storage.read(position, length), disk_size)
        entries.append(entry)
        position += length
    return entries, position - offset


def _past_end(path: str | None, position: int, index: int) -> ImageError:
    return ImageError(path, "snapshot table", position,
                      f"snapshot table entry {index} lies past the end of the file")


def pack_table(entries: list[SnapshotEntry]) -> bytes:
    """The whole table, each entry padded to 8 bytes (the last one too is
    counted unpadded, as qemu counts the table's size)."""
    table = bytearray()
    for entry in entries:
        table += bytes(align_up(len(table), TABLE_ENTRY_ALIGNMENT) - len(table))
        table += entry.pack()
    return bytes(table)


def check_l1(entry: SnapshotEntry, cluster_size: int, file_size: int) -> str | None:
    """qemu's qcow2_validate_table for a snapshot's L1 table (and that it
    lies inside the file); the problem, or None."""
    if entry.l1_size > MAX_L1_BYTES // ENTRY.size:
        return "Snapshot L1 table too large"
    if entry.l1_table_offset % cluster_size:
        return "Snapshot L1 table offset invalid"
    if entry.l1_size and (entry.l1_table_offset == 0
                          or entry.l1_table_offset + entry.l1_bytes > file_size):
        return "Snapshot L1 table offset invalid (past the end of the file)"
    return None

"""qemu-img check for qcow2, as qemu 7.2's block/qcow2-refcount.c does it:
every reference the image holds is counted again from the tables (an
in-memory refcount table), and compared with the refcounts it stores.

References: the header cluster, the active L1 table, each L2 table and the
clusters its entries use (compressed clusters count every cluster their
sectors touch; an external data file's clusters are not refcounted), each
snapshot's L1 and L2 tables and the snapshot table, the refcount table and
each refcount block, and the bitmap directory, tables and data while the
bitmaps extension is valid. The messages are qemu-img 7.2's.

Repair works as qemu's does: leaked clusters are counted down
(``-r leaks``); refcounts lower than the references are raised, wrong
COPIED flags rewritten and unaligned preallocated zero clusters made plain
zero clusters (``-r all``). A refcount of 0 for a used cluster, or a
refcount table entry that cannot be right, has the whole refcount structure
rebuilt from the in-memory table (``-r all``; ``-r leaks`` fails then, as
qemu's does). The caller checks again.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from corefmt import CheckFix, CheckResult, CorefmtError
from corefmt_qcow2.layout import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIRECTORY_ENTRY,
    BITMAPS_EXTENSION,
    COMPRESSED_SECTOR,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_L1_BYTES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SNAPSHOT_HEADER,
    TABLE_ENTRY_ALIGNMENT,
    div_round_up,
)
from corefmt_qcow2.refcount import get_refcount, set_refcount

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

# qemu's masks (block/qcow2.h).
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
BITMAP_ALL_ALLOC = 0xFFFFFFFF
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
#: Where the header keeps refcount_table_offset (8 bytes) and _clusters (4).
HEADER_REFTABLE_FIELDS = 48

QWORD = struct.Struct(">Q")


class CheckFailed(CorefmtError):
    """The check could not be completed (qemu-img: "Check failed: ...",
    exit status 1): ``check_messages`` are what it printed before, and
    ``reports`` the errors to show (the last is this error's message)."""

    def __init__(self, code: int, messages: list[str], reports: list[str] | None = None):
        self.reports = [*(reports or []), f"Check failed: {os.strerror(code)}"]
        super().__init__(self.reports[-1])
        self.code = code
        self.check_messages = list(messages)


class _Failed(Exception):
    """qemu's ``return -errno`` out of the check (``report``: its error_report)."""

    def __init__(self, code: int, report: str | None = None):
        super().__init__(code)
        self.code = code
        self.report = report


#: qemu's names of the metadata a write must not overlap (qcow2_check_metadata_overlap).
OVERLAP_NAMES = ("qcow2_header", "active L1 table", "refcount table", "snapshot table",
                 "inactive L1 table", "active L2 table", "refcount block", "bitmap directory")
#: After a fatal corruption, qemu's image has no driver any more (bs->drv = NULL):
#: the next check fails with ENOMEDIUM. Set on the image by this module.
DRIVER_GONE = "_check_driver_gone"


def _c_hex(value: int) -> str:
    """C's %#x (0 is "0")."""
    return f"{value:#x}" if value else "0"


def check_image(image: Qcow2Image, fix: CheckFix) -> CheckResult:
    """Check (and with ``fix``, repair) an image; the caller holds its lock
    (qemu's qcow2_co_check_locked)."""
    result = CheckResult()
    if getattr(image, DRIVER_GONE, False):
        raise CheckFailed(errno.ENOMEDIUM, [])
    try:
        _Checker(image, fix, result).check_refcounts()
    except _Failed as failure:
        _finish_writes(image)
        raise CheckFailed(failure.code, result.messages,
                          [failure.report] if failure.report else None) from None
    _finish_writes(image)
    if fix != CheckFix.NONE and not result.check_errors and not result.corruptions:
        header = image.header
        if header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
            header.incompatible_features &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
            image.write_header()
        image.corrupt = False
    # qemu-img check --output=json leaves out the counters that are 0.
    for name in ("total_clusters", "allocated_clusters", "fragmented_clusters",
                 "compressed_clusters", "image_end_offset"):
        if not getattr(result, name):
            setattr(result, name, None)
    return result


def _finish_writes(image: Qcow2Image) -> None:
    if not image.context.read_only:
        image.flush_locked()


class _Checker:
    def __init__(self, image: Qcow2Image, fix: CheckFix, result: CheckResult):
        self.image = image
        self.fix = fix
        self.res = result
        self.storage = image.storage
        self.cs = image.cluster_size
        self.refcounts = image.refcounts
        self.bits = self.refcounts.bits
        self.refcount_max = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.extended = image.extended
        self.entry_size = 16 if self.extended else 8
        self.l2_size = self.cs // self.entry_size
        self.data_file = image.has_data_file
        compressed = image.compressed
        self.csize_shift = compressed.offset_bits
        self.cluster_offset_mask = compressed.offset_mask
        self.csize_mask = compressed.sectors_mask
        #: The in-memory refcount table (qemu's IMRT) and its size in clusters.
        self.imrt: list[int] = []
        self.nb_clusters = 0
        self.signaled_corruption = False

    # -- helpers --------------------------------------------------------------------
    def say(self, message: str) -> None:
        self.res.messages.append(message)

    def file_length(self) -> int:
        return self.storage.size()

    def read(self, offset: int, length: int) -> bytes:
        data = self.storage.read(offset, length)
        return data + bytes(length - len(data))

    def imrt_get(self, cluster: int) -> int:
        return self.imrt[cluster] if cluster < len(self.imrt) else 0

    def imrt_set(self, cluster: int, value: int) -> None:
        if cluster >= len(self.imrt):
            self.imrt.extend([0] * (cluster + 1 - len(self.imrt)))
        self.imrt[cluster] = value

    def realloc(self, new_size: int) -> None:
        self.nb_clusters = new_size
        if len(self.imrt) > new_size:
            del self.imrt[new_size:]

    def stored_refcount(self, cluster: int) -> int:
        """qcow2_get_refcount: 0 past the refcount table or without a block."""
        table = self.refcounts.table
        block_index, index = divmod(cluster, self.per_block)
        if block_index >= len(table):
            return 0
        offset = table[block_index] & REFT_OFFSET_MASK
        if not offset:
            return 0
        if offset % self.cs:
            self.signal_corruption(f"Refblock offset {offset:#x} unaligned (reftable index: "
                                   f"{_c_hex(block_index)})")
            raise _Failed(errno.EIO)
        if offset >= self.file_length():
            return 0  # reads past the end of the file are zeros
        with self.refcounts.cache.get(offset) as handle:
            return get_refcount(handle.data, index, self.bits)

    def signal_corruption(self, message: str) -> None:
        """qcow2_signal_corruption: once; an image open for writing is marked corrupt."""
        if self.signaled_corruption:
            return
        self.signaled_corruption = True
        if self.image.context.read_only:
            self.say(f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                     "events will be suppressed")
            return
        self.say(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                 "will be suppressed")
        self.image.corrupt = True
        self.image.header.incompatible_features |= INCOMPAT_CORRUPT
        self.image.write_header()
        setattr(self.image, DRIVER_GONE, True)

    def overlap_check(self, offset: int, size: int, ignore: str = "") -> bool:
        """qcow2_pre_write_overlap_check (overlap-check=cached): whether the
        write may go ahead; if not, the image is marked corrupt."""
        name = self.overlapping(offset, size, ignore)
        if name is None:
            return True
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with {name})")
        return False

    def overlapping(self, offset: int, size: int, ignore: str) -> str | None:
        if not size:
            return None
        cs, header, image = self.cs, self.image.header, self.image
        if offset < cs:
            return OVERLAP_NAMES[0]
        size = div_round_up(offset % cs + size, cs) * cs
        offset -= offset % cs

        def hits(start: int, length: int) -> bool:
            return start < offset + size and offset < start + length

        snapshots, snapshots_size = self.snapshots()
        regions: list[tuple[str, list[tuple[int, int]]]] = [
            (OVERLAP_NAMES[1], [(header.l1_table_offset, header.l1_size * 8)]
             if header.l1_size else []),
            (OVERLAP_NAMES[2], [(self.refcounts.table_offset, len(self.refcounts.table) * 8)]),
            (OVERLAP_NAMES[3], [(header.snapshots_offset, snapshots_size)]
             if header.nb_snapshots else []),
            (OVERLAP_NAMES[4], [(l1_offset, l1_size * 8)
                                for _i, _n, l1_offset, l1_size in snapshots if l1_size]),
            (OVERLAP_NAMES[5], [(entry & L1E_OFFSET_MASK, cs) for entry in image.l1
                                if entry & L1E_OFFSET_MASK]),
            (OVERLAP_NAMES[6], [(entry & REFT_OFFSET_MASK, cs)
                                for entry in self.refcounts.table if entry & REFT_OFFSET_MASK]),
            (OVERLAP_NAMES[7], self.bitmap_directory()),
        ]
        for name, ranges in regions:
            if name != ignore and any(hits(start, length) for start, length in ranges):
                return name
        return None

    def bitmap_directory(self) -> list[tuple[int, int]]:
        header = self.image.header
        extension = header.extension(EXT_BITMAPS)
        if (extension is None or not header.autoclear_features & AUTOCLEAR_BITMAPS
                or len(extension.data) < BITMAPS_EXTENSION.size):
            return []
        count, _reserved, size, offset = BITMAPS_EXTENSION.unpack_from(extension.data)
        return [(offset, size)] if count else []

    def cluster_type(self, entry: int) -> str:
        """qcow2_get_cluster_type."""
        if entry & OFLAG_COMPRESSED:
            return "compressed"
        if entry & OFLAG_ZERO and not self.extended:
            return "zero_alloc" if entry & L2E_OFFSET_MASK else "zero_plain"
        if not entry & L2E_OFFSET_MASK:
            if self.data_file and entry & OFLAG_COPIED:
                return "normal"
            return "unallocated"
        return "normal"

    def l2_entries(self, data: bytes) -> list[tuple[int, int]]:
        if self.extended:
            return [struct.unpack_from(">QQ", data, index * 16) for index in range(self.l2_size)]
        return [(entry, 0) for (entry,) in QWORD.iter_unpack(data)]

    def write_l2_table(self, offset: int, data: bytes) -> None:
        """Write (part of) an L2 table past the L2 cache, which then forgets it."""
        self.image.l2_cache.flush(storage=True)
        self.storage.write(offset, data)
        self.storage.flush()
        self.image.l2_cache.forget(offset - offset % self.cs)

    # -- counting ---------------------------------------------------------------------
    def inc_refcounts(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt."""
        if size <= 0:
            return
        if offset + size - self.file_length() >= self.cs:
            self.say("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        for cluster in range(offset // self.cs, (offset + size - 1) // self.cs + 1):
            if cluster >= self.nb_clusters:
                self.realloc(cluster + 1)
            refcount = self.imrt_get(cluster)
            if refcount == self.refcount_max:
                self.say(f"ERROR: overflow cluster offset={cluster * self.cs:#x}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                self.res.corruptions += 1
                continue
            self.imrt_set(cluster, refcount + 1)

    def check_refcounts_l2(self, l2_offset: int, frag_info: bool, fix: CheckFix,
                           active: bool) -> None:
        res = self.res
        data = self.read(l2_offset, self.cs)
        next_contiguous = 0
        for index, (entry, bitmap) in enumerate(self.l2_entries(data)):
            kind = self.cluster_type(entry)
            if kind != "compressed" and entry & L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if kind == "compressed":
                if entry & OFLAG_COPIED:
                    self.say(f"ERROR: coffset={entry & self.cluster_offset_mask:#x}: copied "
                             "flag must never be set for compressed clusters")
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                if self.data_file:
                    self.say(f"ERROR compressed cluster {index} with data file, "
                             f"entry={entry:#x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.say(f"ERROR compressed cluster {index} with non-zero subcluster "
                             f"allocation bitmap, entry={entry:#x}")
                    res.corruptions += 1
                    continue
                coffset = entry & self.cluster_offset_mask
                sectors = (entry >> self.csize_shift & self.csize_mask) + 1
                csize = sectors * COMPRESSED_SECTOR - coffset % COMPRESSED_SECTOR
                self.inc_refcounts(coffset, csize)
                if frag_info:
                    res.allocated_clusters = (res.allocated_clusters or 0) + 1
                    res.compressed_clusters = (res.compressed_clusters or 0) + 1
                    res.fragmented_clusters = (res.fragmented_clusters or 0) + 1
            elif kind in ("normal", "zero_alloc"):
                offset = entry & L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.say(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                             "subcluster allocation bitmap")
                if offset % self.cs:
                    res.corruptions += 1
                    if self.extended:
                        contains_data = bool(bitmap & BITMAP_ALL_ALLOC)
                    else:
                        contains_data = not entry & OFLAG_ZERO
                    if not contains_data:
                        repair = bool(fix & CheckFix.ERRORS)
                        self.say(f"{'Repairing' if repair else 'ERROR'} offset={offset:x}: "
                                 "Preallocated cluster is not properly aligned; L2 entry "
                                 "corrupted.")
                        if repair:
                            self.fix_l2_entry_by_zero(l2_offset, index, bitmap, active)
                            continue
                    else:
                        self.say(f"ERROR offset={offset:x}: Data cluster is not properly "
                                 "aligned; L2 entry corrupted.")
                if frag_info:
                    res.allocated_clusters = (res.allocated_clusters or 0) + 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters = (res.fragmented_clusters or 0) + 1
                    next_contiguous = offset + self.cs
                if not self.data_file:
                    self.inc_refcounts(offset, self.cs)
            elif kind == "unallocated" and bitmap & BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def fix_l2_entry_by_zero(self, l2_offset: int, index: int, bitmap: int,
                             active: bool) -> None:
        """An unaligned preallocated zero cluster becomes a plain zero cluster."""
        if self.extended:
            bitmap |= bitmap << 32
            bitmap &= BITMAP_ALL_ALLOC << 32
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = QWORD.pack(OFLAG_ZERO)
        position = l2_offset + index * self.entry_size
        if not self.overlap_check(position, self.entry_size,
                                  OVERLAP_NAMES[5] if active else "inactive L2 table"):
            self.say("ERROR: Overlap check failed")
            self.res.check_errors += 1
            raise _Failed(errno.EIO)
        self.write_l2_table(position, data)
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1

    def check_refcounts_l1(self, l1_offset: int, l1_size: int, frag_info: bool,
                           fix: CheckFix, active: bool) -> None:
        if not l1_size:
            return
        self.inc_refcounts(l1_offset, l1_size * 8)
        l1 = [entry for (entry,) in QWORD.iter_unpack(self.read(l1_offset, l1_size * 8))]
        for entry in l1:
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc_refcounts(l2_offset, self.cs)
            if l2_offset % self.cs:
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 "
                         "entry corrupted")
                self.res.corruptions += 1
            self.check_refcounts_l2(l2_offset, frag_info, fix, active)

    def snapshots(self) -> tuple[list[tuple[str, str, int, int]], int]:
        """(id, name, L1 offset, L1 size) of each snapshot, and the table's size."""
        header = self.image.header
        found: list[tuple[str, str, int, int]] = []
        position = header.snapshots_offset
        for _ in range(header.nb_snapshots):
            raw = self.read(position, SNAPSHOT_HEADER.size)
            (l1_offset, l1_size, id_size, name_size, _date, _nsec, _clock, _vm_state,
             extra_size) = SNAPSHOT_HEADER.unpack(raw)
            position += SNAPSHOT_HEADER.size + extra_size
            ident = self.read(position, id_size).decode(errors="replace")
            position += id_size
            name = self.read(position, name_size).decode(errors="replace")
            position += name_size
            position += -position % TABLE_ENTRY_ALIGNMENT
            found.append((ident, name, l1_offset, l1_size))
        return found, position - header.snapshots_offset

    def count_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts, while the bitmaps extension is valid."""
        header = self.image.header
        extension = header.extension(EXT_BITMAPS)
        if extension is None or not header.autoclear_features & AUTOCLEAR_BITMAPS:
            return
        if len(extension.data) < BITMAPS_EXTENSION.size:
            return
        count, _reserved, directory_size, directory_offset = BITMAPS_EXTENSION.unpack_from(
            extension.data)
        if not count:
            return
        self.inc_refcounts(directory_offset, directory_size)
        directory = self.read(directory_offset, directory_size)
        position = 0
        for _ in range(count):
            if position + BITMAP_DIRECTORY_ENTRY.size > len(directory):
                self.res.corruptions += 1
                raise _Failed(errno.EINVAL)
            (table_offset, table_size, _flags, _type, _granularity, name_size,
             extra_size) = BITMAP_DIRECTORY_ENTRY.unpack_from(directory, position)
            position += BITMAP_DIRECTORY_ENTRY.size + extra_size + name_size
            position += -position % TABLE_ENTRY_ALIGNMENT
            self.inc_refcounts(table_offset, table_size * 8)
            table = self.read(table_offset, table_size * 8)
            for (entry,) in QWORD.iter_unpack(table):
                offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
                if (entry & BME_TABLE_ENTRY_RESERVED_MASK or offset % self.cs
                        or (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES and offset)):
                    self.res.corruptions += 1
                    continue
                if offset:
                    self.inc_refcounts(offset, self.cs)

    def check_refblocks(self, fix: CheckFix) -> bool:
        """Each refcount block counted once; whether the structure must be rebuilt."""
        rebuild = False
        res = self.res
        for index, entry in enumerate(self.refcounts.table):
            offset = entry & REFT_OFFSET_MASK
            cluster = offset // self.cs
            if entry & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {index} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset % self.cs:
                self.say(f"ERROR refcount block {index} is not cluster aligned; refcount "
                         "table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                repair = bool(fix & CheckFix.ERRORS)
                self.say(f"{'Repairing' if repair else 'ERROR'} refcount block {index} is "
                         "outside image")
                if repair:
                    self.storage.truncate(offset + self.cs)
                    new_size = div_round_up(self.file_length(), self.cs)
                    self.realloc(max(new_size, self.nb_clusters))
                    self.refcounts.high_water = max(self.refcounts.high_water, new_size)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc_refcounts(offset, self.cs)
                continue
            if offset:
                self.inc_refcounts(offset, self.cs)
                if self.imrt_get(cluster) != 1:
                    self.say(f"ERROR refcount block {index} refcount={self.imrt_get(cluster)}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def calculate_refcounts(self, fix: CheckFix) -> bool:
        header = self.image.header
        self.inc_refcounts(0, self.cs)  # the header
        self.check_refcounts_l1(header.l1_table_offset, header.l1_size, True, fix, True)
        if self.data_file and header.nb_snapshots:
            self.say(f"ERROR {header.nb_snapshots} snapshots in image with data file")
            self.res.corruptions += 1
        snapshots, snapshots_size = self.snapshots()
        for ident, name, l1_offset, l1_size in snapshots:
            if l1_offset % self.cs:
                self.say(f"ERROR snapshot {ident} ({name}) l1_offset={l1_offset:#x}: L1 table "
                         "is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if l1_size > MAX_L1_BYTES // 8:
                self.say(f"ERROR snapshot {ident} ({name}) l1_size={l1_size:#x}: L1 table is "
                         "too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.check_refcounts_l1(l1_offset, l1_size, False, fix, False)
        if header.nb_snapshots:
            self.inc_refcounts(header.snapshots_offset, snapshots_size)
        self.inc_refcounts(self.refcounts.table_offset, len(self.refcounts.table) * 8)
        self.count_bitmaps()
        return self.check_refblocks(fix)

    # -- comparing --------------------------------------------------------------------
    def compare_refcounts(self, fix: CheckFix) -> tuple[bool, int]:
        """(rebuild needed, highest cluster in use)."""
        res = self.res
        rebuild = False
        highest = 0
        for cluster in range(self.nb_clusters):
            try:
                stored = self.stored_refcount(cluster)
            except _Failed as failure:
                self.say(f"Can't get refcount for cluster {cluster}: "
                         f"{os.strerror(failure.code)}")
                res.check_errors += 1
                continue
            counted = self.imrt_get(cluster)
            if stored or counted:
                highest = cluster
            if stored == counted:
                continue
            fixed = None
            if stored == 0:
                rebuild = True
            elif stored > counted and fix & CheckFix.LEAKS:
                fixed = "leaks_fixed"
            elif stored < counted and fix & CheckFix.ERRORS:
                fixed = "corruptions_fixed"
            word = "Repairing" if fixed else ("ERROR" if stored < counted else "Leaked")
            self.say(f"{word} cluster {cluster} refcount={stored} reference={counted}")
            if fixed:
                self.refcounts.update(cluster, counted - stored)
                setattr(res, fixed, getattr(res, fixed) + 1)
                continue
            if stored < counted:
                res.corruptions += 1
            else:
                res.leaks += 1
        return rebuild, highest

    # -- the whole check --------------------------------------------------------------
    def check_refcounts(self) -> None:
        """qcow2_check_refcounts."""
        res, fix = self.res, self.fix
        self.realloc(div_round_up(self.file_length(), self.cs))
        res.total_clusters = div_round_up(self.image.header.size, self.cs)
        rebuild = self.calculate_refcounts(fix)
        pre_compare = _copy(res)
        found, highest = self.compare_refcounts(CheckFix.NONE)
        rebuild = rebuild or found
        if rebuild and fix & CheckFix.ERRORS:
            old = _copy(res)
            self.say("Rebuilding refcount structure")
            self.rebuild_refcount_structure()
            res.corruptions = res.leaks = 0
            self.imrt = []
            self.calculate_refcounts(CheckFix.NONE)
            fresh_leaks = 0
            if fix & CheckFix.LEAKS:
                saved = _copy(res)
                _assign(res, CheckResult(messages=res.messages))
                still_broken, highest = self.compare_refcounts(CheckFix.LEAKS)
                if still_broken:
                    self.say("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                _assign(res, saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix != CheckFix.NONE:
            if rebuild:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Failed(errno.EIO)
            if res.leaks or res.corruptions:
                _assign(res, pre_compare)
                _found, highest = self.compare_refcounts(fix)
        self.check_oflag_copied(fix)
        res.image_end_offset = (highest + 1) * self.cs

    def check_oflag_copied(self, fix: CheckFix) -> None:
        """COPIED says "refcount is exactly 1" (data file clusters always are)."""
        res = self.res
        if fix & CheckFix.ERRORS:
            repair = True
        elif fix & CheckFix.LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        for l1_index, l1_entry in enumerate(list(self.image.l1)):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.stored_refcount(l2_offset // self.cs)
            except _Failed:
                continue
            if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                self.say(f"{word} OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                         f"l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    new = l1_entry | OFLAG_COPIED if refcount == 1 else l1_entry & ~OFLAG_COPIED
                    self.image.set_l1(l1_index, new)
                    self.storage.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = bytearray(self.read(l2_offset, self.cs))
            dirty = 0
            for index, (entry, _bitmap) in enumerate(self.l2_entries(table)):
                if self.cluster_type(entry) not in ("normal", "zero_alloc"):
                    continue
                if self.data_file:
                    refcount = 1
                else:
                    try:
                        refcount = self.stored_refcount((entry & L2E_OFFSET_MASK) // self.cs)
                    except _Failed:
                        continue
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    res.corruptions += 1
                    self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                             f"refcount={refcount}")
                    if repair:
                        new = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                        QWORD.pack_into(table, index * self.entry_size, new)
                        dirty += 1
            if dirty:
                if not self.overlap_check(l2_offset, self.cs, OVERLAP_NAMES[5]):
                    self.say("ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{os.strerror(errno.EIO)}")
                    res.check_errors += 1
                    raise _Failed(errno.EIO)
                self.write_l2_table(l2_offset, bytes(table))
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # -- rebuilding -------------------------------------------------------------------
    def alloc_clusters_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """(offset of ``count`` free clusters now counted once, first gap seen)."""
        cluster, contiguous, first_gap = first_free, 0, True
        while cluster < self.nb_clusters and contiguous < count:
            if not self.imrt_get(cluster):
                contiguous += 1
                if first_gap:
                    first_free, first_gap = cluster, False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.realloc(cluster + count - contiguous)
        cluster -= contiguous
        for index in range(count):
            self.imrt_set(cluster + index, 1)
        return cluster * self.cs, first_free

    def write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks: whether ``reftable`` grew."""
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            if not self.imrt_get(cluster):
                cluster += 1
                continue
            block_index = cluster // self.per_block
            block_start = block_index * self.per_block
            if block_index < len(reftable) and reftable[block_index]:
                block_offset = reftable[block_index]
            else:
                first_free = max(first_free, block_start)
                block_offset, first_free = self.alloc_clusters_imrt(1, first_free)
                if block_offset // self.cs >= end:
                    end = block_offset // self.cs + 1
                if len(reftable) <= block_index:
                    entries = div_round_up((block_index + 1) * 8, self.cs) * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[block_index] = block_offset
            if not self.overlap_check(block_offset, self.cs):
                self.res.check_errors += 1
                raise _Failed(errno.EIO, f"ERROR writing refblock: {os.strerror(errno.EIO)}")
            block = bytearray(self.cs)
            for index in range(self.per_block):
                value = self.imrt_get(block_start + index)
                if value:
                    set_refcount(block, index, self.bits, value)
            self.storage.write(block_offset, block)
            cluster = block_start + self.per_block
        return grown

    def rebuild_refcount_structure(self) -> None:
        refcounts = self.refcounts
        refcounts.cache.flush(storage=True)
        refcounts.cache.clear()
        reftable: list[int] = []
        self.write_refblocks(0, self.nb_clusters, reftable)
        while True:
            clusters = div_round_up(len(reftable) * 8, self.cs)
            offset, _ = self.alloc_clusters_imrt(clusters, 0)
            start = offset // self.cs
            if not self.write_refblocks(start, start + clusters, reftable):
                break
        if not self.overlap_check(offset, len(reftable) * 8):
            raise _Failed(errno.EIO, f"ERROR writing reftable: {os.strerror(errno.EIO)}")
        self.storage.write(offset, b"".join(QWORD.pack(entry) for entry in reftable))
        self.storage.flush()
        self.storage.write(HEADER_REFTABLE_FIELDS, struct.pack(">QI", offset, clusters))
        self.storage.flush()
        header = self.image.header
        header.refcount_table_offset, header.refcount_table_clusters = offset, clusters
        refcounts.table = list(reftable)
        refcounts.table_offset, refcounts.table_clusters = offset, clusters
        refcounts.high_water = max(refcounts.high_water, self.nb_clusters,
                                   div_round_up(self.file_length(), self.cs))
        refcounts.free_index = 0


def _copy(result: CheckResult) -> CheckResult:
    """The counters of a result (its messages list is shared)."""
    copy = CheckResult(messages=result.messages)
    _assign(copy, result)
    return copy


def _assign(target: CheckResult, source: CheckResult) -> None:
    for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters"):
        setattr(target, name, getattr(source, name))

"""An open qcow2 image: the guest's view through L1 and L2 tables, and the
writes that allocate clusters in the order a crash cannot hurt.

Write ordering (qcow2.txt leaves it to the implementation; this is it):

1. a new cluster's refcount goes into the refcount cache, and the L2 cache
   is made to depend on it (refcounts reach the disk first);
2. its data is written (with an external data file, a barrier flushes that
   file before the L2 cache writes back);
3. the L2 entry changes in the cached table;
4. a new L2 table is written and flushed before the L1 entry that points at
   it, and the L1 is changed in place (8 bytes);
5. a cluster that loses its last reference is counted down only after the
   L2 change is on disk (the refcount cache depends on the L2 cache) and is
   not reused before the next flush (``Refcounts.quarantine``).

With lazy refcounts (v3, ``lazy_refcounts=on``) steps 1 and 5's ordering are
skipped and the dirty bit is set instead; an unclean close is repaired by
the next read-write open, as qemu does.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corefmt import (
    BackingRef,
    CheckFix,
    CheckResult,
    Extent,
    Image,
    ImageContext,
    ImageError,
    InvalidRequest,
    Limits,
    MetadataCache,
    NotSupported,
    RequestFlags,
    SnapshotInfo,
    Storage,
    sync,
)
from corefmt.cache import l2_cache_entries, refcount_cache_entries
from corefmt_qcow2 import compression, events, l2
from corefmt_qcow2.bitmaps import BitmapMethods, Bitmaps
from corefmt_qcow2.events import EventStorage
from corefmt_qcow2.header import read_header_cluster, unpack_header
from corefmt_qcow2.l2 import (
    COMPRESSED,
    HAS_HOST,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    CompressedLayout,
)
from corefmt_qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_UNDERSTOOD,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSED_SECTOR,
    ENTRY,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1_RESERVED,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    VERSION_3,
    div_round_up,
)
from corefmt_qcow2.refcount import QUARANTINE_LIMIT, Refcounts

if TYPE_CHECKING:
    from corefmt_qcow2.snapshot import SnapshotTable

#: A normal cluster whose refcount is not 1 (no COPIED flag): written by
#: copying it first (internal snapshots share clusters this way).
SHARED = 7
#: An entry that cannot be right (see map_run's ``peek``).
BAD = 8
#: What a guest sees of each kind (block status merges these).
STATUS_KIND = {UNALLOCATED_ALLOC: UNALLOCATED_PLAIN, SHARED: NORMAL}
#: Clusters allocated in one go by a long write (convert writes 2 MiB requests).
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: New cluster runs at least this long are zeroed by the filesystem before
#: their data is written (Storage.zero_before_write): measured neutral from
#: 64 KiB to 1 MiB and a clear gain above, but doubling the system time of
#: 512-byte and 4 KiB runs, where the extra call costs more than it saves.
ZERO_BEFORE_WRITE_MIN = 64 * 1024


def _breaks_run(run_kind: int, kind: int) -> bool:
    """Whether a piece of ``kind`` ends a run of ``run_kind`` (the two
    unallocated kinds read the same: from below)."""
    unallocated = (UNALLOCATED_PLAIN, UNALLOCATED_ALLOC)
    return kind != run_kind and not (kind in unallocated and run_kind in unallocated)


class Qcow2Image(BitmapMethods, Image):
    def __init__(self, storage: Storage, context: ImageContext):
        super().__init__(storage, context)
        path = context.path
        file_size = storage.size()
        raw = read_header_cluster(storage, file_size)
        self.header = header = unpack_header(raw, path, file_size)
        self.virtual_size = header.size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.extended = header.extended_l2
        self.subcluster_size = cs // SUBCLUSTERS if self.extended else cs
        self.entry_size = header.l2_entry_size
        self.l2_entries = header.l2_entries
        self.request_alignment = 1
        self.compressed = CompressedLayout(header.cluster_bits)
        self._decompressed: tuple[int, bytes] | None = None
        if (header.incompatible_features & INCOMPAT_CORRUPT and not context.read_only
                and not context.for_check):
            raise ImageError(path, "qcow2 header", 72,
                             "qcow2: Image is corrupt; cannot be opened read/write")
        self.corrupt = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        if header.backing_file:
            self.backing = BackingRef(header.backing_file, header.backing_format,
                                      header.backing_identity)
        options = context.options
        self.data: Storage = storage
        self.data_child = "file"
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            name = getattr(options, "data_file", None) or header.data_file
            if not name:
                raise ImageError(path, "qcow2 header", 72, "'data-file' is required for "
                                 "this image")
            self.data = context.open_child("data_file", name)
            self.data_child = "data_file"
        self.data_file_raw = bool(self.has_data_file
                                  and header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        l1_raw = storage.read(header.l1_table_offset, header.l1_size * ENTRY.size)
        self.l1 = [value for (value,) in ENTRY.iter_unpack(l1_raw)]
        self.lock = sync.Lock()  # every metadata change, one at a time
        self._refcounts_lock = sync.Lock()
        l2_bytes, refcount_bytes = self._cache_sizes(options)
        self.l2_cache = MetadataCache(
            "qcow2 L2 tables", EventStorage(storage, context.emit, events.L2_UPDATE), cs,
            l2_cache_entries(header.size, cs, l2_bytes, entry_bytes=self.entry_size))
        self._refcount_cache_entries = refcount_cache_entries(cs, refcount_bytes)
        self._open_file_end = -(-file_size // cs) * cs
        self._refcounts: Refcounts | None = None
        if not context.read_only:
            self._refcounts = self._load_refcounts()
        lazy = getattr(options, "lazy_refcounts", None)
        if lazy and header.version < VERSION_3:
            raise ImageError(path, "qcow2 header", 4, "Lazy refcounts require a qcow2 image "
                             "with at least qemu 1.1 compatibility level")
        self.lazy = header.version >= VERSION_3 and (
            bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS) if lazy is None else lazy)
        self._barrier_pending = False
        self._metadata_preallocated: bool | None = None
        self._l1_version = 0
        self._metadata: tuple[tuple[int, int], dict[int, str]] | None = None
        self.bitmaps = Bitmaps(self)
        if not context.read_only:
            self._open_read_write()
        self._snapshot_table: SnapshotTable | None = None
        if header.nb_snapshots and not context.for_check:
            self.snapshots  # noqa: B018 - as qemu, a broken snapshot table fails the open

    # -- opening ----------------------------------------------------------------------
    def _load_refcounts(self) -> Refcounts:
        header = self.header
        return Refcounts(self.storage, self.context.path, self.cluster_size,
                         header.refcount_bits, header.refcount_table_offset,
                         header.refcount_table_clusters, self._refcount_cache_entries,
                         self.context.emit, self._set_refcount_table)

    @property
    def refcounts(self) -> Refcounts:
        """The refcounts: read at a read-write open, at first use read-only
        (reading a chain of overlays never touches them)."""
        if self._refcounts is None:
            with self._refcounts_lock:
                if self._refcounts is None:
                    self._refcounts = self._load_refcounts()
        return self._refcounts

    @refcounts.setter
    def refcounts(self, refcounts: Refcounts) -> None:
        self._refcounts = refcounts

    @property
    def has_data_file(self) -> bool:
        return self.data is not self.storage

    def _cache_sizes(self, options: Any) -> tuple[int | None, int | None]:
        """qemu's l2-cache-size / refcount-cache-size / cache-size rules (the
        combined size is split 1:... as docs/qcow2-cache.txt says: L2 first)."""
        l2_bytes = getattr(options, "l2_cache_size", None)
        refcount_bytes = getattr(options, "refcount_cache_size", None)
        total = getattr(options, "cache_size", None)
        if total is not None:
            if l2_bytes is None and refcount_bytes is None:
                refcount_bytes = max(total // 4, 4 * self.cluster_size) if total else 0
                l2_bytes = max(total - refcount_bytes, 0)
            elif l2_bytes is None:
                l2_bytes = max(total - (refcount_bytes or 0), 0)
            elif refcount_bytes is None:
                refcount_bytes = max(total - l2_bytes, 0)
        return l2_bytes, refcount_bytes

    def _open_read_write(self) -> None:
        header = self.header
        changed = False
        if header.incompatible_features & INCOMPAT_DIRTY and not self.context.for_check:
            from corefmt_qcow2.check import check_image

            check_image(self, CheckFix.ALL)  # lazy refcounts left them stale
            header.incompatible_features &= ~INCOMPAT_DIRTY
            changed = True
        if changed:
            self.write_header()
        self.bitmaps.open_read_write()

    # -- the header ---------------------------------------------------------------------
    def write_header(self) -> None:
        """Rewrite cluster 0's header and extensions, durably."""
        self.context.emit(events.HEADER_UPDATE)
        self.storage.write(0, self.header.pack(self.cluster_size))
        self.storage.flush()

    def _set_refcount_table(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self.write_header()

    def _mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit goes to disk before the first
        metadata change it covers."""
        if not self.header.incompatible_features & INCOMPAT_DIRTY:
            self.header.incompatible_features |= INCOMPAT_DIRTY
            try:
                self.write_header()
            except BaseException:
                # Not on disk: the next change must try again, not take the
                # bit for set (found by corefmt stress -o lazy_refcounts=on,
                # seed 22: a failed header write left the image clean on
                # disk under refcounts that were never written).
                self.header.incompatible_features &= ~INCOMPAT_DIRTY
                raise

    def signal_corruption(self, structure: str, offset: int | None, problem: str) -> ImageError:
        """Impossible metadata: mark the image corrupt (as qemu does) and
        return the error to raise."""
        message = problem
        if not self.context.read_only and not self.corrupt:
            self.corrupt = True
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            with contextlib.suppress(Exception):  # the corruption is the error to report
                self.write_header()
            message = (f"qcow2: Marking image as corrupt: {problem}; further corruption "
                       "events will be suppressed")
        return ImageError(self.context.path, structure, offset, message)

    # -- lookups ------------------------------------------------------------------------
    @property
    def _file_end(self) -> int:
        """Where the image file ends, as far as metadata may point: its size
        at open, grown with every allocation (no stat call per lookup)."""
        if self._refcounts is None:
            return self._open_file_end
        return self._refcounts.high_water * self.cluster_size

    def l2_table_offset(self, l1_index: int) -> int:
        """The L2 table of an L1 entry (0: none), checked."""
        offset, problem = self._l1_lookup(l1_index)
        if problem:
            raise self.signal_corruption(
                "L1 table", self.header.l1_table_offset + l1_index * ENTRY.size, problem)
        return offset

    def _l1_lookup(self, l1_index: int) -> tuple[int, str | None]:
        """(L2 table offset or 0, what is wrong with the entry or None)."""
        if l1_index >= len(self.l1):
            return 0, None
        entry = self.l1[l1_index]
        offset = entry & OFFSET_MASK
        if not offset:
            return 0, None
        if offset % self.cluster_size:
            return offset, f"L2 table offset {offset:#x} unaligned (L1 index: {l1_index:#x})"
        if entry & L1_RESERVED or offset + self.cluster_size > self._file_end:
            return offset, f"L2 table offset {offset:#x} invalid (L1 index: {l1_index:#x})"
        return offset, None

    def _read_entries(self, data: bytearray, index: int) -> tuple[int, int | None]:
        if self.extended:
            entry, bitmap = struct.unpack_from(">QQ", data, index * 16)
            return entry, bitmap
        return ENTRY.unpack_from(data, index * 8)[0], None

    def entry(self, cluster: int) -> tuple[int, int | None]:
        """The L2 entry (and extended bitmap) of guest cluster ``cluster``."""
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        table = self.l2_table_offset(l1_index)
        if not table:
            return 0, (0 if self.extended else None)
        with self.l2_cache.get(table) as handle:
            return self._read_entries(handle.data, l2_index)

    def _kind(self, entry: int, bitmap: int | None, subcluster: int, cluster: int) -> int:
        kind, problem = self._classify(entry, bitmap, subcluster, cluster)
        if problem:
            raise self.signal_corruption("L2 table", None, problem)
        return kind

    def _classify(self, entry: int, bitmap: int | None, subcluster: int, cluster: int
                  ) -> tuple[int, str | None]:
        """(kind, what is wrong with the entry or None)."""
        kind = l2.kind_of(entry, bitmap, subcluster, self.has_data_file)
        if kind == INVALID:
            return kind, (f"Invalid cluster entry found (L2 entry: {entry:#x}, "
                          f"bitmap: {bitmap or 0:#x}, guest cluster {cluster})")
        if kind in HAS_HOST and (entry & OFFSET_MASK) % self.cluster_size:
            return kind, (f"Cluster allocation offset {entry & OFFSET_MASK:#x} "
                          f"unaligned (guest cluster {cluster})")
        if (kind in HAS_HOST and not self.has_data_file
                and (entry & OFFSET_MASK) + self.cluster_size > self._file_end):
            # Nothing is allocated past the file and its last refcount.
            return kind, (f"Cluster allocation offset {entry & OFFSET_MASK:#x} past the end "
                          f"of the image file (guest cluster {cluster})")
        if kind == NORMAL and not entry & OFLAG_COPIED:
            return SHARED, None
        return kind, None

    def map_run(self, offset: int, end: int, *, peek: bool = False
                ) -> tuple[int, int | None, int]:
        """The run from ``offset`` (to at most ``end``) of one kind whose host
        bytes are contiguous: (kind, host offset of ``offset`` or None, length).

        A bad entry at ``offset`` raises (and marks the image corrupt); with
        ``peek`` it comes back as a ``BAD`` run instead (block status: only
        a read of that range fails, as in qemu)."""
        cs, scs, epl = self.cluster_size, self.subcluster_size, self.l2_entries
        run_kind: int | None = None
        run_host: int | None = None
        position = offset
        while position < end:
            cluster = position // cs
            l1_index = cluster // epl
            if run_kind is None and not peek:
                table = self.l2_table_offset(l1_index)
            else:  # past the start: a bad entry ends the run, it is reported when read
                table, problem = self._l1_lookup(l1_index)
                if problem:
                    if run_kind is None:
                        return BAD, None, min(end, (l1_index + 1) * epl * cs) - offset
                    break
            if not table:
                if run_kind is None:
                    run_kind = UNALLOCATED_PLAIN
                elif STATUS_KIND.get(run_kind, run_kind) != UNALLOCATED_PLAIN:
                    break
                position = min(end, (l1_index + 1) * epl * cs)
                continue
            with self.l2_cache.get(table) as handle:
                data = handle.data
                while position < end and position // cs // epl == l1_index:
                    cluster = position // cs
                    entry, bitmap = self._read_entries(data, cluster % epl)
                    base = cluster * cs
                    if bitmap is not None and not entry & l2.OFLAG_COMPRESSED:
                        subcluster = (position - base) // scs
                        piece_end = min(end, base + (subcluster + 1) * scs)
                    else:
                        subcluster, bitmap = 0, None
                        piece_end = min(end, base + cs)
                    if run_kind is None and not peek:
                        kind = self._kind(entry, bitmap, subcluster, cluster)
                    else:
                        kind, problem = self._classify(entry, bitmap, subcluster, cluster)
                        if problem:
                            if run_kind is None:
                                return BAD, None, piece_end - offset
                            return run_kind, run_host, position - offset
                    host = (entry & OFFSET_MASK) + position - base if kind in (
                        NORMAL, SHARED, ZERO_ALLOC, UNALLOCATED_ALLOC) else None
                    if run_kind is None:
                        run_kind, run_host = kind, host
                    elif _breaks_run(run_kind, kind) or (host is None) != (run_host is None) or (
                            host is not None and host != run_host + (position - offset)):
                        return run_kind, run_host, position - offset
                    position = piece_end
                    if not self.extended and kind != COMPRESSED and position < end:
                        position += self._continuing_clusters(data, entry, kind, position,
                                                              end) * cs
        final_kind = run_kind if run_kind is not None else UNALLOCATED_PLAIN
        return final_kind, run_host, position - offset

    # -- block status and reads ---------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=1, zeroes_alignment=self.subcluster_size,
                      discard_alignment=self.cluster_size, copy_granularity=self.cluster_size,
                      allocation_granularity=self.subcluster_size)

    def _continuing_clusters(self, data: bytearray, entry: int, kind: int, position: int,
                             end: int) -> int:
        """Whole clusters from ``position`` (cluster-aligned, before ``end``,
        right after the cluster of ``entry``; none in the next table) that continue its
        run: the same entry again where there is no host cluster, the next
        host clusters where there is one (never past the end of the file,
        so every entry skipped this way is one _classify would accept)."""
        cs = self.cluster_size
        index = position // cs % self.l2_entries
        if index == 0:
            return 0  # the next cluster is in the next table
        limit = min(self.l2_entries - index, (end - position) // cs)
        step = cs if kind in l2.HAS_HOST or kind == SHARED else 0
        if step and not self.has_data_file:
            limit = min(limit, (self._file_end - (entry & OFFSET_MASK)) // cs - 1)
        if limit <= 0:
            return 0
        return l2.continuing_entries(data, index - 1, entry, step, limit)

    def block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self.virtual_size)
        kind, host, run = self.map_run(offset, end, peek=True)
        kind = STATUS_KIND.get(kind, kind)
        if kind == BAD:  # reported as data: reading it gives the error
            return Extent(offset, run, data=True, zero=False, allocated=True)
        if kind == NORMAL:
            is_data = True
            if self.metadata_preallocated:
                # As qemu: a stored cluster over a hole of the host file reads
                # as zeros, and map says so.
                is_data, host_run = self.data.data_run(host, run)
                run = min(run, max(host_run, 1))
            return Extent(offset, run, data=True, zero=not is_data, allocated=True,
                          host_offset=host, host_child=self.data_child)
        if kind == COMPRESSED:
            return Extent(offset, run, data=True, zero=False, allocated=True, compressed=True)
        if kind == ZERO_ALLOC:
            return Extent(offset, run, data=False, zero=True, allocated=True, host_offset=host,
                          host_child=self.data_child)
        if kind == ZERO_PLAIN:
            return Extent(offset, run, data=False, zero=True, allocated=True)
        if host is not None:  # reserved subclusters: reads go below; qemu maps the host place
            return Extent(offset, run, data=False, zero=False, allocated=False,
                          host_offset=host, host_child=self.data_child)
        return Extent(offset, run, data=False, zero=False, allocated=False)

    @property
    def metadata_preallocated(self) -> bool:
        """Whether the image looks preallocated with metadata only, so that
        block status asks the host file about holes under stored clusters
        (qemu's qcow2_detect_metadata_preallocation: more refcounted clusters
        than the image file really occupies, by a ninth and at least two)."""
        if self._metadata_preallocated is None:
            real = self.storage.allocated_size()
            if real is None:
                self._metadata_preallocated = False
            else:
                real_clusters = real // self.cluster_size
                threshold = max(real_clusters * 10 // 9, real_clusters + 2)
                clusters = div_round_up(self.storage.size(), self.cluster_size)
                # Only clusters inside the file are counted: a file with
                # fewer clusters than the threshold (one that is not sparse)
                # cannot pass it, and its refcounts need not be read (a
                # read-only chain of hundreds of overlays would read them all).
                self._metadata_preallocated = clusters >= threshold and self.refcounts.count_used(
                    clusters, threshold) >= threshold
        return self._metadata_preallocated

    def readinto(self, offset: int, buf: memoryview) -> None:
        done, total = 0, len(buf)
        while done < total:
            kind, host, run = self.map_run(offset + done, offset + total)
            piece = buf[done:done + run]
            if kind in (NORMAL, SHARED):
                self.data.readinto(host, piece)
            elif kind == COMPRESSED:
                self._read_compressed(offset + done, piece)
            elif kind in (ZERO_PLAIN, ZERO_ALLOC):
                piece[:] = bytes(run)
            else:  # unallocated here: what lies below
                piece[:] = self.context.read_below(offset + done, run)
            done += run

    def _read_compressed(self, offset: int, buf: memoryview) -> None:
        cs = self.cluster_size
        done = 0
        while done < len(buf):
            cluster, inside = divmod(offset + done, cs)
            step = min(cs - inside, len(buf) - done)
            buf[done:done + step] = self.cluster_content(cluster)[inside:inside + step]
            done += step

    def decompress_entry(self, entry: int, cluster: int) -> bytes:
        host, length = self.compressed.locate(entry)
        cached = self._decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        if host + length > self.storage.size() + 512:
            raise self.signal_corruption("L2 table", None, f"compressed cluster {cluster} at "
                                         f"{host:#x} lies past the end of the file")
        data = self.storage.read(host, length)
        content = compression.decompress(data, self.cluster_size, self.header.compression_type)
        if content is None:
            raise ImageError(self.context.path, "compressed cluster", host,
                             f"guest cluster {cluster} does not decompress")
        self._decompressed = (entry, content)
        return content

    def cluster_content(self, cluster: int, start: int = 0, end: int | None = None) -> bytes:
        """What this layer shows for bytes ``start..end`` of a guest cluster
        (the backing chain where it is unallocated): the old content a
        copy-on-write keeps."""
        cs = self.cluster_size
        end = cs if end is None else end
        entry, _ = self.entry(cluster)
        base = cluster * cs
        if entry & l2.OFLAG_COMPRESSED:
            return self.decompress_entry(entry, cluster)[start:end]
        out = bytearray(end - start)
        readable = max(0, min(end - start, self.virtual_size - base - start))
        if readable:
            self.readinto(base + start, memoryview(out)[:readable])
        return bytes(out)

    # -- writes -------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.corrupt:
            raise ImageError(self.context.path, "qcow2 header", 72,
                             "Image is corrupt; cannot be written")
        if self.header.autoclear_features & ~AUTOCLEAR_UNDERSTOOD:
            # A program that does not understand an autoclear feature clears
            # it before it changes the image (bitmaps: stale from now on).
            with self.lock:
                self.header.autoclear_features &= AUTOCLEAR_UNDERSTOOD
                self.write_header()

    def write(self, offset: int, data: bytes | memoryview,
              flags: RequestFlags = RequestFlags.NONE) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self.bitmaps.note(offset, len(view), flags)
        if flags & RequestFlags.COMPRESSED:
            self._store_compressed(self._compress_clusters(offset, view))
            if flags & RequestFlags.FUA:
                self.flush()
            return
        total, done = len(view), 0
        while done < total:
            kind, host, run = self.map_run(offset + done, offset + total)
            if kind == NORMAL:
                self.check_overlap(host, run)
                self.data.write(host, view[done:done + run])
                done += run
                continue
            with self.lock:
                done += self._write_allocating(offset + done, view[done:])
        if flags & RequestFlags.FUA:
            self.flush()

    def _write_allocating(self, offset: int, view: memoryview) -> int:
        """Write the start of ``view`` where clusters must be allocated or
        changed; how many bytes were written. Holds the metadata lock.

        The kind is looked up again under the lock: another request may
        have allocated the cluster since (a copy-on-write of a compressed
        or zero cluster, a subcluster's allocation). Once it is normal,
        other requests write into it in place without the lock, so it is
        written in place too: rewriting its other bytes from a read would
        undo a concurrent write there (found by corefmt stress, seed 188).
        A rewrite is kept to the run of one kind for the same reason: an
        allocated subcluster past the run is not rewritten."""
        cs = self.cluster_size
        cluster, inside = divmod(offset, cs)
        kind, host, run = self.map_run(offset, offset + min(len(view), cs - inside))
        if kind == NORMAL:
            self.check_overlap(host, run)
            self.data.write(host, view[:run])
            return run
        entry, bitmap = self.entry(cluster)
        if entry == 0 and not bitmap:
            return self._write_new_clusters(offset, view)
        step = run if self.extended else min(cs - inside, len(view))
        self._rewrite_cluster(cluster, inside, view[:step], entry, bitmap)
        return step

    def _subcluster_span(self, start: int, end: int) -> tuple[int, int]:
        """``start..end`` (inside one cluster) widened to whole subclusters."""
        scs = self.subcluster_size
        return start - start % scs, -(-end // scs) * scs

    def _write_new_clusters(self, offset: int, view: memoryview) -> int:
        """Clusters with no entry at all: new, contiguous host clusters, the
        partial edges filled from below, written with one write."""
        cs, epl = self.cluster_size, self.l2_entries
        first = offset // cs
        limit = min(offset + len(view), (first // epl + 1) * epl * cs,
                    first * cs + MAX_BATCH_BYTES)
        last = (limit - 1) // cs
        count = 1
        table = self.l2_table_offset(first // epl)
        if not table:
            count = last - first + 1
        else:
            with self.l2_cache.get(table) as handle:
                while first + count <= last:
                    entry, bitmap = self._read_entries(handle.data, (first + count) % epl)
                    if entry or bitmap:
                        break
                    count += 1
        end = min(offset + len(view), (first + count) * cs)
        region_start, _ = self._subcluster_span(offset - first * cs, cs)
        region_start += first * cs
        last_cluster = (end - 1) // cs
        _, region_end = self._subcluster_span(0, end - last_cluster * cs)
        region_end += last_cluster * cs
        count = last_cluster - first + 1
        if region_start == offset and region_end == end:
            buffer: bytearray | memoryview = view[:end - offset]  # whole clusters: no copy
        else:
            buffer = bytearray(region_end - region_start)
            if region_start < offset:
                buffer[:offset - region_start] = self._below(region_start, offset)
            if end < region_end:
                buffer[end - region_start:] = self._below(end, region_end)
            buffer[offset - region_start:end - region_start] = view[:end - offset]
        l2_table = self.writable_l2(first // epl)
        host = self.allocate_data(first, count)
        region_host = host + region_start - first * cs
        self.check_overlap(region_host, len(buffer))
        if not self.has_data_file and len(buffer) >= ZERO_BEFORE_WRITE_MIN:
            self.context.emit(events.CLUSTER_ALLOC_SPACE)
            self.data.zero_before_write(region_host, len(buffer))
        self.context.emit(events.CLUSTER_ALLOC)
        self.data.write(region_host, buffer)
        self._order_data_before_l2(allocated=True)
        with self.l2_cache.get(l2_table) as handle:
            if not self.extended:  # one pack for the whole run of new entries
                entry = host | OFLAG_COPIED
                l2.entries_struct(count).pack_into(
                    handle.data, first % epl * ENTRY.size,
                    *range(entry, entry + count * cs, cs))
                handle.mark_dirty()
                return end - offset
            scs = self.subcluster_size
            for index in range(count):
                cluster = first + index
                lo = max(region_start, cluster * cs) - cluster * cs
                hi = min(region_end, (cluster + 1) * cs) - cluster * cs
                self.set_entry(handle, cluster % epl, (host + index * cs) | OFLAG_COPIED,
                               l2.alloc_bits(lo // scs, (hi - lo) // scs))
        return end - offset

    def _below(self, start: int, end: int) -> bytes:
        """The backing chain's bytes for ``start..end``; zeros past the disk's end."""
        available = max(0, min(end, self.virtual_size) - start)
        below = self.context.read_below(start, available) if available else b""
        return below + bytes(end - start - available)

    def allocate_data(self, first_cluster: int, count: int) -> int:
        """Host clusters for guest clusters: with an external data file the
        guest offset itself (qemu maps data files 1:1, unrefcounted)."""
        if self.has_data_file:
            return first_cluster * self.cluster_size
        host = self.refcounts.allocate(count)
        if self.lazy:
            self._mark_dirty()
        return host

    def _rewrite_cluster(self, cluster: int, inside: int, piece: memoryview, entry: int,
                         bitmap: int | None) -> None:
        """A write into a cluster that has an entry but cannot be written in
        place as it is: zero, compressed, shared, or (extended L2) with
        subclusters not yet allocated."""
        cs = self.cluster_size
        compressed = bool(entry & l2.OFLAG_COMPRESSED)
        old_host = 0 if compressed else entry & OFFSET_MASK
        reuse = bool(old_host) and bool(entry & OFLAG_COPIED)
        if self.extended and (reuse or not old_host) and not compressed:
            start, end = self._subcluster_span(inside, inside + len(piece))
        else:
            start, end = 0, cs
        content = bytearray(self.cluster_content(cluster, start, end))
        content[inside - start:inside - start + len(piece)] = piece
        l2_table = self.writable_l2(cluster // self.l2_entries)
        host = old_host if reuse else self.allocate_data(cluster, 1)
        if self.has_data_file:
            host, reuse = cluster * cs, True
        self.context.emit(events.COW_WRITE)
        self.check_overlap(host + start, len(content))
        self.data.write(host + start, content)
        self._order_data_before_l2(allocated=not reuse)
        new_bitmap = None
        if self.extended:
            scs = self.subcluster_size
            touched = l2.alloc_bits(start // scs, (end - start) // scs)
            kept = (reuse or not old_host) and not compressed
            old_bits = (bitmap or 0) if kept else 0
            new_bitmap = (old_bits | touched) & ~(touched << l2.SUBCLUSTER_ZERO_SHIFT)
        with self.l2_cache.get(l2_table) as handle:
            self.set_entry(handle, cluster % self.l2_entries, host | OFLAG_COPIED, new_bitmap)
        if not reuse:
            self._free_entry(entry, cluster)

    # -- compressed writes ----------------------------------------------------------------
    def prepare_write(self, offset: int, data: bytes | memoryview,
                      flags: RequestFlags = RequestFlags.NONE) -> Callable[[], None]:
        """Do now the part of a write that needs no lock, and return the rest.

        For a compressed write that is the compression, on the caller's
        thread (zlib and zstd release the GIL): convert -c compresses on all
        its workers and stores the clusters in guest order, so the image is
        laid out as qemu-img's one-thread conversion lays it out."""
        if not flags & RequestFlags.COMPRESSED:
            return functools.partial(self.write, offset, data, flags)
        self._check_writable()
        view = memoryview(data).cast("B")
        clusters = self._compress_clusters(offset, view)

        def store() -> None:
            self.bitmaps.note(offset, len(view), flags)
            self._store_compressed(clusters)
            if flags & RequestFlags.FUA:
                self.flush()
        return store

    def _compress_clusters(self, offset: int, view: memoryview
                           ) -> list[tuple[int, bytes | memoryview, bool]]:
        """(guest cluster, bytes to store, compressed?) for a compressed write
        of whole clusters (the image's last cluster may be partial: qemu pads
        it with zeros)."""
        cs = self.cluster_size
        if self.has_data_file:
            raise NotSupported(f"{self.context.path}: compression is not supported with an "
                               "external data file")
        end = offset + len(view)
        if offset % cs or (len(view) % cs and end != self.virtual_size):
            raise InvalidRequest(f"{self.context.path}: a compressed write must cover whole "
                                 f"{cs}-byte clusters (offset {offset}, length {len(view)})")
        clusters = []
        for start in range(0, len(view), cs):
            piece = view[start:start + cs]
            whole = piece if len(piece) == cs else bytes(piece) + bytes(cs - len(piece))
            stream = compression.compress(whole, self.header.compression_type)
            clusters.append(((offset + start) // cs,
                             piece if stream is None else stream, stream is not None))
        return clusters

    def _store_compressed(self, clusters: list[tuple[int, bytes | memoryview, bool]]) -> None:
        """Store compressed clusters packed one after the other (qemu's
        layout); a cluster that did not compress is written as a normal one.

        Ordering as for any allocation: the L2 tables exist first (as in
        qemu, so a new table does not split the packed run), the packed
        bytes' refcounts go into the cache, the bytes are written, and only
        then do the L2 entries change, made to depend on the refcounts; what
        the old entries held is freed after them."""
        self._check_writable()
        cs = self.cluster_size
        done = 0
        while done < len(clusters):
            cluster, payload, compressed = clusters[done]
            if not compressed:
                self.write(cluster * cs, payload)
                done += 1
                continue
            group = []
            while done < len(clusters) and clusters[done][2]:
                group.append(clusters[done][:2])
                done += 1
            with self.lock:
                self._store_compressed_group(group)

    def _store_compressed_group(self, group: list[tuple[int, bytes | memoryview]]) -> None:
        epl = self.l2_entries
        placed = []
        for cluster, stream in group:
            entry, _bitmap = self.entry(cluster)
            table = self.writable_l2(cluster // epl)
            self.context.emit(events.CLUSTER_ALLOC_BYTES)
            host = self.refcounts.allocate_bytes(len(stream))
            if self.lazy:
                self._mark_dirty()
            self.check_overlap(host, len(stream))
            placed.append((cluster, table, host, stream, entry))
        # The last decompressed cluster is cached by its entry: a new stream
        # may land where a freed one lay, with the very same entry.
        self._decompressed = None
        run_start, run = 0, bytearray()
        for _cluster, _table, host, stream, _entry in placed:
            if run and run_start + len(run) != host:
                self.context.emit(events.WRITE_COMPRESSED)
                self.storage.write(run_start, run)
                run = bytearray()
            if not run:
                run_start = host
            run += stream
        if run:
            self.context.emit(events.WRITE_COMPRESSED)
            self.storage.write(run_start, run)
        self._order_data_before_l2(allocated=True)
        layout = self.compressed
        for cluster, table, host, stream, entry in placed:
            sectors = (host + len(stream) - 1) // COMPRESSED_SECTOR - host // COMPRESSED_SECTOR
            new_entry = l2.OFLAG_COMPRESSED | sectors << layout.offset_bits | host
            with self.l2_cache.get(table) as handle:
                self.set_entry(handle, cluster % epl, new_entry, 0 if self.extended else None)
            if entry & l2.OFLAG_COMPRESSED or self._has_host(entry):
                self._free_entry(entry, cluster)

    def _has_host(self, entry: int) -> bool:
        """Whether an uncompressed entry names a host cluster (see kind_of)."""
        return bool(entry & OFFSET_MASK) or (self.has_data_file and bool(entry & OFLAG_COPIED))

    def set_entry(self, handle: Any, index: int, entry: int, bitmap: int | None) -> None:
        if self.extended:
            struct.pack_into(">QQ", handle.data, index * 16, entry, bitmap or 0)
        else:
            ENTRY.pack_into(handle.data, index * 8, entry)
        handle.mark_dirty()

    # -- ordering -----------------------------------------------------------------------
    def _order_data_before_l2(self, allocated: bool) -> None:
        """What a changed L2 entry waits for before its table is written back:
        the refcounts of a new cluster, and the data it points at.

        Set after the data write, the dependency on the refcount cache does
        both for the image file (its flush comes after the data). A cluster
        reused in place (zero, preallocated, a subcluster) has no refcount
        update, an external data file is another file, and lazy refcounts
        order nothing: those get a barrier that flushes the data first."""
        if allocated and not self.lazy:
            self.l2_cache.depends_on(self.refcounts.cache)
            if not self.has_data_file:
                return
        if not self._barrier_pending:
            self._barrier_pending = True
            self.l2_cache.add_barrier(self._data_barrier)

    def _data_barrier(self) -> None:
        self._barrier_pending = False
        self.data.flush()

    def _free_entry(self, entry: int, cluster: int) -> None:
        """Drop the reference an old L2 entry held (after the L2 change)."""
        if entry & l2.OFLAG_COMPRESSED:
            start, length = self.compressed.sectors_span(entry)
            first = start // self.cluster_size
            last = (start + length - 1) // self.cluster_size
            self._free_clusters(first * self.cluster_size, last - first + 1)
        elif entry & OFFSET_MASK and not self.has_data_file:
            self._free_clusters(entry & OFFSET_MASK, 1)

    def _bound_quarantine(self) -> None:
        """A long discard does not keep every freed cluster in memory: past
        QUARANTINE_LIMIT a flush makes the references go and lets them go."""
        if len(self.refcounts.quarantine) > QUARANTINE_LIMIT:
            self._flush()

    def _free_clusters(self, offset: int, count: int) -> None:
        if self.lazy:
            self._mark_dirty()
        else:
            self.refcounts.cache.depends_on(self.l2_cache)
        self.refcounts.free(offset, count)

    # -- L1 and L2 tables -----------------------------------------------------------------
    def writable_l2(self, l1_index: int) -> int:
        """An L2 table this image alone owns for ``l1_index``: allocated (or
        copied from a shared one) and on disk before the L1 points at it."""
        table = self.l2_table_offset(l1_index)
        if table and self.l1[l1_index] & OFLAG_COPIED:
            return table
        cs = self.cluster_size
        if table:
            with self.l2_cache.get(table) as handle:
                content = bytes(handle.data)
        else:
            content = bytes(cs)
        new = self.refcounts.allocate(1)
        # A table freed by an earlier copy (an L1 entry without COPIED at
        # refcount 1, as an interrupted snapshot operation leaves) may still
        # be cached: its cluster must not be read or written back as this one.
        self.l2_cache.forget(new)
        if not self.lazy:
            self.refcounts.cache.flush(storage=True)
        else:
            self._mark_dirty()
        self.context.emit(events.L2_ALLOC_WRITE)
        self.storage.write(new, content)
        self.storage.flush()
        self.set_l1(l1_index, new | OFLAG_COPIED)
        if table:  # the shared table keeps its other owners' reference
            # The L1 entry bypasses the L2 cache the refcount cache waits
            # for: flushed first (qemu's qcow2_write_l1_entry is sync), or
            # the count-down can land while the L1 still names the table.
            self.storage.flush()
            self._free_clusters(table, 1)
        return new

    def _metadata_places(self) -> dict[int, str]:
        """Cluster -> the metadata structure in it (rebuilt when L1 or the
        refcount layout changes)."""
        version = (self._l1_version, self.refcounts.layout_version)
        if self._metadata is None or self._metadata[0] != version:
            cs = self.cluster_size
            places: dict[int, str] = {0: "qcow2_header"}
            header = self.header
            for what, offset, length in (
                    ("active L1 table", header.l1_table_offset, len(self.l1) * ENTRY.size),
                    ("refcount table", self.refcounts.table_offset,
                     self.refcounts.table_clusters * cs),
                    ("snapshot table", header.snapshots_offset,
                     1 if header.nb_snapshots else 0)):
                if length:
                    for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
                        places[cluster] = what
            for entry in self.refcounts.table:
                if entry & ~0x1FF:
                    places[(entry & ~0x1FF) // cs] = "refcount block"
            for entry in self.l1:
                if entry & OFFSET_MASK:
                    places[(entry & OFFSET_MASK) // cs] = "active L2 table"
            self._metadata = (version, places)
        return self._metadata[1]

    def check_overlap(self, host: int, length: int) -> None:
        """No data write lands on metadata (qemu's qcow2_pre_write_overlap_check,
        its default checks): such an L2 entry is impossible, the image corrupt."""
        if self.has_data_file or not length:
            return
        places = self._metadata_places()
        cs = self.cluster_size
        clusters = range(host // cs, (host + length - 1) // cs + 1)
        if places.keys().isdisjoint(clusters):
            return
        what = next(places[cluster] for cluster in clusters if cluster in places)
        raise self.signal_corruption("data cluster", host, "Preventing invalid write on "
                                     f"metadata (overlaps with {what})")

    def set_l1(self, l1_index: int, value: int) -> None:
        self.context.emit(events.L1_UPDATE)
        self.storage.write(self.header.l1_table_offset + l1_index * ENTRY.size,
                           ENTRY.pack(value))
        self.l1[l1_index] = value
        self._l1_version += 1

    # -- zeroing and discarding -----------------------------------------------------------
    def supports(self, capability: str) -> bool:
        if capability == "write_zeroes":
            return self.header.version >= VERSION_3
        if capability == "write_compressed":  # qemu: not with an external data file
            return not self.has_data_file
        return super().supports(capability)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     flags: RequestFlags = RequestFlags.NONE) -> None:
        """qemu's zero_in_l2_slice: zero flags (or extended zero bits); a
        cluster's host space is given back only with ``unmap``."""
        self._check_writable()
        self.bitmaps.note(offset, length, flags)
        if self.header.version < VERSION_3:
            raise NotSupported("qcow2 v2 has no zero clusters")
        if self.data_file_raw:
            self.data.write_zeroes(offset, length)
        cs, end = self.cluster_size, offset + length
        with self.lock:
            position = offset
            while position < end:
                cluster, inside = divmod(position, cs)
                step = min(cs - inside, end - position)
                if step < cs and not (position + step == self.virtual_size and inside == 0):
                    self._zero_subclusters(cluster, inside, step)
                else:
                    self._zero_cluster(cluster, unmap)
                    self._bound_quarantine()
                position += step
        if flags & RequestFlags.FUA:
            self.flush()

    def _zero_cluster(self, cluster: int, unmap: bool) -> None:
        entry, bitmap = self.entry(cluster)
        compressed = bool(entry & l2.OFLAG_COMPRESSED)
        allocated = compressed or self._has_host(entry)
        drop = compressed or (unmap and allocated and not self.data_file_raw)
        new_entry = 0 if drop else entry
        if self.extended:
            new_bitmap: int | None = l2.ALL_ZEROES
        else:
            new_bitmap, new_entry = None, new_entry | OFLAG_ZERO
        if (new_entry, new_bitmap) == (entry, bitmap):
            return
        self._update_entry(cluster, new_entry, new_bitmap)
        if drop:
            self._free_entry(entry, cluster)

    def _zero_subclusters(self, cluster: int, inside: int, length: int) -> None:
        """Extended L2: part of a cluster, in whole subclusters."""
        entry, bitmap = self.entry(cluster)
        if entry & l2.OFLAG_COMPRESSED or not self.extended:
            raise NotSupported("a compressed cluster cannot be zeroed in part")
        scs = self.subcluster_size
        bits = l2.alloc_bits(inside // scs, length // scs)
        new_bitmap = ((bitmap or 0) | bits << l2.SUBCLUSTER_ZERO_SHIFT) & ~bits
        if new_bitmap != bitmap:
            self._update_entry(cluster, entry, new_bitmap)

    def _update_entry(self, cluster: int, entry: int, bitmap: int | None) -> None:
        table = self.writable_l2(cluster // self.l2_entries)
        with self.l2_cache.get(table) as handle:
            self.set_entry(handle, cluster % self.l2_entries, entry, bitmap)

    def discard(self, offset: int, length: int) -> None:
        """qemu's discard_in_l2_slice (full_discard off): discarded clusters
        read as zeros in v3; v2 with a backing file is left alone, as qemu
        does (it could not make them read as zeros)."""
        self._check_writable()
        self.bitmaps.note(offset, length)
        if self.header.version < VERSION_3 and self.backing is not None:
            return
        cs = self.cluster_size
        with self.lock:
            for cluster in range(offset // cs, div_round_up(offset + length, cs)):
                self._discard_cluster(cluster)
                self._bound_quarantine()
        if self.data_file_raw:  # the data file must read as the disk does: zeros
            self.data.write_zeroes(offset, length, unmap=True)

    def _discard_cluster(self, cluster: int) -> None:
        entry, bitmap = self.entry(cluster)
        compressed = bool(entry & l2.OFLAG_COMPRESSED)
        allocated = compressed or self._has_host(entry)
        kind = l2.kind_of(entry, None, 0, self.has_data_file)
        if kind == UNALLOCATED_PLAIN and not allocated and self.backing is None and not bitmap:
            return
        if kind == ZERO_PLAIN and not self.extended:
            return
        if self.extended:
            new_entry, new_bitmap = 0, l2.ALL_ZEROES
        else:
            new_entry, new_bitmap = (OFLAG_ZERO if self.header.version >= VERSION_3 else 0), None
        if (new_entry, new_bitmap) == (entry, bitmap):
            return
        self._update_entry(cluster, new_entry, new_bitmap)
        if allocated and not self.data_file_raw:
            self._free_entry(entry, cluster)

    # -- flush, close, truncate -----------------------------------------------------------
    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.has_data_file:
            self.data.flush()
        # Always flushes the image file: in-place data writes and L1 updates
        # reach it without a cache.
        self.l2_cache.flush(storage=True)
        # Refcounts that dropped after those L2 changes (only if any were written).
        self.refcounts.cache.make_durable()
        self.refcounts.release_quarantine()

    def close(self) -> None:
        try:
            if not self.context.read_only:
                with self.lock:
                    self._flush()
                    self.bitmaps.store()
                    if self.header.incompatible_features & INCOMPAT_DIRTY:
                        self.header.incompatible_features &= ~INCOMPAT_DIRTY
                        self.write_header()
        finally:
            if self.has_data_file:
                self.data.close()
            self.storage.close()

    def has_zero_init(self) -> bool:
        """A new qcow2 maps nothing (unless preallocated into a device)."""
        return not self.data_file_raw

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    def truncate(self, size: int, preallocation: str = "off") -> None:
        from corefmt_qcow2.resize import resize

        self._check_writable()
        with self.lock:
            old = self.virtual_size
            resize(self, size, preallocation)
        if preallocation != "off" and size > old:
            from corefmt_qcow2.preallocate import preallocate

            preallocate(self, preallocation, start=old)

    def flush_locked(self) -> None:
        self._flush()

    def clear_cluster(self, cluster: int) -> None:
        """Unmap a cluster completely (it falls through to the backing file)."""
        entry, bitmap = self.entry(cluster)
        if entry == 0 and not bitmap:
            return
        self._update_entry(cluster, 0, 0 if self.extended else None)
        if not self.data_file_raw:
            self._free_entry(entry, cluster)

    def drop_l2(self, l1_index: int) -> None:
        """Unhook an L2 table whose clusters are all unmapped: the L1 entry is
        cleared on disk before the table's cluster is counted down."""
        table = self.l2_table_offset(l1_index)
        self.l2_cache.flush(storage=True)
        self.set_l1(l1_index, 0)
        self.storage.flush()
        self.l2_cache.forget(table)
        self._free_clusters(table, 1)

    def grow_l1(self, entries: int) -> None:
        """A bigger L1 table, written and flushed before the header points at
        it; the old one is freed after (qemu's qcow2_grow_l1_table)."""
        cs = self.cluster_size
        clusters = div_round_up(entries * ENTRY.size, cs)
        new = self.refcounts.allocate(clusters)
        self.refcounts.cache.flush(storage=True)
        table = self.l1 + [0] * (entries - len(self.l1))
        self.context.emit(events.L1_GROW_WRITE_TABLE)
        self.storage.write(new, struct.pack(f">{entries}Q", *table))
        self.storage.flush()
        old_offset, old_size = self.header.l1_table_offset, self.header.l1_size
        self.header.l1_table_offset, self.header.l1_size = new, entries
        self.write_header()
        self.l1 = table
        self._l1_version += 1
        if old_size:
            old_clusters = div_round_up(old_size * ENTRY.size, cs)
            self._free_clusters(old_offset, old_clusters)

    # -- check and info -----------------------------------------------------------------
    def check(self, fix: CheckFix = CheckFix.NONE) -> CheckResult:
        from corefmt_qcow2.check import check_image

        if self.context.read_only:
            fix = CheckFix.NONE
        with self.lock:
            if not self.context.read_only:
                self._flush()
            return check_image(self, fix)

    def info(self) -> dict[str, Any]:
        from corefmt_qcow2.info import format_specific

        return format_specific(self)

    # -- amend --------------------------------------------------------------------------
    def amend(self, options: Any, progress: Any = None, *, size: int | None = None,
              backing: tuple[str | None, str | None] | None = None) -> None:
        """qemu-img amend (corefmt_qcow2.amend)."""
        from corefmt_qcow2.amend import amend

        self._check_writable()
        with self.lock:
            amend(self, options, progress, size=size, backing=backing)

    # -- the chain verbs (corefmt_qcow2.chain_ops) ------------------------------------------
    def set_backing(self, reference: BackingRef | None) -> None:
        """rebase/stream: qemu's qcow2_change_backing_file."""
        from corefmt_qcow2 import chain_ops

        self._check_writable()
        with self.lock:
            chain_ops.set_backing(self, reference)

    def make_empty(self) -> None:
        """commit: qemu's qcow2_make_empty (every cluster unallocated)."""
        from corefmt_qcow2 import chain_ops

        self._check_writable()
        with self.lock:
            chain_ops.make_empty(self)

    # -- internal snapshots (corefmt_qcow2.snapshot) ------------------------------------------
    @property
    def snapshots(self) -> SnapshotTable:
        """The snapshot table, read at open (at first use by ``check``)."""
        if self._snapshot_table is None:
            from corefmt_qcow2.snapshot import SnapshotTable

            self._snapshot_table = SnapshotTable(self)
        return self._snapshot_table

    def snapshot_list(self) -> list[SnapshotInfo]:
        from corefmt_qcow2 import snapshot

        return snapshot.snapshot_list(self)

    def snapshot_create(self, name: str) -> SnapshotInfo:
        from corefmt_qcow2 import snapshot

        with self.lock:
            return snapshot.create(self, name)

    def snapshot_apply(self, id_or_name: str) -> None:
        from corefmt_qcow2 import snapshot

        with self.lock:
            snapshot.apply(self, id_or_name)

    def snapshot_delete(self, id_or_name: str) -> None:
        from corefmt_qcow2 import snapshot

        with self.lock:
            snapshot.delete(self, id_or_name)

    def snapshot_load(self, ident: str | None, name: str | None) -> None:
        from corefmt_qcow2 import snapshot

        with self.lock:
            snapshot.load(self, ident, name)

    def replace_l1(self, l1: list[int]) -> None:
        """The active L1 after a snapshot operation rewrote it on disk."""
        self.l1 = list(l1)
        self._l1_version += 1

    def show_l1(self, offset: int, l1: list[int]) -> None:
        """Read another L1 table (a snapshot's) from now on; read-only opens only."""
        self.header.l1_table_offset, self.header.l1_size = offset, len(l1)
        self._decompressed = None
        self.replace_l1(l1)

    def metadata_moved(self) -> None:
        """The snapshot table moved: the overlap check's map is rebuilt."""
        self._metadata = None

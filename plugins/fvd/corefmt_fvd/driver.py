"""The FVD format driver: probing, creating (the 2011 driver's layout) and
opening."""

from __future__ import annotations

from typing import Any

from corefmt import (
    PROBE_CERTAIN,
    PROBE_NO,
    BackingRef,
    CreateContext,
    FormatDriver,
    ImageContext,
    MeasureResult,
    OptionError,
    Storage,
)
from corefmt_fvd.base_version import RECORD_OFFSET, pack_record
from corefmt_fvd.create import plan_header, search_holes
from corefmt_fvd.image import FvdImage
from corefmt_fvd.layout import (
    EMPTY_ENTRY,
    MAGIC_BYTES,
    SECTOR,
    TRUE,
    VERSION,
)
from corefmt_fvd.node_storage import as_storage
from corefmt_fvd.options import FvdAmendOptions, FvdCreateOptions, FvdOpenOptions

#: Bytes of zeros or 0xFF written at once while laying out a new image.
FILL_PIECE = 1024 * 1024


class FvdDriver(FormatDriver):
    name = "fvd"
    create_options = FvdCreateOptions
    open_options = FvdOpenOptions
    amend_options = FvdAmendOptions
    amend_backing_options = ("base_img", "base_img_fmt")
    supports_backing = True
    stress_option_sets = (
        "",
        "block_size=7680",
        "compact_image=on,chunk_size=8192,block_size=7680,storage_grow_unit=65536",
        "compact_image=on,chunk_size=4096,journal_size=4096",
        "block_size=512,journal_size=4096",
        "compact_image=on,block_size=65536,chunk_size=16384,data_file=stress.fvd-data",
    )

    def probe(self, head: bytes, path: str | None) -> int:
        if len(head) >= 8 and head[:4] == MAGIC_BYTES and \
                int.from_bytes(head[4:8], "little") == VERSION:
            return PROBE_CERTAIN
        return PROBE_NO

    def create(self, storage: Storage, size: int, options: FvdCreateOptions,
               backing: BackingRef | None, *, context: CreateContext | None = None) -> None:
        options.validate(has_base=backing is not None)
        base = context.backing if context is not None else None
        if backing is not None and base is None and options.detect_sparse_hole:
            raise OptionError("detect_sparse_hole needs the base image opened (not -u)")
        base_size = base.virtual_size if base is not None else (
            size if backing is not None else None)
        header = plan_header(size, options, backing, base_size)
        if header.data_file:
            if context is None:
                raise OptionError("fvd: a separate data file needs a create context")
            data_size = 0 if header.compact else header.virtual_disk_size
            fmt = header.data_file_fmt or None
            child = context.create_child("data_file", header.data_file,
                                         format=None if fmt == "raw" else fmt,
                                         size=data_size if fmt not in (None, "raw") else None)
            data = as_storage(child)
            if fmt in (None, "raw"):
                data.truncate(data_size)
        # An interrupted create leaves no FVD image (open refuses it), never a
        # header over regions not filled yet (a table region of zeros maps every
        # chunk to chunk 0): the regions are filled and flushed before the
        # header, whose first sector (the magic) goes last.
        header.clean_shutdown = TRUE
        region = header.pack_region()
        if backing is not None and backing.identity:
            record = pack_record(header.base_img, backing.identity)
            region = region[:RECORD_OFFSET] + record + region[RECORD_OFFSET + len(record):]
        storage.truncate(0)
        storage.flush()
        if header.bitmap_size:
            bits = (search_holes(base, header, options.detect_sparse_hole).bits
                    if options.detect_sparse_hole and base is not None else None)
            if bits is not None and any(bits):
                storage.write(header.bitmap_offset, bits)
            else:
                _fill(storage, header.bitmap_offset, header.bitmap_size, 0)
        if header.compact:
            _fill(storage, header.table_offset, header.table_size, EMPTY_ENTRY & 0xFF)
        if header.journal_size:
            _fill(storage, header.journal_offset, header.journal_size, 0)
        storage.truncate(header.metadata_size)
        storage.write(SECTOR, region[SECTOR:])
        storage.flush()
        storage.write(0, region[:SECTOR])

    def open(self, storage: Storage, context: ImageContext) -> FvdImage:
        return FvdImage(storage, context)

    def measure(self, size: int, options: FvdCreateOptions, source: Any,
                backing: BackingRef | None = None) -> MeasureResult:
        from corefmt_fvd.measure import measure

        return measure(size, options, source, backing)


def _fill(storage: Storage, offset: int, length: int, byte: int) -> None:
    if byte == 0:
        storage.write_zeroes(offset, length)
        return
    piece = bytes([byte]) * min(FILL_PIECE, length)
    for done in range(0, length, FILL_PIECE):
        storage.write(offset + done, piece[:min(FILL_PIECE, length - done)])

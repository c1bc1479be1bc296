"""The layout a new FVD image gets (fvd-create.c's rules, §2.4 of the
spec), and the search for zero regions of the base (§3.4)."""

from __future__ import annotations

from typing import Any

from corefmt import BackingRef, OptionError
from corefmt_fvd.bitmap import FvdBitmap
from corefmt_fvd.header import MAX_JOURNAL_BYTES
from corefmt_fvd.layout import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BYTES_PER_PREFETCH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_JOURNAL_SIZE,
    DEFAULT_MAX_OUTSTANDING_COPY_ON_READ,
    DEFAULT_MAX_THROUGHPUT_KBS,
    DEFAULT_MEASURE_MS,
    DEFAULT_MIN_THROUGHPUT_KBS,
    DEFAULT_PERF_ALPHA,
    DEFAULT_PREFETCH_SLOTS,
    DEFAULT_PREFETCH_THROTTLE_MS,
    DEFAULT_STORAGE_GROW_UNIT,
    FALSE,
    HEADER_REGION,
    MIXED_TABLE_ENTRIES,
    MODERATE_BITMAP_SIZE,
    PAGE,
    PREFETCH_DISABLED,
    PROFILE_ENTRY_UNIT,
    SECTOR,
    TABLE_ENTRY,
    TRUE,
    FvdHeader,
    div_round_up,
    round_up,
)
from corefmt_fvd.options import FvdCreateOptions

#: Base bytes compared against zeros at once by the hole search.
HOLE_SCAN_READ = 1024 * 1024


def automatic_block_size(base_size: int) -> int:
    """4 KiB (a guest file system's block: its writes copy nothing), doubled
    while the bitmap would pass 4 MiB (the original's cap)."""
    block = DEFAULT_BLOCK_SIZE
    while div_round_up(div_round_up(base_size, block), 8) > MODERATE_BITMAP_SIZE:
        block *= 2
    return block


def bitmap_bytes(base_size: int, block_size: int) -> int:
    return round_up(div_round_up(div_round_up(base_size, block_size), 8), PAGE)


def journal_bytes(requested: int, table_entries: int) -> int:
    """The journal for a bitmap and/or table: the option (0: 16 MiB, < 0: none),
    at least enough sectors to journal every table entry once."""
    if requested < 0:
        return 0
    size = requested or DEFAULT_JOURNAL_SIZE
    if table_entries:
        size = max(size, div_round_up(table_entries, MIXED_TABLE_ENTRIES) * SECTOR)
    size = round_up(size, PAGE)
    if size > MAX_JOURNAL_BYTES:
        raise OptionError(f"a journal for {table_entries} chunks would pass 4 GiB: use a larger "
                          "chunk_size")
    return size


def apply_tuning(header: FvdHeader, tuning: Any) -> None:
    """Copy the prefetch tuning options that are given into the header."""
    pairs = (("max_outstanding_copy_on_read_data", "max_outstanding_copy_on_read_data"),
             ("max_num_outstanding_prefetch_writes", "num_prefetch_slots"),
             ("prefetch_min_read_throughput_threshold", "prefetch_min_read_throughput"),
             ("prefetch_min_write_throughput_threshold", "prefetch_min_write_throughput"),
             ("prefetch_perf_calc_alpha", "prefetch_perf_calc_alpha"),
             ("prefetch_read_throughput_measure_time", "prefetch_read_throughput_measure_time"),
             ("prefetch_write_throughput_measure_time",
              "prefetch_write_throughput_measure_time"),
             ("prefetch_over_threshold_throttle_time", "prefetch_throttle_time"))
    for option_name, field in pairs:
        value = getattr(tuning, option_name)
        if value is not None:
            setattr(header, field, value)
    if tuning.bytes_per_prefetch is not None:
        header.bytes_per_prefetch = round_up(tuning.bytes_per_prefetch, header.block_size)


def plan_header(size: int, options: FvdCreateOptions, backing: BackingRef | None,
                base_size: int | None) -> FvdHeader:
    """The header of a new image (``base_size``: the base's length, with a base)."""
    vsize = round_up(size, SECTOR)
    header = FvdHeader(virtual_disk_size=vsize, clean_shutdown=TRUE)
    header.need_zero_init = TRUE if backing is not None and options.detect_sparse_hole else FALSE
    header.data_file = options.data_file
    header.data_file_fmt = options.data_file_fmt
    bitmap_size = 0
    if backing is None:
        header.all_data_in_fvd_img = TRUE
    else:
        assert base_size is not None
        header.base_img = backing.path
        header.base_img_fmt = backing.format or ""
        header.base_img_size = round_up(min(vsize, base_size), SECTOR)
        block = options.block_size or automatic_block_size(header.base_img_size)
        header.block_size = block
        bitmap_size = bitmap_bytes(header.base_img_size, block)
        header.bitmap_offset = HEADER_REGION
        header.bitmap_size = bitmap_size
        header.max_outstanding_copy_on_read_data = DEFAULT_MAX_OUTSTANDING_COPY_ON_READ
        header.copy_on_read = TRUE if options.copy_on_read else FALSE
        header.prefetch_start_delay = options.prefetch_start_delay
        header.num_prefetch_slots = DEFAULT_PREFETCH_SLOTS
        header.bytes_per_prefetch = round_up(DEFAULT_BYTES_PER_PREFETCH, block)
        header.prefetch_throttle_time = DEFAULT_PREFETCH_THROTTLE_MS
        header.prefetch_read_throughput_measure_time = DEFAULT_MEASURE_MS
        header.prefetch_write_throughput_measure_time = DEFAULT_MEASURE_MS
        header.prefetch_perf_calc_alpha = DEFAULT_PERF_ALPHA
        header.prefetch_min_read_throughput = DEFAULT_MIN_THROUGHPUT_KBS
        header.prefetch_min_write_throughput = DEFAULT_MIN_THROUGHPUT_KBS
        header.prefetch_max_read_throughput = DEFAULT_MAX_THROUGHPUT_KBS
        header.prefetch_max_write_throughput = DEFAULT_MAX_THROUGHPUT_KBS
        header.unit_of_PrefetchProfileEntry_len = PROFILE_ENTRY_UNIT
        header.profile_directed_prefetch_start_delay = PREFETCH_DISABLED
        apply_tuning(header, options)
    table_size = entries = 0
    if options.compact_image:
        header.compact_image = TRUE
        header.chunk_size = options.chunk_size or DEFAULT_CHUNK_SIZE
        header.storage_grow_unit = max(options.storage_grow_unit or DEFAULT_STORAGE_GROW_UNIT,
                                       header.chunk_size)
        header.add_storage_cmd = options.add_storage_cmd
        entries = div_round_up(vsize, header.chunk_size)
        table_size = round_up(TABLE_ENTRY.size * entries, PAGE)
        header.table_offset = HEADER_REGION + bitmap_size
    journal = 0
    if bitmap_size or backing is not None or table_size:
        journal = journal_bytes(options.journal_size, entries)
        header.journal_offset = HEADER_REGION + bitmap_size + table_size
    header.journal_size = journal
    # The original also added an unused, unrounded journal_size to plain
    # images' metadata_size (spec §10 #11); here nothing is reserved for them.
    header.metadata_size = HEADER_REGION + bitmap_size + table_size + journal
    return header


def search_holes(base: Any, header: FvdHeader, hole: int) -> FvdBitmap:
    """Mark every zero piece of the base at least ``hole`` bytes long (rounded
    up to whole blocks) as in FVD; the whole base is scanned (the original
    skipped up to ``hole`` sectors at its end, spec §10 #17)."""
    block = header.block_size
    unit = round_up(max(hole, block), block)
    bitmap = FvdBitmap(bytes(header.bitmap_size), block, header.base_img_size)
    end = header.base_img_size
    for start in range(0, end, unit):
        stop = min(start + unit, end)
        if _reads_zero(base, start, stop):
            bitmap.set_range(start, stop - start)
    return bitmap


def _reads_zero(base: Any, start: int, stop: int) -> bool:
    for extent in base.block_status(start, stop - start):
        if extent.zero:
            continue
        for at in range(extent.offset, extent.end, HOLE_SCAN_READ):
            piece = base.read(at, min(HOLE_SCAN_READ, extent.end - at))
            if piece.count(0) != len(piece):
                return False
    return True

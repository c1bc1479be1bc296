"""Named points in FVD's update sequence (``context.emit``), for blkdebug
rules and power cuts inside the journal, its recycling and the close."""

from __future__ import annotations

JOURNAL_WRITE = "fvd_journal_write"
TABLE_UPDATE = "fvd_table_update"
BITMAP_UPDATE = "fvd_bitmap_update"
HEADER_UPDATE = "fvd_header_update"
DATA_BARRIER = "fvd_data_barrier"
CHUNK_ALLOC = "fvd_chunk_alloc"
COW_WRITE = "cow_write"
CLOSE_FLUSH = "fvd_close_flush"
#: Prefetch completion, just before all_data_in_fvd_img reaches the header.
PREFETCH_FINISH = "fvd_prefetch_finish"

ALL = (JOURNAL_WRITE, TABLE_UPDATE, BITMAP_UPDATE, HEADER_UPDATE, DATA_BARRIER, CHUNK_ALLOC,
       COW_WRITE, CLOSE_FLUSH, PREFETCH_FINISH)

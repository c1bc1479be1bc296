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

ALL = (JOURNAL_WRITE, TABLE_UPDATE, BITMAP_UPDATE, HEADER_UPDATE, DATA_BARRIER, CHUNK_ALLOC,
       COW_WRITE, CLOSE_FLUSH)

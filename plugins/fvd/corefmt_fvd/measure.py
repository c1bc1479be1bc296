"""qemu-img measure for FVD: the metadata ``plan_header`` lays out (header
region, bitmap, table and journal: what create writes), plus the data.

* Non-compact: data sector s lives at its own offset in the data region,
  so the data needed are the source's allocated bytes, in whole sectors
  (zero ranges need nothing: the region is sparse). Fully allocated: the
  whole virtual size.
* Compact: every chunk holding data of the source takes a whole chunk,
  and the storage grows in steps of the storage grow unit (at least one
  chunk, §4.2): ``n`` chunks need ``ceil(n * chunk / grow) * grow`` bytes
  of storage, the length the driver makes it. Fully allocated: every
  chunk of the table, grown the same way (so required never exceeds it).
* With ``backing_file`` the new image may share nothing with the source:
  all of it counts (as qcow2's measure does); the base is taken to be as
  large as the disk (the bitmap is then as large as it can be).
* A separate ``data_file`` does not change the sums: they are the bytes
  the image needs, its data file included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corefmt import MeasureResult
from corefmt.ops.convert import chain_extents
from corefmt_fvd.create import plan_header
from corefmt_fvd.layout import SECTOR, div_round_up, round_up

if TYPE_CHECKING:
    from corefmt import BackingRef
    from corefmt_fvd.options import FvdCreateOptions


def data_ranges(source: Any) -> list[tuple[int, int]]:
    """[start, end) byte ranges holding data anywhere in the source's chain."""
    ranges: list[tuple[int, int]] = []
    for extent in chain_extents(source):
        if extent.zero or not extent.data or extent.node is None:
            continue
        if ranges and ranges[-1][1] >= extent.offset:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], extent.end))
        else:
            ranges.append((extent.offset, extent.end))
    return ranges


def covered(ranges: list[tuple[int, int]], unit: int) -> int:
    """How many ``unit``-sized pieces the ranges touch (each counted once)."""
    count = 0
    last = -1  # the last piece counted
    for start, end in ranges:
        first, stop = start // unit, div_round_up(end, unit)
        first = max(first, last + 1)
        if stop > first:
            count += stop - first
            last = stop - 1
    return count


def grown_storage(chunks: int, chunk_size: int, grow: int) -> int:
    """The data storage after ``chunks`` allocations (it grows by ``grow``
    from empty whenever the next chunk does not fit)."""
    if chunks <= 0:
        return 0
    return div_round_up(chunks * chunk_size, grow) * grow


def measure(size: int, options: FvdCreateOptions, source: Any,
            backing: BackingRef | None = None) -> MeasureResult:
    options.validate(has_base=backing is not None)
    vsize = round_up(source.virtual_size if source is not None else size, SECTOR)
    header = plan_header(vsize, options, backing, vsize if backing is not None else None)
    metadata = header.metadata_size
    ranges = (data_ranges(source) if source is not None and backing is None
              else [(0, vsize)] if source is not None else [])
    if header.compact:
        chunk = header.chunk_size
        grow = max(header.storage_grow_unit, chunk)
        entries = header.table_entries
        required = grown_storage(covered(ranges, chunk), chunk, grow)
        fully = grown_storage(entries, chunk, grow)
    else:
        required = covered(ranges, SECTOR) * SECTOR
        fully = vsize
    return MeasureResult(required=metadata + required, fully_allocated=metadata + fully)

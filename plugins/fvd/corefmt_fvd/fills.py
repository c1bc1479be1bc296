"""FVD's copy-on-read and prefetch settings (spec §7) as the core's fill
policy, and prefetch completion (§7.2's "finish").

The header stores the tuning; the core's copy-on-read filter and
prefetcher run it. A zero field (an image made without a base, then
given one by amend) means the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt import CorefmtError
from corefmt.fills import COPY_ON_READ_ASYNC, FillPolicy, PrefetchTuning
from corefmt_fvd import events
from corefmt_fvd.layout import FALSE, TRUE, FvdHeader

if TYPE_CHECKING:
    from corefmt_fvd.image import FvdImage


def _or_default(value: int, default: int) -> int:
    return value if value > 0 else default


def fill_policy(header: FvdHeader) -> FillPolicy:
    defaults = PrefetchTuning()
    tuning = PrefetchTuning(
        slots=_or_default(header.num_prefetch_slots, defaults.slots),
        bytes_per_prefetch=_or_default(header.bytes_per_prefetch, defaults.bytes_per_prefetch),
        read_measure_ms=_or_default(header.prefetch_read_throughput_measure_time,
                                    defaults.read_measure_ms),
        write_measure_ms=_or_default(header.prefetch_write_throughput_measure_time,
                                     defaults.write_measure_ms),
        alpha_percent=(header.prefetch_perf_calc_alpha
                       if 0 < header.prefetch_perf_calc_alpha <= 100 else defaults.alpha_percent),
        min_read_kbs=_or_default(header.prefetch_min_read_throughput, defaults.min_read_kbs),
        min_write_kbs=_or_default(header.prefetch_min_write_throughput,
                                  defaults.min_write_kbs),
        throttle_ms=max(header.prefetch_throttle_time, 0))
    default_policy = FillPolicy()
    return FillPolicy(
        copy_on_read_mode=COPY_ON_READ_ASYNC,
        max_outstanding=_or_default(header.max_outstanding_copy_on_read_data,
                                    default_policy.max_outstanding),
        prefetch=tuning,
        prefetch_start_delay=(float(header.prefetch_start_delay)
                              if header.prefetch_start_delay > 0 else None))


def mark_self_contained(image: FvdImage) -> None:
    """Every bit to 1 (padding included), table and bitmap in place after
    the data, then all_data_in_fvd_img. A power cut before the header
    leaves a full bitmap over a base still opened but never read."""
    bitmap, header = image.bitmap, image.header
    if bitmap is None:
        return  # no base, or finished already
    if not bitmap.all_set(0, bitmap.blocks):
        raise CorefmtError(f"{image.context.path}: prefetch is not complete: blocks of "
                           "the base image are not in the FVD image yet")
    bitmap.bits[:] = b"\xff" * len(bitmap.bits)
    image._unpersisted_fills = True
    image._write_metadata()
    header.all_data_in_fvd_img = TRUE
    header.clean_shutdown = TRUE if image._on_disk_clean else FALSE
    image.context.emit(events.PREFETCH_FINISH)
    image.write_header()
    # From now on the base is not needed: no bitmap, every write takes the
    # fast path, and the image reports no backing to later opens.
    image.bitmap = None
    image._journaled = None
    image.base_size = 0
    image.backing = None

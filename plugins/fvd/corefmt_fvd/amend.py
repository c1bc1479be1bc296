"""qemu-img amend for FVD: what the 2011 driver's ``qemu-img update`` could
change (spec §8.6), each value checked before anything is written, then
the 4336-byte header rewritten in place.

Differences from ``qemu-img update``, and why:

* sizes are corefmt's (a number without a suffix is bytes; the 2011 update
  read it as KiB), rounded up to 512 bytes; growing only;
* a compact image grows only as far as its table region reaches before the
  next region (the original let the table spill into the journal, §10
  #10); the table region is rewritten (its padding EMPTY) before the
  header says the disk is larger. The bitmap and the base size stay as
  they are: sectors past the base are this image's;
* ``clean_shutdown=off`` stays set when the image is closed (the original's
  close set it back, §10 #15); ``clean_shutdown=on`` first writes the
  whole table and bitmap in place, so no journaled change is lost;
* ``base_img`` cannot be set on an image made without a base (no bitmap
  region) nor cleared while data is still read from the base;
  ``data_file`` cannot be set on an image that holds its data itself nor
  cleared; formats must be known; ``copy_on_read=on`` needs a base;
  ``max_outstanding_copy_on_read_data`` must be positive.
* qemu's generic ``backing_file`` / ``backing_fmt`` are ``base_img`` /
  ``base_img_fmt`` under their qemu names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corefmt import CorefmtError, OptionError, ReadOnlyError, plugins
from corefmt_fvd.header import MAX_TABLE_BYTES, MAX_VIRTUAL_SIZE
from corefmt_fvd.layout import (
    EMPTY_ENTRY,
    FALSE,
    MAX_CHUNK_ID,
    PAGE,
    SECTOR,
    TABLE_ENTRY,
    TRUE,
    div_round_up,
    round_up,
)
from corefmt_fvd.options import FvdAmendOptions

if TYPE_CHECKING:
    from corefmt_fvd.image import FvdImage

#: Amend option -> header field, for the copy-on-read and prefetch tuning.
TUNING_FIELDS = (
    ("max_outstanding_copy_on_read_data", "max_outstanding_copy_on_read_data"),
    ("max_num_outstanding_prefetch_writes", "num_prefetch_slots"),
    ("bytes_per_prefetch", "bytes_per_prefetch"),
    ("prefetch_min_read_throughput_threshold", "prefetch_min_read_throughput"),
    ("prefetch_min_write_throughput_threshold", "prefetch_min_write_throughput"),
    ("prefetch_perf_calc_alpha", "prefetch_perf_calc_alpha"),
    ("prefetch_read_throughput_measure_time", "prefetch_read_throughput_measure_time"),
    ("prefetch_write_throughput_measure_time", "prefetch_write_throughput_measure_time"),
    ("prefetch_over_threshold_throttle_time", "prefetch_throttle_time"),
    ("prefetch_start_delay", "prefetch_start_delay"),
)


class AmendError(CorefmtError):
    """The amendment was refused; nothing was written."""


def amend_image(image: FvdImage, options: FvdAmendOptions | None, *, size: int | None = None,
                backing: tuple[str | None, str | None] | None = None) -> None:
    """Amend an open image (the caller holds its lock). ``size`` and
    ``backing`` are qemu's generic amend options (``backing``:
    ``(backing_file, backing_fmt)``, None for one not given)."""
    if image.context.read_only:
        raise ReadOnlyError(f"{image.context.path}: cannot amend an image opened read-only")
    options = options if options is not None else FvdAmendOptions()
    try:
        options.validate()
    except OptionError as error:
        raise AmendError(str(error)) from None
    header = image.header
    changes: dict[str, Any] = {}

    base_img, base_img_fmt = options.base_img, options.base_img_fmt
    if backing is not None:
        base_img = _same("base_img", "backing_file", base_img, backing[0])
        base_img_fmt = _same("base_img_fmt", "backing_fmt", base_img_fmt, backing[1])
    if base_img is not None and base_img != header.base_img:
        if not header.bitmap_size:
            raise AmendError("fvd: base_img cannot be set: the image was created without a "
                             "base image (it has no bitmap)")
        if not base_img and not header.all_data_in_fvd_img:
            raise AmendError("fvd: base_img cannot be cleared while the image still reads "
                             "data from its base (all_data_in_fvd_img is off)")
        changes["base_img"] = base_img
    if base_img_fmt is not None and base_img_fmt != header.base_img_fmt:
        if not header.bitmap_size:
            raise AmendError("fvd: base_img_fmt cannot be set: the image was created without "
                             "a base image")
        _known_format("base_img_fmt", base_img_fmt)
        changes["base_img_fmt"] = base_img_fmt

    if options.data_file is not None and options.data_file != header.data_file:
        if not header.data_file:
            raise AmendError("fvd: data_file can only be set for images that keep their data "
                             "in a separate data file")
        if not options.data_file:
            raise AmendError("fvd: data_file cannot be cleared (the data are in it)")
        changes["data_file"] = options.data_file
    if options.data_file_fmt is not None and options.data_file_fmt != header.data_file_fmt:
        if not header.data_file:
            raise AmendError("fvd: data_file_fmt needs an image with a separate data file")
        _known_format("data_file_fmt", options.data_file_fmt)
        changes["data_file_fmt"] = options.data_file_fmt

    if options.need_zero_init is not None:
        changes["need_zero_init"] = TRUE if options.need_zero_init else FALSE
    if options.copy_on_read is not None:
        if options.copy_on_read and not header.bitmap_size:
            raise AmendError("fvd: copy_on_read needs a base image")
        changes["copy_on_read"] = TRUE if options.copy_on_read else FALSE

    for option, field in TUNING_FIELDS:
        value = getattr(options, option)
        if value is None:
            continue
        if option == "max_outstanding_copy_on_read_data" and value <= 0:
            raise AmendError("fvd: max_outstanding_copy_on_read_data must be positive")
        if option == "bytes_per_prefetch" and header.block_size > 0:
            value = round_up(value, header.block_size)
        changes[field] = value

    target = None
    if size is not None:
        target = planned_size(image, size)

    # Everything is checked: now the changes.
    if options.clean_shutdown is not None and options.clean_shutdown:
        image._write_metadata()  # nothing only the journal holds stays there
        image.stay_unclean = False
    elif options.clean_shutdown is not None:
        image.stay_unclean = True
    for field, value in changes.items():
        setattr(header, field, value)
    if target is not None and target != image.virtual_size:
        _grow(image, target)
    header.clean_shutdown = _clean_flag(image, options.clean_shutdown)
    image.write_header()


def _same(name: str, generic: str, value: str | None, other: str | None) -> str | None:
    if other is None:
        return value
    if value is not None and value != other:
        raise AmendError(f"fvd: {name}={value} and {generic}={other} disagree")
    return other


def _known_format(name: str, value: str) -> None:
    if value and value not in plugins.registry().formats:
        raise AmendError(f"fvd: {name}: unknown format '{value}'")


def _clean_flag(image: FvdImage, asked: bool | None) -> int:
    """clean_shutdown as the header is written: as asked, else as it is on
    disk (a header rewrite never marks an image clean on its own)."""
    if asked is not None:
        return TRUE if asked else FALSE
    if image.stay_unclean:
        return FALSE
    return TRUE if image._on_disk_clean else FALSE


# -- size -----------------------------------------------------------------------------
def max_size(image: FvdImage) -> int:
    """The largest virtual size the image can take."""
    header = image.header
    if not header.compact:
        return MAX_VIRTUAL_SIZE
    start = header.table_offset
    following = [header.metadata_size]
    if header.journal_size:
        following.append(header.journal_offset)
    if header.has_bitmap or header.bitmap_size:
        following.append(header.bitmap_offset)
    room = min((offset for offset in following if offset > start), default=start) - start
    entries = min(room // PAGE * PAGE, MAX_TABLE_BYTES) // TABLE_ENTRY.size
    entries = min(entries, MAX_CHUNK_ID + 1)
    return min(entries * header.chunk_size // SECTOR * SECTOR, MAX_VIRTUAL_SIZE)


def planned_size(image: FvdImage, size: int) -> int:
    """The new virtual size for ``size`` (rounded up to 512), or a refusal."""
    target = round_up(size, SECTOR)
    if target < image.virtual_size:
        raise AmendError(f"fvd: shrinking is not supported (the virtual size is "
                         f"{image.virtual_size} bytes, {target} asked for)")
    limit = max_size(image)
    if target > limit:
        header = image.header
        if header.compact:
            raise AmendError(
                f"fvd: a compact image with {header.chunk_size}-byte chunks can grow to "
                f"{limit} bytes at most: its table region ({header.table_offset}.."
                f"{header.table_offset + limit // header.chunk_size * TABLE_ENTRY.size}) "
                "cannot reach into the next region")
        raise AmendError(f"fvd: the virtual size can be {limit} bytes at most")
    return target


def resize(image: FvdImage, size: int) -> None:
    """Grow the virtual disk (Image.truncate; the caller holds the lock)."""
    if image.context.read_only:
        raise ReadOnlyError(f"{image.context.path}: cannot resize an image opened read-only")
    target = planned_size(image, size)
    if target == image.virtual_size:
        return
    _grow(image, target)
    image.header.clean_shutdown = _clean_flag(image, None)
    image.write_header()


def _grow(image: FvdImage, target: int) -> None:
    """Everything but the header for a larger disk: new chunks are EMPTY
    (written to the table region first), and a plain image's data region
    reads zeros past the old end."""
    header = image.header
    old = image.virtual_size
    table = image.table
    if table is not None:
        entries = div_round_up(target, image.chunk_size)
        table.entries.extend([EMPTY_ENTRY] * (entries - len(table)))
        # The new table region (padding included) is on disk before the
        # header makes the new entries part of the table.
        image._write_metadata()
    else:
        data = image.data
        start, end = image.data_offset + old, image.data_offset + target
        length = min(data.size(), end) - start
        if length > 0:  # bytes past the old end (none a write put there) read as zeros
            data.write_zero_bytes(start, length)
        if header.data_file and data.size() < end:
            data.truncate(end)  # a separate data file is as long as the disk, as at create
        data.flush()
    header.virtual_disk_size = target
    image.virtual_size = target

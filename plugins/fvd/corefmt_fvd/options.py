"""FVD's create, open and amend options, under the 2011 driver's names
(``qemu-img create -f fvd`` and ``qemu-img update``)."""

from __future__ import annotations

from typing import Any

import attrs

from corefmt import OptionError, choice, option, to_bool, to_size
from corefmt.options import KIND_BOOL
from corefmt_fvd.header import MAX_JOURNAL_BYTES
from corefmt_fvd.layout import (
    COMMAND_FIELD,
    FORMAT_FIELD,
    PAGE,
    PATH_FIELD,
    SECTOR,
)

#: Largest block or chunk size accepted (a bitmap bit or table entry per unit).
MAX_UNIT = 1 << 30
#: ``bytes_per_prefetch`` below this is refused (``qemu-img update``'s rule).
MIN_BYTES_PER_PREFETCH = 4096
MAX_INT32 = 2**31 - 1


def _unit_size(name: str, multiple: int) -> Any:
    def convert(value: Any) -> int:
        size = to_size(value)
        if size < 0 or size > MAX_UNIT:
            raise OptionError(f"{name} must be between 0 and {MAX_UNIT} bytes")
        return -(-size // multiple) * multiple
    return convert


def _journal_size(value: Any) -> int:
    """A size, or a negative number: no journal (what the original's -1 did)."""
    text = str(value).strip()
    if text.startswith("-"):
        try:
            number = int(text)
        except ValueError:
            raise OptionError(f"journal_size expects a size or -1, not '{text}'") from None
        return -1 if number < 0 else number
    size = to_size(value)
    if size > MAX_JOURNAL_BYTES:
        raise OptionError("journal_size must be at most 4 GiB")
    return size


def _number(name: str, low: int, high: int = MAX_INT32) -> Any:
    def convert(value: Any) -> int:
        try:
            number = int(str(value), 0)
        except ValueError:
            raise OptionError(f"Parameter '{name}' expects a number, not '{value}'") from None
        if not low <= number <= high:
            raise OptionError(f"{name} must be between {low} and {high}")
        return number
    return convert


def _delay(value: Any) -> int:
    """Seconds; anything <= 0 disables prefetch (stored as -1)."""
    try:
        number = int(str(value), 0)
    except ValueError:
        raise OptionError(f"Parameter 'prefetch_start_delay' expects a number of seconds, "
                          f"not '{value}'") from None
    return min(number, MAX_INT32) if number > 0 else -1


def _string(name: str, limit: int) -> Any:
    def check(_instance: object, _attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and len(str(value).encode("utf-8", "surrogateescape")) >= limit:
            raise OptionError(f"{name} is longer than {limit - 1} bytes")
    return check


def _tuning_number(name: str, help: str, low: int, high: int = MAX_INT32) -> Any:
    return option(None, help, converter=attrs.converters.optional(_number(name, low, high)),
                  kind="num")


def _tuning_size(name: str, help: str, multiple: int) -> Any:
    return option(None, help, converter=attrs.converters.optional(_unit_size(name, multiple)),
                  kind="size")


@attrs.frozen
class PrefetchTuning:
    """The copy-on-read and prefetch tuning fields (create and amend share
    them; None keeps the default or the stored value)."""

    max_outstanding_copy_on_read_data: int | None = _tuning_size(
        "max_outstanding_copy_on_read_data", "Bytes of copy-on-read data in flight at most", 1)
    max_num_outstanding_prefetch_writes: int | None = _tuning_number(
        "max_num_outstanding_prefetch_writes", "Prefetch pipeline depth (slots)", 1)
    bytes_per_prefetch: int | None = _tuning_size(
        "bytes_per_prefetch", "Bytes read from the base per prefetch step", SECTOR)
    prefetch_min_read_throughput_threshold: int | None = _tuning_number(
        "prefetch_min_read_throughput_threshold",
        "Prefetch pauses below this base read throughput (KB/s)", 0)
    prefetch_min_write_throughput_threshold: int | None = _tuning_number(
        "prefetch_min_write_throughput_threshold",
        "Prefetch pauses below this write throughput (KB/s)", 0)
    prefetch_perf_calc_alpha: int | None = _tuning_number(
        "prefetch_perf_calc_alpha", "Weight of the old average in throughput estimates "
        "(0-100)", 0, 100)
    prefetch_read_throughput_measure_time: int | None = _tuning_number(
        "prefetch_read_throughput_measure_time", "Milliseconds per read throughput sample", 1)
    prefetch_write_throughput_measure_time: int | None = _tuning_number(
        "prefetch_write_throughput_measure_time", "Milliseconds per write throughput sample",
        1)
    prefetch_over_threshold_throttle_time: int | None = _tuning_number(
        "prefetch_over_threshold_throttle_time", "Milliseconds prefetch pauses when "
        "throughput is too low (<= 0: no throttling)", -MAX_INT32)


def _check_tuning(options: Any) -> None:
    value = options.bytes_per_prefetch
    if value is not None and value < MIN_BYTES_PER_PREFETCH:
        raise OptionError(f"bytes_per_prefetch must be at least {MIN_BYTES_PER_PREFETCH}")


@attrs.frozen
class FvdCreateOptions(PrefetchTuning):
    compact_image: bool = option(False, "Compact image: storage allocated in chunks through "
                                 "a one-level table", converter=to_bool)
    block_size: int = option(0, "Copy-on-write unit of the bitmap (0: automatic, 64 KiB or "
                             "larger)", converter=_unit_size("block_size", SECTOR),
                             kind="size")
    chunk_size: int = option(0, "Storage allocation unit of a compact image (0: 1 MiB)",
                             converter=_unit_size("chunk_size", PAGE), kind="size")
    storage_grow_unit: int = option(0, "Bytes a compact image's storage grows by (0: 100 MiB)",
                                    converter=_unit_size("storage_grow_unit", 1), kind="size")
    add_storage_cmd: str = option("", "Command that enlarges the storage of a compact image "
                                  "on a device (or builtin:lvextend)",
                                  validator=_string("add_storage_cmd", COMMAND_FIELD))
    data_file: str = option("", "Store data in this separate file",
                            validator=_string("data_file", PATH_FIELD))
    data_file_fmt: str = option("", "Format of the data file (empty: raw)",
                                validator=_string("data_file_fmt", FORMAT_FIELD))
    copy_on_read: bool = option(False, "Copy data read from the base image into this image",
                                converter=to_bool)
    prefetch_start_delay: int = option(-1, "Seconds before the whole base image is "
                                       "prefetched (<= 0: never)", converter=_delay,
                                       kind="num")
    detect_sparse_hole: int = option(0, "Mark base regions of zeros at least this long as "
                                     "already copied (0: off)",
                                     converter=_unit_size("detect_sparse_hole", 1),
                                     kind="size")
    journal_size: int = option(0, "Journal size (0: 16 MiB; -1: no journal)",
                               converter=_journal_size, kind="size")

    def validate(self, has_base: bool) -> None:
        if self.detect_sparse_hole and self.compact_image:
            raise OptionError("detect_sparse_hole cannot be used with compact_image")
        if not has_base:
            given = [name for name in ("detect_sparse_hole", "copy_on_read")
                     if getattr(self, name)]
            given += [field.name for field in attrs.fields(PrefetchTuning)
                      if getattr(self, field.name) is not None]
            if self.prefetch_start_delay > 0:
                given.append("prefetch_start_delay")
            if given:
                raise OptionError(f"{given[0]} needs a base image (-b): an image without "
                                  "one has nothing to copy or prefetch")
        if self.data_file_fmt and not self.data_file:
            raise OptionError("data_file_fmt needs data_file")
        if self.add_storage_cmd and not self.compact_image:
            raise OptionError("add_storage_cmd is only used by compact images")
        _check_tuning(self)


@attrs.frozen
class FvdOpenOptions:
    journal_commit: str = option(
        "flush", "When journal records are written: at the guest's flush (flush) or at "
        "every write (write)", validator=choice("flush", "write"))
    allow_add_storage_cmd: bool = option(
        False, "Run the image's add_storage_cmd to grow its storage (a command stored in "
        "an image is untrusted: off unless asked for)", converter=to_bool)


@attrs.frozen
class FvdAmendOptions(PrefetchTuning):
    """What ``qemu-img update`` could change in an FVD header (§8.6)."""

    base_img: str | None = option(None, "Base image path (the base must hold the same data)",
                                  validator=_string("base_img", PATH_FIELD))
    base_img_fmt: str | None = option(None, "Base image format",
                                      validator=_string("base_img_fmt", FORMAT_FIELD))
    data_file: str | None = option(None, "Separate data file path",
                                   validator=_string("data_file", PATH_FIELD))
    data_file_fmt: str | None = option(None, "Format of the data file",
                                       validator=_string("data_file_fmt", FORMAT_FIELD))
    need_zero_init: bool | None = option(None, "Storage must read unwritten areas as zeros",
                                         converter=attrs.converters.optional(to_bool),
                                         kind=KIND_BOOL)
    copy_on_read: bool | None = option(None, "Copy data read from the base image into this "
                                       "image", converter=attrs.converters.optional(to_bool),
                                       kind=KIND_BOOL)
    clean_shutdown: bool | None = option(None, "The image was closed cleanly",
                                         converter=attrs.converters.optional(to_bool),
                                         kind=KIND_BOOL)
    prefetch_start_delay: int | None = option(
        None, "Seconds before the whole base image is prefetched (<= 0: never)",
        converter=attrs.converters.optional(_delay), kind="num")

    def validate(self) -> None:
        _check_tuning(self)

"""``info``'s format-specific data, with qemu-img 7.2's keys in its order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corefmt_qcow2.layout import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    VERSION_2,
)

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image

COMPAT_NAMES = {VERSION_2: "0.10"}
COMPRESSION_BY_NUMBER = {number: name for name, number in COMPRESSION_NAMES.items()}


def format_specific(image: Qcow2Image) -> dict[str, Any]:
    header = image.header
    data: dict[str, Any] = {"compat": COMPAT_NAMES.get(header.version, "1.1"),
                            "compression-type": COMPRESSION_BY_NUMBER[header.compression_type]}
    if header.version == VERSION_2:
        data["refcount-bits"] = header.refcount_bits
        return data
    data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    bitmaps = image.bitmaps.directory_info()
    if bitmaps:
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = header.refcount_bits
    if image.has_data_file:
        data["data-file"] = header.data_file
        data["data-file-raw"] = image.data_file_raw
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["extended-l2"] = image.extended
    return data

"""FVD's format-specific ``info`` fields (qemu-img's ``format-specific`` data)."""

from __future__ import annotations

from typing import Any


def format_specific(image: Any) -> dict[str, Any]:
    header = image.header
    data: dict[str, Any] = {
        "version": header.version,
        "clean-shutdown": not image.opened_unclean,
        "all-data-in-fvd-img": bool(header.all_data_in_fvd_img),
        "metadata-size": header.metadata_size,
    }
    if header.base_img:
        data["base-img-size"] = header.base_img_size
        data["block-size"] = header.block_size
        data["bitmap-offset"] = header.bitmap_offset
        data["bitmap-size"] = header.bitmap_size
        data["copy-on-read"] = bool(header.copy_on_read)
        data["prefetch-start-delay"] = header.prefetch_start_delay
        data["need-zero-init"] = bool(header.need_zero_init)
    data["compact-image"] = bool(header.compact)
    if header.compact:
        data["chunk-size"] = header.chunk_size
        data["table-offset"] = header.table_offset
        data["storage-grow-unit"] = header.storage_grow_unit
        data["used-chunks"] = image.used_chunks
        if header.add_storage_cmd:
            data["add-storage-cmd"] = header.add_storage_cmd
    data["journal-offset"] = header.journal_offset
    data["journal-size"] = header.journal_size
    if header.data_file:
        data["data-file"] = header.data_file
        data["data-file-format"] = header.data_file_fmt or "raw"
    return data

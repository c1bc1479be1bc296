"""preallocation=metadata / falloc / full: every cluster mapped at create
time, its space reserved (falloc) or written with zeros (full)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt_qcow2.layout import OFLAG_COPIED, div_round_up

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image


def preallocate(image: Qcow2Image, mode: str) -> None:
    """Map every cluster of the (new, empty) image. With extended L2 entries
    the subclusters stay unallocated, as qemu 7.2 leaves them: the clusters
    are reserved, reads still go below (to the backing file, or zeros)."""
    cs, epl = image.cluster_size, image.l2_entries
    clusters = div_round_up(image.virtual_size, cs)
    bitmap = 0 if image.extended else None
    ranges: list[tuple[int, int]] = []
    with image.lock:
        for l1_index in range(div_round_up(clusters, epl)):
            first = l1_index * epl
            count = min(epl, clusters - first)
            table = image.writable_l2(l1_index)
            host = image.allocate_data(first, count)
            with image.l2_cache.get(table) as handle:
                for index in range(count):
                    image.set_entry(handle, index, (host + index * cs) | OFLAG_COPIED, bitmap)
            ranges.append((host, count * cs))
        image.flush_locked()
    data = image.data
    if image.has_data_file:
        ranges = [(0, image.virtual_size)]
    end = max(host + length for host, length in ranges) if ranges else 0
    if mode == "metadata":
        if data.size() < end:
            data.truncate(end)
        return
    for host, length in ranges:
        if mode == "falloc":
            if not data.preallocate(host, length):
                data.write_zero_bytes(host, length)
        else:
            data.write_zero_bytes(host, length)
    if data.size() < end:
        data.truncate(end)
    data.flush()

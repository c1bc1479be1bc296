"""preallocation=metadata / falloc / full: every cluster mapped at create
time (or the grown part at a resize), its space reserved (falloc) or written
with zeros (full)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt_qcow2.layout import OFLAG_COPIED, div_round_up

if TYPE_CHECKING:
    from corefmt_qcow2.image import Qcow2Image


def preallocate(image: Qcow2Image, mode: str, start: int = 0) -> None:
    """Map every cluster from guest offset ``start`` on that maps nothing yet
    (all of a new image; the grown part after a resize, as qemu's
    preallocate_co). With extended L2 entries the subclusters stay
    unallocated, as qemu 7.2 leaves them: the clusters are reserved, reads
    still go below (to the backing file, or zeros)."""
    cs, epl = image.cluster_size, image.l2_entries
    clusters = div_round_up(image.virtual_size, cs)
    bitmap = 0 if image.extended else None
    ranges: list[tuple[int, int]] = []
    with image.lock:
        for first, count in _unmapped_runs(image, start // cs, clusters):
            table = image.writable_l2(first // epl)
            host = image.allocate_data(first, count)
            with image.l2_cache.get(table) as handle:
                for index in range(count):
                    image.set_entry(handle, first % epl + index,
                                    (host + index * cs) | OFLAG_COPIED, bitmap)
            ranges.append((host, count * cs))
        image.flush_locked()
    data = image.data
    if image.has_data_file:
        ranges = [(start, image.virtual_size - start)] if image.virtual_size > start else []
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


def _unmapped_runs(image: Qcow2Image, first: int, end: int) -> list[tuple[int, int]]:
    """(first cluster, count) runs of clusters in [first, end) that map
    nothing, none crossing an L2 table."""
    runs: list[tuple[int, int]] = []
    epl = image.l2_entries
    cluster = first
    while cluster < end:
        table_end = min(end, (cluster // epl + 1) * epl)
        if image.entry(cluster)[0]:
            cluster += 1
            continue
        run_end = cluster + 1
        while run_end < table_end and not image.entry(run_end)[0]:
            run_end += 1
        runs.append((cluster, run_end - cluster))
        cluster = run_end
    return runs

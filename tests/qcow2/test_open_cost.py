"""What a read-only open and a block status cost a qcow2 layer: a chain of
hundreds of overlays pays it once per layer, so neither may read more than
the header cluster and the tables in use."""

from __future__ import annotations

import subprocess

import pytest
from corefmt_qcow2.header import HEADER_PROBE_READ, read_header_cluster

import corefmt

KiB = 1024
MiB = 1024 * KiB


class _CountingStorage:
    """Just what read_header_cluster uses of a Storage, counting reads."""

    def __init__(self, data: bytes):
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset:offset + length]


def _qcow2_bytes(tmp_path, *options: str, data_mib: int = 3) -> bytes:
    path = tmp_path / "image.qcow2"
    corefmt.create(str(path), "qcow2", 64 * MiB, options=dict(
        option.split("=") for option in options))
    with corefmt.open(str(path), "qcow2") as disk:
        disk.write(0, b"x" * data_mib * MiB)
    return path.read_bytes()


@pytest.mark.parametrize(("cluster_size", "expected"), [
    (512, [HEADER_PROBE_READ]),
    (65536, [HEADER_PROBE_READ, 65536]),
    (2 * MiB, [HEADER_PROBE_READ, 2 * MiB]),
])
def test_only_cluster_0_is_read_for_the_header(tmp_path, cluster_size, expected):
    raw = _qcow2_bytes(tmp_path, f"cluster_size={cluster_size}")
    assert len(raw) > 3 * MiB  # more than the largest cluster 0
    storage = _CountingStorage(raw)
    header = read_header_cluster(storage, len(raw))
    assert [length for _, length in storage.reads] == expected
    assert header == raw[:max(expected[-1], min(len(raw), HEADER_PROBE_READ))]


def test_a_short_file_is_read_as_it_is(tmp_path):
    storage = _CountingStorage(b"QFI\xfb" + bytes(30))
    assert read_header_cluster(storage, 34) == b"QFI\xfb" + bytes(30)
    assert storage.reads == [(0, 34)]


@pytest.mark.interop
def test_block_status_of_a_read_only_overlay_does_not_read_refcounts(tmp_path):
    """An overlay qemu wrote (as in a long chain qemu built): its file holds
    no more clusters than it occupies, so it cannot look preallocated."""
    base = tmp_path / "base.raw"
    corefmt.create(str(base), "raw", 8 * MiB)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(top), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 1M 128k", str(top)], check=True,
                   stdout=subprocess.DEVNULL)
    with corefmt.open(str(top), read_only=True) as node:
        extents = node.block_status(0, 8 * MiB)
        assert any(extent.data and extent.depth == 0 for extent in extents)
        assert node.image._refcounts is None


@pytest.mark.interop
def test_metadata_preallocation_is_still_detected(tmp_path):
    """qemu's heuristic reads refcounts when the file is sparse enough to
    hold more refcounted clusters than it occupies: a preallocated cluster
    over a hole reads as zeros (map says zero, not data)."""
    path = tmp_path / "pre.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "preallocation=metadata", str(path), "16M"], check=True)
    with corefmt.open(str(path), read_only=True) as node:
        (extent,) = node.block_status(0, 16 * MiB)
        assert extent.zero and extent.depth == 0
        assert node.image._refcounts is not None

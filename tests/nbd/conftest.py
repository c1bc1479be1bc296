"""Fixtures: a small raw image with data and holes, served in-process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from corefmt.block.chain import open_chain
from corefmt.nbd import Export, NbdServer

MiB = 1024 * 1024
IMAGE_SIZE = 4 * MiB
#: (offset, length, byte) runs written into the test image; the rest is holes.
DATA_RUNS = ((0, 64 * 1024, 0xAA), (MiB, 4096, 0x11), (3 * MiB, 128 * 1024, 0x5C))


def expected_bytes() -> bytes:
    buf = bytearray(IMAGE_SIZE)
    for offset, length, value in DATA_RUNS:
        buf[offset:offset + length] = bytes([value]) * length
    return bytes(buf)


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as stream:
        stream.truncate(IMAGE_SIZE)
        for offset, length, value in DATA_RUNS:
            stream.seek(offset)
            stream.write(bytes([value]) * length)
    return path


@contextlib.contextmanager
def served(path: Path | str, format: str | None = "raw", *, read_only: bool = False,
           copy_on_read: bool = False, **options) -> Iterator[NbdServer]:
    """The image served on a free port (persistent unless told otherwise)."""
    server_options = {key: options.pop(key) for key in
                      ("persistent", "unix_socket", "handshake_limit") if key in options}
    server_options.setdefault("persistent", True)
    options.setdefault("allocation_depth", False)  # as qemu-nbd without -A
    with open_chain(str(path), format, read_only=read_only,
                    copy_on_read=copy_on_read) as node:
        export = Export(node, read_only=read_only, **options)
        with NbdServer(export, port=0, **server_options) as server:
            yield server

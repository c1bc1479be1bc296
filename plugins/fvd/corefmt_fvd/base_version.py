"""corefmt's record of a remote base's version, in the unused end of the
header region (bytes 4336 to 8191, which the original neither reads nor
writes: it reads and writes the 4336-byte header only, and puts the bitmap
at 8192).

The record holds the base name it was made for, so that a record left by an
earlier base (renamed by a tool that knows nothing of it) is stale, not
evidence: ``BackingRef.identity`` is taken from it only when the name is
the header's ``base_img``.

    offset 4336  u32  magic 0x43464249 ("CFBI")
           4340  u32  length of what follows
           4344  ...  base name (UTF-8), NUL, version (``Storage.version_token``)
"""

from __future__ import annotations

import struct

from corefmt.driver import recorded_version, version_record
from corefmt.storage.base import Storage
from corefmt_fvd.layout import HEADER_REGION, HEADER_SIZE

RECORD_OFFSET = HEADER_SIZE
RECORD_MAGIC = 0x43464249
RECORD_HEAD = struct.Struct("<II")
MAX_RECORD_BYTES = HEADER_REGION - RECORD_OFFSET - RECORD_HEAD.size


def pack_record(base_img: str, identity: str | None) -> bytes:
    """The record for ``base_img`` (zeros, meaning no record, without an
    identity or where it does not fit)."""
    body = version_record(base_img, identity)
    if body is None or len(body) > MAX_RECORD_BYTES:
        return bytes(RECORD_HEAD.size)
    return RECORD_HEAD.pack(RECORD_MAGIC, len(body)) + body


def read_record(storage: Storage, base_img: str) -> str | None:
    """The recorded version of ``base_img``, or None (no record, another
    base's, or not a record at all)."""
    magic, length = RECORD_HEAD.unpack(storage.read(RECORD_OFFSET, RECORD_HEAD.size))
    if magic != RECORD_MAGIC or length > MAX_RECORD_BYTES:
        return None
    return recorded_version(storage.read(RECORD_OFFSET + RECORD_HEAD.size, length), base_img)


def write_record(storage: Storage, base_img: str, identity: str | None) -> None:
    """Replace the record, durably (after the header that names the base:
    a crash between leaves a stale record, which is ignored)."""
    record = pack_record(base_img, identity)
    old_magic, old_length = RECORD_HEAD.unpack(storage.read(RECORD_OFFSET, RECORD_HEAD.size))
    if old_magic == RECORD_MAGIC and old_length <= MAX_RECORD_BYTES:
        record = record.ljust(RECORD_HEAD.size + old_length, b"\0")  # no old tail left
    storage.write(RECORD_OFFSET, record)
    storage.flush()

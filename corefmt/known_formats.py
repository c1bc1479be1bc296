"""Formats QEMU knows, recognised by QEMU's own probe rules, so that an image
no installed plugin reads is refused instead of being read as raw.

Probing falls back to raw for anything no plugin claims. Without this table a
qcow2 would be converted as its container bytes, a vmdk's size misreported and
a backing chain hidden, and a guest that writes a qcow2 header into a probed
raw image would have the next probing open read its "backing file" (any host
file) for it. Each rule below is what QEMU 7.2's ``bdrv_probe`` function of
that driver tests, with QEMU's score; QEMU probes the first
:data:`QEMU_PROBE_SIZE` bytes, zero-padded past the end of the file, and an
empty file is raw without probing. A plugin for a format always wins: its
probe is consulted first and an equal score goes to it.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from corefmt.driver import PROBE_CERTAIN, PROBE_NO
from corefmt.errors import StorageError, UnknownFormatError

if TYPE_CHECKING:
    from corefmt.driver import FormatDriver
    from corefmt.registry import Registry
    from corefmt.storage.base import Storage

#: qemu's BLOCK_PROBE_BUF_SIZE: the bytes its probes see (the rest is zeros).
QEMU_PROBE_SIZE = 512
#: qemu's scores: 100 for a magic number, 2 where the evidence is weak.
SCORE_MAGIC = PROBE_CERTAIN
SCORE_WEAK = 2

_BE32 = struct.Struct(">I")
_LE32 = struct.Struct("<I")
_BE16 = struct.Struct(">H")

# qcow (v1) and qcow2 share the magic; the version tells them apart (block/qcow*.c).
QCOW_MAGIC = b"QFI\xfb"
QCOW_VERSION_OFFSET = 4
QCOW1_VERSION = 1
QCOW2_MIN_VERSION = 2
# vmdk (block/vmdk.c): VMDK3 "COWD", VMDK4 "KDMV" (hosted sparse, stream-optimized),
# or a text descriptor whose first line that is not a comment or blank is "version=N".
VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
VMDK_COMMENT = ord("#")
VMDK_BLANK = ord(" ")
VMDK_VERSION_LINES = tuple(f"version={n}{end}".encode() for n in (1, 2, 3)
                           for end in ("\n", "\r\n"))
# vpc (block/vpc.c): the footer copy at offset 0 of a dynamic or differencing VHD.
# A fixed VHD has its footer only at the end, which qemu does not probe: it is raw.
VPC_MAGIC = b"conectix"
VHDX_MAGIC = b"vhdxfile"  # block/vhdx.c: the file type identifier
# vdi (block/vdi.c): a little-endian signature after the 64-byte text banner.
VDI_SIGNATURE = 0xBEDA107F
VDI_SIGNATURE_OFFSET = 0x40
QED_MAGIC = b"QED\0"  # block/qed.c: 'Q' 'E' 'D' 0, little-endian
# luks (crypto/block-luks.c): magic plus a big-endian version that qemu 7.2 reads (1).
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION_OFFSET = 6
LUKS_VERSION = 1
# parallels (block/parallels.c): one of two 16-byte magics, little-endian version 2.
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
PARALLELS_VERSION_OFFSET = 16
PARALLELS_VERSION = 2
# bochs (block/bochs.c): NUL-terminated strings in fixed fields, growing redolog only.
BOCHS_MAGIC = (0, b"Bochs Virtual HD Image\0")
BOCHS_TYPE = (32, b"Redolog\0")
BOCHS_SUBTYPE = (48, b"Growing\0")
BOCHS_VERSION_OFFSET = 64
BOCHS_VERSIONS = (0x00020000, 0x00010000)
# cloop (block/cloop.c): the V2.0 shell-script preamble; weak evidence.
CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
# dmg (block/dmg.c): qemu probes by name alone (weakly); corefmt also asks for the
# "koly" UDIF trailer where qemu's open looks for it: starting in the last 511
# bytes of the second-last 512-byte block or the first 4 of the last one.
DMG_SUFFIX = ".dmg"
DMG_TRAILER_MAGIC = b"koly"
DMG_MIN_SIZE = 512
DMG_TRAILER_SEARCH_BACK = 511 + 512
DMG_TRAILER_SEARCH_LENGTH = 515


@attrs.frozen
class KnownFormat:
    """One QEMU format: its name (qemu's ``-f`` name), score and probe rule.

    ``matches(buf, path, trailer)`` gets the padded first sector, the path (or
    None) and the dmg trailer search window (empty unless read).
    """

    name: str
    score: int
    matches: Callable[[bytes, str | None, bytes], bool]


def _at(buf: bytes, offset: int, field: struct.Struct) -> int:
    return field.unpack_from(buf, offset)[0]


def _qcow(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return buf.startswith(QCOW_MAGIC) and _at(buf, QCOW_VERSION_OFFSET, _BE32) == QCOW1_VERSION


def _qcow2(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return (buf.startswith(QCOW_MAGIC)
            and _at(buf, QCOW_VERSION_OFFSET, _BE32) >= QCOW2_MIN_VERSION)


def _vmdk(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    if buf.startswith((VMDK3_MAGIC, VMDK4_MAGIC)):
        return True
    position, end = 0, len(buf)
    while position < end:
        if buf[position] == VMDK_COMMENT:
            newline = buf.find(b"\n", position)
            position = end if newline < 0 else newline + 1
            continue
        if buf[position] == VMDK_BLANK:  # a blank line may only hold spaces (and a CR)
            position = len(buf) - len(buf[position:].lstrip(b" "))
            if buf[position:position + 1] == b"\r":
                position += 1
            if buf[position:position + 1] != b"\n":
                return False
            position += 1
            continue
        return buf.startswith(VMDK_VERSION_LINES, position)
    return False


def _magic(magic: bytes) -> Callable[[bytes, str | None, bytes], bool]:
    return lambda buf, _path, _trailer: buf.startswith(magic)


def _vdi(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return _at(buf, VDI_SIGNATURE_OFFSET, _LE32) == VDI_SIGNATURE


def _luks(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return buf.startswith(LUKS_MAGIC) and _at(buf, LUKS_VERSION_OFFSET, _BE16) == LUKS_VERSION


def _parallels(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return (buf.startswith(PARALLELS_MAGICS)
            and _at(buf, PARALLELS_VERSION_OFFSET, _LE32) == PARALLELS_VERSION)


def _bochs(buf: bytes, _path: str | None, _trailer: bytes) -> bool:
    return (all(buf.startswith(text, offset)
                for offset, text in (BOCHS_MAGIC, BOCHS_TYPE, BOCHS_SUBTYPE))
            and _at(buf, BOCHS_VERSION_OFFSET, _LE32) in BOCHS_VERSIONS)


def _dmg(_buf: bytes, path: str | None, trailer: bytes) -> bool:
    return _dmg_named(path) and DMG_TRAILER_MAGIC in trailer


def _dmg_named(path: str | None) -> bool:
    return path is not None and len(path) > len(DMG_SUFFIX) and path.endswith(DMG_SUFFIX)


#: Every format QEMU 7.2 probes for (raw aside), in qemu's driver names.
KNOWN_FORMATS: tuple[KnownFormat, ...] = (
    KnownFormat("qcow2", SCORE_MAGIC, _qcow2),
    KnownFormat("qcow", SCORE_MAGIC, _qcow),
    KnownFormat("vmdk", SCORE_MAGIC, _vmdk),
    KnownFormat("vpc", SCORE_MAGIC, _magic(VPC_MAGIC)),
    KnownFormat("vhdx", SCORE_MAGIC, _magic(VHDX_MAGIC)),
    KnownFormat("vdi", SCORE_MAGIC, _vdi),
    KnownFormat("qed", SCORE_MAGIC, _magic(QED_MAGIC)),
    KnownFormat("luks", SCORE_MAGIC, _luks),
    KnownFormat("parallels", SCORE_MAGIC, _parallels),
    KnownFormat("bochs", SCORE_MAGIC, _bochs),
    KnownFormat("cloop", SCORE_WEAK, _magic(CLOOP_MAGIC)),
    KnownFormat("dmg", SCORE_WEAK, _dmg),
)


class UnsupportedFormatError(UnknownFormatError):
    """A probed image of a format QEMU knows that no installed plugin reads:
    refused, since reading it as raw would show its container bytes."""

    def __init__(self, path: str | None, format_name: str, *, installed: bool = False):
        from corefmt.block.chain import printable  # chain imports this module

        shown = printable(path or "<image>")
        if installed:
            reason = f"the installed {format_name} plugin does not recognise it"
        else:
            reason = f"no corefmt plugin for {format_name} is installed"
        super().__init__(f"'{shown}': this is a {format_name} image; {reason} "
                         "(use -f raw to read its bytes)")
        self.path = path
        self.format_name = format_name


class ProbedRawWriteError(StorageError):
    """A write refused by a probed raw image because its first sector would
    then probe as another format (qemu's EPERM: qemu-io prints "write failed:
    Operation not permitted")."""

    def __init__(self, path: str | None, operation: str, format_name: str):
        super().__init__(path, operation, OSError(errno.EPERM, os.strerror(errno.EPERM)))
        self.format_name = format_name
        self.args = (f"{path or '<image>'}: {operation} refused: the image was probed as raw "
                     f"and this would make it probe as {format_name} (open it with format "
                     "raw, -f raw, to allow it)",)


def identify(head: bytes, path: str | None = None, trailer: bytes = b"") -> KnownFormat | None:
    """The QEMU format ``head`` (an image's first bytes) starts, if any; the
    highest score wins, as in qemu."""
    if not head:
        return None  # qemu: an empty image is raw, never probed
    buf = head[:QEMU_PROBE_SIZE].ljust(QEMU_PROBE_SIZE, b"\0")
    best: KnownFormat | None = None
    for known in KNOWN_FORMATS:
        if (best is None or known.score > best.score) and known.matches(buf, path, trailer):
            best = known
    return best


def dmg_trailer(storage: Storage) -> bytes:
    """Where a dmg's "koly" trailer may start (plus its 3 more bytes), read
    only for a file named like a dmg (qemu's dmg_find_koly_offset window)."""
    if not _dmg_named(storage.path):
        return b""
    size = storage.size()
    if size < DMG_MIN_SIZE:
        return b""
    start = max(size - DMG_TRAILER_SEARCH_BACK, 0)
    return storage.read(start, min(size - start, DMG_TRAILER_SEARCH_LENGTH))


def probed_driver(head: bytes, path: str | None, registry: Registry,
                  trailer: bytes = b"") -> FormatDriver:
    """The installed driver probing picks for ``head``, unless a QEMU format no
    plugin reads scores higher: then UnsupportedFormatError, never raw."""
    driver: FormatDriver | None = None
    missing: UnknownFormatError | None = None
    try:
        driver = registry.probe(head, path)
    except UnknownFormatError as error:
        missing = error
    score = PROBE_NO if driver is None else driver.probe(head, path)
    known = identify(head, path, trailer)
    if known is not None and known.score > score:
        raise UnsupportedFormatError(path, known.name, installed=known.name in registry.formats)
    if driver is None:
        assert missing is not None
        raise missing
    return driver


def probes_as_other(head: bytes, registry: Registry, fallback: str) -> str | None:
    """The format other than ``fallback`` that ``head`` would probe as, or None.

    The path is not given, as in qemu's raw guard: a write changes content,
    never the name (so a dmg, probed by name, is not the guard's concern).
    """
    try:
        driver = probed_driver(head, None, registry)
    except UnsupportedFormatError as error:
        return error.format_name
    except UnknownFormatError:
        return None  # nothing would claim it: it would not open as another format
    return None if driver.name == fallback else driver.name


__all__ = ["KNOWN_FORMATS", "KnownFormat", "ProbedRawWriteError", "UnsupportedFormatError",
           "dmg_trailer", "identify", "probed_driver", "probes_as_other"]

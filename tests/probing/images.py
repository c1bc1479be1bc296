"""Images of formats corefmt has no plugin for: made by qemu-img where it can
create them, else crafted from the format's description (and checked to open
in qemu, so the bytes are real images, not just a magic number)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TIMEOUT = 60
SIZE = "1M"
SECTOR = 512
#: LUKS1 (the only LUKS qemu 7.2 probes): its header's layout as qemu writes it.
LUKS_MAGIC, LUKS_VERSION = b"LUKS\xba\xbe", 1
LUKS_KEY_BYTES, LUKS_STRIPES, LUKS_SLOTS = 64, 4000, 8
LUKS_SLOT_DISABLED = 0x0000DEAD
LUKS_DIGEST_ITERATIONS = 1000
LUKS_FIRST_SLOT_SECTOR, LUKS_SLOT_SECTORS, LUKS_PAYLOAD_SECTOR = 8, 504, 4040

#: case -> (format qemu calls it, qemu-img create arguments before the name and size)
QEMU_MADE: dict[str, tuple[str, tuple[str, ...]]] = {
    "qcow2": ("qcow2", ()),
    "qcow": ("qcow", ()),
    "vmdk": ("vmdk", ()),
    "vmdk-stream": ("vmdk", ("-o", "subformat=streamOptimized")),
    "vmdk-descriptor": ("vmdk", ("-o", "subformat=monolithicFlat")),
    "vpc": ("vpc", ()),
    "vhdx": ("vhdx", ()),
    "vdi": ("vdi", ()),
    "qed": ("qed", ()),
    "parallels": ("parallels", ()),
}


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"  # qemu's messages (strerror) in English
    env.pop("PYTHONWARNINGS", None)
    return env


def qemu_img(*args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG or "qemu-img", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, env=environment(), timeout=TIMEOUT, check=False)


def qemu_made(directory: Path, case: str) -> Path:
    fmt, extra = QEMU_MADE[case]
    path = directory / f"image.{case}"
    made = qemu_img("create", "-q", "-f", fmt, *extra, path.name, SIZE, cwd=directory)
    if made.returncode != 0:
        raise AssertionError(made.stderr)
    return path


def luks(directory: Path) -> Path:
    """A LUKS1 header with every key slot disabled, then a 1 MiB payload.

    Crafted rather than made: ``qemu-img create -f luks`` benchmarks PBKDF2 and
    fails on fast machines ("Unable to get accurate CPU usage", qemu 7.2.x).
    qemu reads it (``qemu-img info`` needs no key); nothing can unlock it."""
    header = bytearray(LUKS_FIRST_SLOT_SECTOR * SECTOR)
    # magic, version, cipher, mode, hash, payload offset, key bytes
    struct.pack_into(">6sH32s32s32sII", header, 0, LUKS_MAGIC, LUKS_VERSION, b"aes",
                     b"xts-plain64", b"sha256", LUKS_PAYLOAD_SECTOR, LUKS_KEY_BYTES)
    struct.pack_into(">I", header, 164, LUKS_DIGEST_ITERATIONS)  # after the digest and its salt
    header[168:208] = b"00000000-0000-4000-8000-000000000000".ljust(40, b"\0")  # uuid
    for slot in range(LUKS_SLOTS):
        # active, iterations, salt, key material sector, stripes
        struct.pack_into(">II32sII", header, 208 + 48 * slot, LUKS_SLOT_DISABLED, 0, bytes(32),
                         LUKS_FIRST_SLOT_SECTOR + slot * LUKS_SLOT_SECTORS, LUKS_STRIPES)
    path = directory / "image.luks"
    with path.open("wb") as file:
        file.write(header)
        file.truncate(LUKS_PAYLOAD_SECTOR * SECTOR + (1 << 20))
    return path


def bochs(directory: Path) -> Path:
    """A growing bochs redolog (v2 header, 1 MiB, nothing allocated)."""
    size, extent = 1 << 20, 4096
    header = bytearray(SECTOR)
    header[0:23] = b"Bochs Virtual HD Image\0"
    header[32:40] = b"Redolog\0"
    header[48:56] = b"Growing\0"
    # version, header size, catalog entries, bitmap size, extent size, reserved, disk size
    struct.pack_into("<IIIIIIQ", header, 64, 0x00020000, SECTOR, size // extent, SECTOR,
                     extent, 0, size)
    path = directory / "image.bochs"
    path.write_bytes(bytes(header) + b"\xff\xff\xff\xff" * (size // extent))
    return path


def cloop(directory: Path) -> Path:
    """A V2.0 cloop: the shell preamble, block size, block count, offsets, one block."""
    preamble = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
    block = zlib.compress(b"c" * SECTOR)
    header = preamble.ljust(128, b"\0") + struct.pack(">II", SECTOR, 1)
    first = len(header) + 16
    path = directory / "image.cloop"
    path.write_bytes(header + struct.pack(">QQ", first, first + len(block)) + block)
    return path


def dmg(directory: Path, name: str = "image.dmg") -> Path:
    """A UDIF image: an (empty) XML property list, then the 512-byte koly trailer."""
    plist = b"<plist></plist>\n"
    body = plist.ljust(8 * SECTOR, b"\0")
    trailer = bytearray(SECTOR)
    trailer[0:4] = b"koly"
    struct.pack_into(">QQ", trailer, 0xD8, 0, len(plist))  # XML offset and length
    struct.pack_into(">Q", trailer, 0x1EC, 8)  # sectors
    path = directory / name
    path.write_bytes(body + bytes(trailer))
    return path


def vmdk3(directory: Path) -> Path:
    """A VMDK3 ("COWD") sparse image: header, descriptor with CIDs, empty L1."""
    image = bytearray(32 * SECTOR)
    image[0:4] = b"COWD"
    # version, flags, disk sectors, granularity, L1 sector, L1 entries, file sectors
    struct.pack_into("<IIIIIII", image, 4, 1, 3, 2048, 16, 24, 64, 32)
    descriptor = b"CID=fffffffe\nparentCID=ffffffff\n"
    image[SECTOR:SECTOR + len(descriptor)] = descriptor
    path = directory / "image.vmdk3"
    path.write_bytes(bytes(image))
    return path


#: case -> (format qemu calls it, builder)
CRAFTED: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "bochs": ("bochs", bochs),
    "cloop": ("cloop", cloop),
    "dmg": ("dmg", dmg),
    "luks": ("luks", luks),
    "vmdk3": ("vmdk", vmdk3),
}

ALL_CASES = (*QEMU_MADE, *CRAFTED)


def format_of(case: str) -> str:
    return QEMU_MADE[case][0] if case in QEMU_MADE else CRAFTED[case][0]


def make(directory: Path, case: str) -> Path:
    """The image for ``case`` in ``directory`` (qemu-img is needed for QEMU_MADE)."""
    if case in CRAFTED:
        return CRAFTED[case][1](directory)
    return qemu_made(directory, case)


def qcow2_header(backing: bytes, size: int = 1 << 20) -> bytes:
    """A qcow2 (v2) header naming ``backing`` as its backing file, padded to a
    sector: what a guest would write into sector 0 of a raw disk to make the
    next probing open read a host file."""
    l1_offset, refcount_offset = 0x30000, 0x10000
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 72, len(backing), 16, size, 0, 1,
                         l1_offset, refcount_offset, 1, 0, 0)
    return (header + backing).ljust(SECTOR, b"\0")

"""FVD behaviour through corefmt: copy-on-write, compact allocation, sparse
holes, data files, chains, base formats, crash safety, journal recycling,
map/info and conversion (spec /work/shared/spec/fvd.md).

Every base image holds random data (no 512-byte sector of it is zero), so
a read that returns zeros where the base's bytes belong fails (the spec's
§9.5 (a): the original's all-zero bases hid such bugs). Expected content
comes from a plain bytearray model of the guest disk.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from corefmt_fvd.layout import BitmapRecord, TableRecord, unpack_sector

import corefmt
from corefmt import CorefmtError
from tests.fvd.helpers import random_base

KiB, MiB = 1024, 1024 * 1024
SECTOR = 512
QEMU_IMG, QEMU_IO = shutil.which("qemu-img"), shutil.which("qemu-io")
EMPTY = 0xFFFFFFFF


# -- helpers ------------------------------------------------------------------------------
def header_field(raw: bytes, offset: int, code: str) -> int:
    return struct.unpack_from("<" + code, raw, offset)[0]


def hdr(path: Path) -> dict:
    """The header fields the tests look at, by the spec's §2.1 offsets."""
    with open(path, "rb") as file:
        raw = file.read(4336)
    return {
        "metadata_size": header_field(raw, 20, "q"),
        "base_img": raw[28:1052].split(b"\0")[0],
        "base_img_fmt": raw[1052:1068].split(b"\0")[0],
        "base_img_size": header_field(raw, 1068, "q"),
        "bitmap_offset": header_field(raw, 1076, "q"),
        "bitmap_size": header_field(raw, 1084, "q"),
        "block_size": header_field(raw, 1092, "i"),
        "data_file": raw[1108:2132].split(b"\0")[0],
        "data_file_fmt": raw[2132:2148].split(b"\0")[0],
        "table_offset": header_field(raw, 2212, "q"),
        "chunk_size": header_field(raw, 2220, "q"),
        "storage_grow_unit": header_field(raw, 2228, "q"),
        "journal_offset": header_field(raw, 4284, "q"),
        "journal_size": header_field(raw, 4292, "q"),
        "clean_shutdown": header_field(raw, 4300, "i"),
        "need_zero_init": header_field(raw, 4304, "i"),
    }


def table_of(path: Path) -> list[int]:
    h = hdr(path)
    raw = path.read_bytes()
    entries = -(-virtual_size(raw) // h["chunk_size"])
    return list(struct.unpack_from(f"<{entries}I", raw, h["table_offset"]))


def virtual_size(raw: bytes) -> int:
    return header_field(raw, 12, "q")


def bitmap_of(path: Path) -> bytes:
    h = hdr(path)
    with open(path, "rb") as file:
        file.seek(h["bitmap_offset"])
        return file.read(h["bitmap_size"])


def bit(bits: bytes, block: int) -> bool:
    return bool(bits[block // 8] >> (block % 8) & 1)


def model_of(base: bytes, size: int) -> bytearray:
    model = bytearray(size)
    model[:min(len(base), size)] = base[:size]
    return model


def assert_reads(disk, model: bytes | bytearray, what: str = "") -> None:
    got = disk.read(0, len(model))
    if got != bytes(model):
        first = next(i for i in range(len(model)) if got[i] != model[i])
        zeros = got[first:first + 16] == bytes(16)
        raise AssertionError(f"{what}: first difference at byte {first} "
                             f"(read {got[first:first + 8].hex()}, expected "
                             f"{bytes(model[first:first + 8]).hex()}{', zeros' if zeros else ''})")


def write(disk, model: bytearray, offset: int, data: bytes) -> None:
    disk.write(offset, data)
    model[offset:offset + len(data)] = data


def create(path: Path, size: int, options: str = "", backing: str | None = None,
           backing_format: str | None = "raw") -> Path:
    kwargs = {"backing": backing, "backing_format": backing_format} if backing else {}
    corefmt.create(str(path), "fvd", size, options=options, **kwargs)
    return path


def cli(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "corefmt.cli.main", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def qemu(*args: str | os.PathLike, cwd: Path | None = None, check: bool = True
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C")
    result = subprocess.run(list(map(str, args)), capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=120)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def snapshot(*paths: Path) -> dict[str, bytes]:
    """The files' bytes now, the image still open (a power loss after the
    last flush, the page cache having reached the disk)."""
    return {path.name: path.read_bytes() for path in paths}


def restore(files: dict[str, bytes], directory: Path, base: Path | None = None) -> Path:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    if base is not None:
        shutil.copy(base, directory / base.name)
    return directory


# -- copy-on-write of partial blocks ---------------------------------------------------------
BLOCKS = [512, 7680, 65536, 1048064]


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
@pytest.mark.parametrize("block", BLOCKS)
def test_partial_block_writes_keep_the_base_around_them(tmp_path, block, compact):
    base_size = 6 * block + 1536
    base = random_base(tmp_path / "base.raw", base_size, block)
    size = base_size + 2 * block
    options = f"block_size={block}" + (",compact_image=on,chunk_size=65536" if compact else "")
    image = create(tmp_path / "a.fvd", size, options, "base.raw")
    model = model_of(base, size)
    rng = random.Random(block + compact)
    unit = 512 if block > 512 else 100  # 512-byte blocks: partial means inside a sector
    writes = [
        (0 * block + unit, block - unit),              # head kept
        (1 * block, block - 2 * unit),                 # tail kept
        (2 * block + unit, unit),                      # head and tail, one block
        (3 * block + unit, 2 * block - unit),          # head and tail across 3 blocks
        (6 * block + 7, 300),                          # unaligned, in the last partial block
    ]
    with corefmt.open(str(image), read_only=False) as disk:
        for offset, length in writes:
            write(disk, model, offset, rng.randbytes(length))
        assert_reads(disk, model, "while open")
        disk.flush()
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after reopening")
    bits = bitmap_of(image)
    for offset, length in writes:
        for b in range(offset // block, -(-(offset + length) // block)):
            assert bit(bits, b), f"block {b} written but not marked"


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
@pytest.mark.parametrize("block", [7680, 65536])
@pytest.mark.parametrize("base_size", [MiB, MiB - 100], ids=["sector-end", "odd-end"])
def test_writes_beyond_and_straddling_the_base_end(tmp_path, block, compact, base_size):
    base = random_base(tmp_path / "base.raw", base_size, 7)
    size = 2 * MiB
    options = f"block_size={block}" + (",compact_image=on,chunk_size=8192" if compact else "")
    image = create(tmp_path / "a.fvd", size, options, "base.raw")
    model = model_of(base, size)
    base_end = -(-base_size // SECTOR) * SECTOR  # base_img_size (§2.4 step 5)
    assert hdr(image)["base_img_size"] == base_end
    straddling_block = base_end // block * block
    rng = random.Random(block)
    with corefmt.open(str(image), read_only=False) as disk:
        # beyond the end, in the block that straddles it
        write(disk, model, base_end + 1000, rng.randbytes(700))
        assert_reads(disk, model, "beyond the end, straddling block")
        # across the end, starting inside a base block (copy-on-write head)
        write(disk, model, straddling_block - block + 1234, rng.randbytes(block + 3000))
        # across the end from inside the straddling block's base part
        write(disk, model, base_end - 700, rng.randbytes(1500))
        # far beyond, unaligned
        write(disk, model, size - 5000, rng.randbytes(4321))
        assert_reads(disk, model, "while open")
        for start in (base_end - 3000, straddling_block, base_end - 1):
            assert disk.read(start, 6000) == bytes(model[start:start + 6000]), start
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after reopening")


# -- compact images -------------------------------------------------------------------------
def test_compact_chunks_are_handed_out_in_order_once(tmp_path):
    chunk = 65536
    size = 8 * MiB
    base = random_base(tmp_path / "base.raw", 4 * MiB, 11)
    image = create(tmp_path / "c.fvd", size, f"compact_image=on,chunk_size={chunk},"
                   "block_size=4096", "base.raw")
    model = model_of(base, size)
    rng = random.Random(12)
    order: list[int] = []
    chunks = list(range(size // chunk))
    rng.shuffle(chunks)
    plan = chunks[:70] + rng.sample(chunks[:70], 30)  # 30 writes to chunks already mapped
    for session in range(3):
        with corefmt.open(str(image), read_only=False) as disk:
            for index, c in enumerate(plan[session::3]):
                inside = rng.randrange(0, chunk - 8192, 4096)
                write(disk, model, c * chunk + inside, rng.randbytes(8192))
                if c not in order:
                    order.append(c)
                if index % 7 == 0:
                    disk.flush()
            assert_reads(disk, model, f"session {session}")
    table = table_of(image)
    expected = [EMPTY] * len(table)
    for physical, c in enumerate(order):
        expected[c] = physical
    assert table == expected, "chunks not allocated sequentially in first-write order"
    raw = image.read_bytes()
    metadata = hdr(image)["metadata_size"]
    bits = bitmap_of(image)
    for physical, c in enumerate(order):  # the chunk's blocks this image holds are there
        for b in range(c * chunk // 4096, (c + 1) * chunk // 4096):
            if b * 4096 >= len(base) or bit(bits, b):
                host = metadata + physical * chunk + b * 4096 - c * chunk
                assert raw[host:host + 4096] == bytes(model[b * 4096:(b + 1) * 4096]), (c, b)
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after the last session")


def test_block_not_dividing_chunk(tmp_path):
    """7680-byte blocks over 8192-byte chunks: a block's copy-on-write can
    reach into a neighbouring chunk (§10 #7); still one id per chunk."""
    size = 3 * MiB
    base = random_base(tmp_path / "base.raw", 2 * MiB, 13)
    image = create(tmp_path / "c.fvd", size, "compact_image=on,chunk_size=8192,"
                   "block_size=7680,storage_grow_unit=65536", "base.raw")
    model = model_of(base, size)
    rng = random.Random(14)
    with corefmt.open(str(image), read_only=False) as disk:
        for index in range(250):
            offset = rng.randrange(0, size - 1)
            length = min(rng.randrange(1, 12000), size - offset)
            write(disk, model, offset, rng.randbytes(length))
            if index % 40 == 0:
                disk.flush()
        disk.flush()
        crashed = snapshot(image)
        assert_reads(disk, model, "while open")
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after close")
    ids = [e for e in table_of(image) if e != EMPTY]
    assert sorted(ids) == list(range(len(ids))), "a chunk id given twice, or a gap"
    restore(crashed, tmp_path / "crash", tmp_path / "base.raw")
    with corefmt.open(str(tmp_path / "crash" / "c.fvd"), read_only=True) as disk:
        assert_reads(disk, model, "crash copy after the flush")


def test_storage_grows_by_storage_grow_unit(tmp_path):
    chunk, grow = 8192, 3 * 8192
    image = create(tmp_path / "c.fvd", MiB, f"compact_image=on,chunk_size={chunk},"
                   f"storage_grow_unit={grow}")
    h = hdr(image)
    assert h["storage_grow_unit"] == grow
    metadata = h["metadata_size"]
    assert image.stat().st_size == metadata
    with corefmt.open(str(image), read_only=False) as disk:
        for n in range(1, 11):
            disk.write((n * 7 % 128) * chunk, b"\x33" * 512)
            assert image.stat().st_size == metadata + -(-n // 3) * grow, n
            disk.write((n * 7 % 128) * chunk + 4096, b"\x44" * 512)  # same chunk: no growth
            assert image.stat().st_size == metadata + -(-n // 3) * grow, n
    # a grow unit below the chunk size is raised to it (§2.3)
    small = create(tmp_path / "s.fvd", MiB, "compact_image=on,chunk_size=8192,"
                   "storage_grow_unit=4096")
    assert hdr(small)["storage_grow_unit"] == 8192
    # a separate data file grows; the metadata file stays as created
    data = create(tmp_path / "d.fvd", MiB, f"compact_image=on,chunk_size={chunk},"
                  f"storage_grow_unit={grow},data_file=d.data")
    with corefmt.open(str(data), read_only=False) as disk:
        for n in range(1, 5):
            disk.write(n * chunk * 3, b"\x55" * chunk)
            assert (tmp_path / "d.data").stat().st_size == -(-n // 3) * grow
    assert data.stat().st_size == hdr(data)["metadata_size"]


def test_leaked_chunk_handed_out_again_reads_zeros(tmp_path):
    """A chunk allocated by a write lost in a crash is leaked; the next
    allocation hands its id out again, and the part the new write misses
    must read as zeros, not as the lost write's bytes."""
    chunk = 65536
    image = create(tmp_path / "c.fvd", 2 * MiB, f"compact_image=on,chunk_size={chunk}")
    with corefmt.open(str(image), read_only=False) as disk:
        disk.write(0, b"\x01" * chunk)
        disk.flush()
        disk.write(5 * chunk, b"\x02" * chunk)  # never flushed: lost
        crashed = snapshot(image)
    restore(crashed, tmp_path / "crash")
    copy = tmp_path / "crash" / "c.fvd"
    with corefmt.open(str(copy), read_only=False) as disk:
        assert disk.read(5 * chunk, chunk) in (bytes(chunk), b"\x02" * chunk)
        lost = disk.read(5 * chunk, chunk) == bytes(chunk)
        disk.write(9 * chunk + 512, b"\x03" * 512)
        expected = bytes(512) + b"\x03" * 512 + bytes(chunk - 1024)
        assert disk.read(9 * chunk, chunk) == expected
    with corefmt.open(str(copy), read_only=True) as disk:
        assert disk.read(9 * chunk, chunk) == expected
        if lost:
            assert disk.read(5 * chunk, chunk) == bytes(chunk)


# -- detect_sparse_hole ------------------------------------------------------------------------
@pytest.mark.parametrize("block", [4096, 7680])
def test_detect_sparse_hole_marks_the_base_zero_regions(tmp_path, block):
    hole = 64 * KiB
    base_size = MiB + 88 * KiB  # the last 64 KiB piece is partial, and all zero
    pieces = [(0, 10000), (100000, 100100), (150000, 150001), (400000, 470000),
              (MiB + 1000, MiB + 2000)]
    base = bytearray(base_size)
    rng = random.Random(block)
    for start, end in pieces:
        base[start:end] = bytes(rng.randrange(1, 256) for _ in range(end - start))
    with open(tmp_path / "base.raw", "wb") as file:  # holes stay holes
        file.truncate(base_size)
        for start, end in pieces:
            file.seek(start)
            file.write(base[start:end])
    size = 2 * MiB
    image = create(tmp_path / "a.fvd", size, f"block_size={block},detect_sparse_hole={hole}",
                   "base.raw")
    h = hdr(image)
    assert h["need_zero_init"] == 1
    # §3.4: pieces of ru(max(H, block), block) bytes; every all-zero piece marked,
    # the base's last piece included (§10 #17: the original skipped it)
    unit = -(-max(hole, block) // block) * block
    expected = bytearray(h["bitmap_size"])
    marked = set()
    for start in range(0, base_size, unit):
        stop = min(start + unit, base_size)
        if not any(base[start:stop]):
            for b in range(start // block, -(-stop // block)):
                expected[b // 8] |= 1 << (b % 8)
                marked.add(b)
    last = (base_size - 1) // block
    assert last in marked
    assert bitmap_of(image) == bytes(expected)
    model = model_of(bytes(base), size)
    with corefmt.open(str(image), read_only=False) as disk:
        assert_reads(disk, model, "fresh image")
        write(disk, model, 600000 + 100, b"\x99" * 300)  # inside a marked hole
        write(disk, model, 100000 - 50, b"\x98" * 300)  # a base block with data
        assert_reads(disk, model, "after writes")
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after reopening")


def test_detect_sparse_hole_refused_with_compact_image(tmp_path):
    random_base(tmp_path / "base.raw", MiB, 1)
    with pytest.raises(CorefmtError):
        create(tmp_path / "a.fvd", MiB, "compact_image=on,detect_sparse_hole=65536",
               "base.raw")


# -- data files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_raw_data_file_relative_to_the_image(tmp_path, monkeypatch, compact):
    images = tmp_path / "images"
    images.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = random_base(images / "base.raw", MiB, 21)
    size = 2 * MiB
    options = "block_size=4096,data_file=img.data" + (
        ",compact_image=on,chunk_size=65536" if compact else "")
    image = create(images / "img.fvd", size, options, "base.raw")
    assert (images / "img.data").exists() and not (elsewhere / "img.data").exists()
    h = hdr(image)
    assert h["data_file"] == b"img.data" and h["data_file_fmt"] == b""
    model = model_of(base, size)
    rng = random.Random(22)
    with corefmt.open(str(image), read_only=False) as disk:
        write(disk, model, 4096 * 3 + 512, rng.randbytes(1024))   # copy-on-write
        write(disk, model, MiB + 4096, rng.randbytes(8192))       # beyond the base
        write(disk, model, 0, rng.randbytes(4096))
        assert_reads(disk, model, "while open")
    assert image.stat().st_size == h["metadata_size"], "data went into the metadata file"
    data = (images / "img.data").read_bytes()
    table = table_of(image) if compact else None
    for start, end in ((3 * 4096, 4 * 4096), (MiB + 4096, MiB + 3 * 4096), (0, 4096)):
        host = start
        if table is not None:
            host = table[start // 65536] * 65536 + start % 65536
        assert data[host:host + end - start] == bytes(model[start:end]), start
    monkeypatch.chdir(tmp_path)
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "reopened from another directory")


@pytest.mark.interop
@pytest.mark.skipif(not QEMU_IMG, reason="qemu-img missing")
def test_qcow2_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    base = random_base(images / "base.raw", MiB, 23)
    size = 2 * MiB
    image = create(images / "img.fvd", size,
                   "block_size=4096,data_file=img.qcow2,data_file_fmt=qcow2", "base.raw")
    h = hdr(image)
    assert h["data_file"] == b"img.qcow2" and h["data_file_fmt"] == b"qcow2"
    info = json.loads(qemu(QEMU_IMG, "info", "--output=json", images / "img.qcow2").stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == size
    model = model_of(base, size)
    rng = random.Random(24)
    with corefmt.open(str(image), read_only=False) as disk:
        write(disk, model, 5 * 4096 + 100, rng.randbytes(3000))
        write(disk, model, MiB + 512, rng.randbytes(9000))
        assert_reads(disk, model, "while open")
    qemu(QEMU_IMG, "check", images / "img.qcow2")
    qemu(QEMU_IMG, "convert", "-O", "raw", images / "img.qcow2", tmp_path / "data.raw")
    data = (tmp_path / "data.raw").read_bytes()
    for start, end in ((5 * 4096, 6 * 4096), (MiB, MiB + 9512)):
        assert data[start:end] == bytes(model[start:end])
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "reopened")


# -- chains -------------------------------------------------------------------------------------
def _apply(path: Path, model: bytearray, writes: list[tuple[int, bytes]], **kwargs) -> None:
    with corefmt.open(str(path), read_only=False, **kwargs) as disk:
        for offset, data in writes:
            write(disk, model, offset, data)


def _random_writes(rng: random.Random, size: int, count: int, longest: int = 20000
                   ) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(count):
        offset = rng.randrange(0, size - 1)
        writes.append((offset, rng.randbytes(min(rng.randrange(1, longest), size - offset))))
    return writes


@pytest.mark.interop
@pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io missing")
def test_chains_through_the_core(tmp_path):
    """fvd over raw, over qcow2 and over fvd, and qcow2 over fvd: every layer
    reads its own view correctly."""
    rng = random.Random(31)
    size = 3 * MiB
    base = random_base(tmp_path / "base.raw", 2 * MiB, 32)
    raw_model = model_of(base, size)
    # qcow2 over raw, written by qemu-io
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         "mid.qcow2", str(size), cwd=tmp_path)
    qcow2_model = bytearray(raw_model)
    script = []
    for index in range(6):
        offset, length = rng.randrange(0, size - 70000), rng.randrange(1, 70000)
        script += ["-c", f"write -P {0x10 + index:#x} {offset} {length}"]
        qcow2_model[offset:offset + length] = bytes([0x10 + index]) * length
    qemu(QEMU_IO, "-f", "qcow2", *script, "mid.qcow2", cwd=tmp_path)
    # fvd over raw / over qcow2
    over_raw = create(tmp_path / "over-raw.fvd", size, "block_size=7680", "base.raw")
    over_raw_model = bytearray(raw_model)
    _apply(over_raw, over_raw_model, _random_writes(rng, size, 30))
    over_qcow2 = create(tmp_path / "over-qcow2.fvd", size, "block_size=4096,compact_image=on,"
                        "chunk_size=65536", "mid.qcow2", "qcow2")
    over_qcow2_model = bytearray(qcow2_model)
    _apply(over_qcow2, over_qcow2_model, _random_writes(rng, size, 30))
    # fvd over fvd
    over_fvd = create(tmp_path / "over-fvd.fvd", size, "block_size=65536", "over-raw.fvd",
                      "fvd")
    over_fvd_model = bytearray(over_raw_model)
    _apply(over_fvd, over_fvd_model, _random_writes(rng, size, 30))
    # qcow2 over fvd, created by the CLI
    cli("create", "-q", "-f", "qcow2", "-b", "over-fvd.fvd", "-F", "fvd", "top.qcow2",
        cwd=tmp_path)
    top_model = bytearray(over_fvd_model)
    _apply(tmp_path / "top.qcow2", top_model, _random_writes(rng, size, 30))
    for name, model in (("mid.qcow2", qcow2_model), ("over-raw.fvd", over_raw_model),
                        ("over-qcow2.fvd", over_qcow2_model), ("over-fvd.fvd", over_fvd_model),
                        ("top.qcow2", top_model)):
        with corefmt.open(str(tmp_path / name), read_only=True) as disk:
            assert_reads(disk, model, name)
    cli("check", "top.qcow2", cwd=tmp_path)


# -- the base's format ------------------------------------------------------------------------
@pytest.mark.interop
@pytest.mark.skipif(not QEMU_IMG, reason="qemu-img missing")
def test_base_format_recorded_and_respected(tmp_path):
    """A raw base whose first bytes are a qcow2 header is still read as raw."""
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "fake.qcow2", "1M", cwd=tmp_path)
    head = (tmp_path / "fake.qcow2").read_bytes()[:4096]
    base = bytearray(random.Random(41).randbytes(MiB))
    base[:len(head)] = head
    (tmp_path / "base.raw").write_bytes(base)
    size = 2 * MiB
    image = create(tmp_path / "a.fvd", size, "block_size=4096", "base.raw", "raw")
    assert hdr(image)["base_img_fmt"] == b"raw"
    model = model_of(bytes(base), size)
    with corefmt.open(str(image), read_only=False) as disk:
        assert_reads(disk, model, "a raw base that looks like qcow2")
        write(disk, model, 100, b"\x07" * 50)  # copy-on-write of block 0 from the raw base
        assert_reads(disk, model, "after a write")
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "reopened")
    info = json.loads(cli("info", "--output=json", image).stdout)
    assert info["backing-filename-format"] == "raw"


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def test_unknown_formats_refused(tmp_path):
    random_base(tmp_path / "base.raw", MiB, 42)
    image = create(tmp_path / "a.fvd", MiB, "block_size=4096", "base.raw")
    good = image.read_bytes()
    # a base format no driver knows
    _poke(image, 1052, b"nosuchfmt".ljust(16, b"\0"))
    with pytest.raises(CorefmtError), corefmt.open(str(image), read_only=True) as disk:
        disk.read(0, 4096)
    # a data file format no driver knows
    image.write_bytes(good)
    _poke(image, 1108, b"a.data".ljust(16, b"\0"))
    _poke(image, 2132, b"nosuchfmt".ljust(16, b"\0"))
    (tmp_path / "a.data").write_bytes(bytes(MiB))
    with pytest.raises(CorefmtError), corefmt.open(str(image), read_only=True) as disk:
        disk.read(0, 4096)
    # another version, or no FVD magic: not an FVD image (§2.2)
    for offset, data in ((4, struct.pack("<I", 2)), (0, b"\xa9\xf5\x43\x52")):
        image.write_bytes(good)
        _poke(image, offset, data)
        with pytest.raises(CorefmtError):
            corefmt.open(str(image), "fvd", read_only=True).close()
    # and the good header opens
    image.write_bytes(good)
    corefmt.open(str(image), read_only=True).close()


def test_relative_base_path_against_the_image_directory(tmp_path, monkeypatch):
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    cwd = tmp_path / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    base = random_base(tmp_path / "images" / "base.raw", MiB, 51)
    # a decoy where the same relative name leads from the working directory
    random_base(tmp_path / "cwd" / "base.raw", MiB, 52)
    monkeypatch.chdir(cwd)
    image_arg = os.path.relpath(images / "img.fvd", cwd)
    cli("create", "-q", "-f", "fvd", "-o", "block_size=4096", "-b", "../base.raw", "-F", "raw",
        image_arg, str(2 * MiB), cwd=cwd)
    image = images / "img.fvd"
    assert hdr(image)["base_img"] == b"../base.raw"
    model = model_of(base, 2 * MiB)
    with corefmt.open(image_arg, read_only=False) as disk:
        assert_reads(disk, model, "from another directory")
        write(disk, model, 4096 + 10, b"\x21" * 100)
    monkeypatch.chdir(tmp_path)
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "reopened")
    info = json.loads(cli("info", "--output=json", image, cwd=cwd).stdout)
    assert info["backing-filename"] == "../base.raw"


# -- crash safety -------------------------------------------------------------------------------
def _non_overlapping(rng: random.Random, size: int, count: int, taken: list[tuple[int, int]]
                     ) -> list[tuple[int, bytes]]:
    writes = []
    while len(writes) < count:
        offset = rng.randrange(0, size - 1)
        length = min(rng.randrange(1, 15000), size - offset)
        if any(offset < end and start < offset + length for start, end in taken):
            continue
        taken.append((offset, offset + length))
        writes.append((offset, rng.randbytes(length)))
    return writes


def _sectors_old_or_new(disk, old: bytes, new: bytes, what: str) -> bytes:
    got = disk.read(0, len(old))
    for at in range(0, len(old), SECTOR):
        piece = got[at:at + SECTOR]
        if piece != old[at:at + SECTOR] and piece != new[at:at + SECTOR]:
            raise AssertionError(f"{what}: sector at {at} is neither old nor new data "
                                 f"({'zeros' if not any(piece) else piece[:8].hex()})")
    return got


CRASH_CASES = {
    "plain": "block_size=7680",
    "compact": "block_size=7680,compact_image=on,chunk_size=65536,storage_grow_unit=1M,"
               "journal_size=256K",
    "compact-data-file": "block_size=4096,compact_image=on,chunk_size=8192,data_file=a.data,"
                         "storage_grow_unit=1M,journal_size=256K",
}


@pytest.mark.parametrize("commit", ["flush", "write"])
@pytest.mark.parametrize("case", CRASH_CASES)
def test_crash_after_flush_loses_nothing_flushed(tmp_path, case, commit):
    size = 3 * MiB
    base = random_base(tmp_path / "base.raw", 2 * MiB, 61)
    image = create(tmp_path / "a.fvd", size, CRASH_CASES[case], "base.raw")
    files = [image] + ([tmp_path / "a.data"] if "data_file" in CRASH_CASES[case] else [])
    model = model_of(base, size)
    rng = random.Random(62)
    taken: list[tuple[int, int]] = []
    with corefmt.open(str(image), read_only=False, options={"journal_commit": commit}) as disk:
        for offset, data in _random_writes(rng, size, 60):
            write(disk, model, offset, data)
        disk.flush()
        flushed = bytes(model)
        after_flush = snapshot(*files)
        for offset, data in _non_overlapping(rng, size, 25, taken):
            write(disk, model, offset, data)
        unflushed = snapshot(*files)
    final = bytes(model)
    assert hdr_bytes(after_flush["a.fvd"])["clean_shutdown"] == 0
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, final, "after a clean close")
    # power lost right after the flush: every flushed write is there
    for number, read_only in enumerate((True, False)):
        directory = restore(after_flush, tmp_path / f"flushed-{number}", tmp_path / "base.raw")
        copy = directory / "a.fvd"
        with corefmt.open(str(copy), read_only=read_only) as disk:
            assert_reads(disk, flushed, f"crash copy after the flush, read_only={read_only}")
        with corefmt.open(str(copy), read_only=True) as disk:
            assert_reads(disk, flushed, f"crash copy reopened, read_only={read_only}")
    # power lost before the next flush: old or new data, never anything else
    for number, read_only in enumerate((True, False)):
        directory = restore(unflushed, tmp_path / f"unflushed-{number}", tmp_path / "base.raw")
        copy = directory / "a.fvd"
        with corefmt.open(str(copy), read_only=read_only) as disk:
            if commit == "write":  # every write committed when it returned
                assert_reads(disk, final, "journal_commit=write, crash before the flush")
                seen = final
            else:
                seen = _sectors_old_or_new(disk, flushed, final, "crash before the flush")
        with corefmt.open(str(copy), read_only=True) as disk:
            assert_reads(disk, seen, "the recovered state is stable")


def hdr_bytes(raw: bytes) -> dict:
    return {"clean_shutdown": header_field(raw, 4300, "i")}


def _journal_records(raw: bytes) -> list:
    offset = header_field(raw, 4284, "q")
    size = header_field(raw, 4292, "q")
    records = []
    for at in range(offset, offset + size, SECTOR):
        records += unpack_sector(raw[at:at + SECTOR])
    return records


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_commit_modes_write_records_when_they_say(tmp_path, compact):
    random_base(tmp_path / "base.raw", MiB, 63)
    options = "block_size=4096" + (",compact_image=on,chunk_size=4096" if compact else "")
    for commit in ("flush", "write"):
        image = create(tmp_path / f"{commit}.fvd", 2 * MiB, options, "base.raw")
        with corefmt.open(str(image), read_only=False,
                          options={"journal_commit": commit}) as disk:
            disk.write(5 * 4096 + 512, b"\x01" * 1024)
            records = _journal_records(image.read_bytes())
            if commit == "flush":
                assert records == [], "records written before the flush"
            else:
                assert BitmapRecord(5 * 8, 8) in records
                if compact:
                    assert any(isinstance(r, TableRecord) and r.first_chunk == 5
                               for r in records)
            disk.flush()
            records = _journal_records(image.read_bytes())
            assert any(isinstance(r, BitmapRecord) and r.first_sector <= 40
                       and r.first_sector + r.nb_sectors >= 48 for r in records)
            if compact:
                assert any(isinstance(r, TableRecord) and r.first_chunk <= 5
                           < r.first_chunk + len(r.entries) for r in records)


@pytest.mark.parametrize("commit", ["flush", "write"])
@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_journal_recycling(tmp_path, compact, commit):
    """A 4 KiB journal (8 sectors) and many scattered writes between
    flushes: the journal fills, the metadata is written in place and the
    journal starts over; nothing is lost, closed cleanly or crashed."""
    block = 512
    size = 3 * MiB
    base = random_base(tmp_path / "base.raw", MiB, 71)
    options = f"block_size={block},journal_size=4096" + (
        ",compact_image=on,chunk_size=4096,storage_grow_unit=1M" if compact else "")
    image = create(tmp_path / "a.fvd", size, options, "base.raw")
    assert hdr(image)["journal_size"] == 4096
    model = model_of(base, size)
    rng = random.Random(72 + compact)
    blocks = list(range(0, MiB // block, 2))  # never adjacent: one record each
    rng.shuffle(blocks)
    # 32 BITMAP records fill a sector: 8 sectors hold 256; the 4th round alone is more
    rounds = [40, 40, 40, 300, 40, 40]
    with corefmt.open(str(image), read_only=False, options={"journal_commit": commit}) as disk:
        done = 0
        for count in rounds:
            for b in blocks[done:done + count]:
                write(disk, model, b * block + rng.randrange(0, 400), rng.randbytes(100))
            done += count
            write(disk, model, rng.randrange(MiB, size - 5000), rng.randbytes(5000))
            disk.flush()
        crashed = snapshot(image)
        assert_reads(disk, model, "while open")
    assert any(bitmap_of_bytes(crashed["a.fvd"])), "the journal was never recycled"
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, model, "after a clean close")
    for read_only in (True, False):
        directory = restore(crashed, tmp_path / f"crash-{read_only}", tmp_path / "base.raw")
        with corefmt.open(str(directory / "a.fvd"), read_only=read_only) as disk:
            assert_reads(disk, model, f"crash copy, read_only={read_only}")
        with corefmt.open(str(directory / "a.fvd"), read_only=True) as disk:
            assert_reads(disk, model, "crash copy reopened")


def bitmap_of_bytes(raw: bytes) -> bytes:
    offset, size = header_field(raw, 1076, "q"), header_field(raw, 1084, "q")
    return raw[offset:offset + size]


@pytest.mark.parametrize("event", ["fvd_table_update", "fvd_bitmap_update"])
def test_power_cut_inside_the_in_place_update(tmp_path, event):
    """The in-place update writes the table, then the bitmap (§10 #6): a
    power cut between them leaves mapped chunks the bitmap does not use yet
    (the base's data reads), never a bitmap bit without its chunk (zeros)."""
    block = chunk = 4096
    size = 2 * MiB
    base = random_base(tmp_path / "base.raw", MiB + 64 * KiB, 81)
    image = create(tmp_path / "a.fvd", size, f"block_size={block},compact_image=on,"
                   f"chunk_size={chunk},journal_size=4096", "base.raw")
    model = model_of(base, size)
    rng = random.Random(82)
    spec = {"driver": "fvd",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": event, "errno": 5, "once": True,
                                       "action": "powercut"}],
                     "image": {"driver": "file", "filename": str(image)}}}
    with pytest.raises(CorefmtError), corefmt.open(spec, read_only=False) as disk:
        write(disk, model, 1000, rng.randbytes(3000))
        flushed = None
        for b in range(2, 300, 2):  # scattered: more records than the journal holds
            write(disk, model, b * block + 512, rng.randbytes(1024))
            if b == 2:
                disk.flush()  # journaled, not in place
                flushed = bytes(model)
        disk.flush()  # the in-place update, cut
    assert flushed is not None
    with corefmt.open(str(image), read_only=True) as disk:
        _sectors_old_or_new(disk, flushed, bytes(model), f"power cut at {event}")
    with corefmt.open(str(image), read_only=False) as disk:
        seen = _sectors_old_or_new(disk, flushed, bytes(model), f"power cut at {event}, rw")
    with corefmt.open(str(image), read_only=True) as disk:
        assert_reads(disk, seen, "recovered state")


# -- info and map ---------------------------------------------------------------------------
@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compact"])
def test_info_and_map(tmp_path, compact):
    block = 4096
    size = 2 * MiB
    base = random_base(tmp_path / "base.raw", MiB, 91)
    options = f"block_size={block}" + (",compact_image=on,chunk_size=8192" if compact else "")
    image = create(tmp_path / "a.fvd", size, options, "base.raw")
    model = model_of(base, size)
    rng = random.Random(92)
    written = [(10 * block + 100, 5000), (40 * block, 2 * block), (MiB + 3 * block, 9000),
               (size - block, block)]
    with corefmt.open(str(image), read_only=False) as disk:
        for offset, length in written:
            write(disk, model, offset, rng.randbytes(length))
    info = json.loads(cli("info", "--output=json", image).stdout)
    assert info["format"] == "fvd"
    assert info["virtual-size"] == size
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    extents = json.loads(cli("map", "--output=json", image).stdout)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == size
    for e, following in itertools.pairwise(extents):
        assert e["start"] + e["length"] == following["start"]
    raw = image.read_bytes()
    own_blocks = set()
    for offset, length in written:
        own_blocks.update(range(offset // block, -(-(offset + length) // block)))
    for e in extents:
        start, end = e["start"], e["start"] + e["length"]
        if e["data"] and e["depth"] == 0:
            host = e["offset"]
            assert raw[host:host + e["length"]] == bytes(model[start:end]), e
        elif e["depth"] == 1:  # the base's part, left to the base
            assert end <= MiB
            assert not any(start // block <= b < -(-end // block) for b in own_blocks), e
            assert e["data"] and e["offset"] == start  # raw base: the same place
        else:
            assert e["zero"] and not any(model[start:end]), e
    mapped, left_to_base = set(), set()
    for e in extents:
        blocks = range(e["start"] // block, -(-(e["start"] + e["length"]) // block))
        if e["depth"] == 0 and e["data"]:
            mapped.update(blocks)
        elif e["depth"] == 1:
            left_to_base.update(blocks)
    assert own_blocks <= mapped
    assert left_to_base == set(range(MiB // block)) - own_blocks


# -- conversion of mixed chains ---------------------------------------------------------------
def _pattern_writes(rng: random.Random, size: int, count: int, first_pattern: int
                    ) -> list[tuple[int, int, int]]:
    return [(rng.randrange(0, size - 30000), rng.randrange(1, 30000), first_pattern + i)
            for i in range(count)]


@pytest.mark.interop
@pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io missing")
@pytest.mark.parametrize("chain", ["raw-fvd-qcow2", "raw-fvd-fvd"])
def test_convert_mixed_chain_to_raw(tmp_path, chain):
    size = 3 * MiB
    rng = random.Random(101)
    base = random_base(tmp_path / "base.raw", 2 * MiB, 102)
    create(tmp_path / "mid.fvd", size, "block_size=7680,compact_image=on,chunk_size=65536",
           "base.raw")
    top = tmp_path / ("top.qcow2" if chain.endswith("qcow2") else "top.fvd")
    if top.suffix == ".qcow2":
        cli("create", "-q", "-f", "qcow2", "-b", "mid.fvd", "-F", "fvd", top.name,
            cwd=tmp_path)
    else:
        create(top, size, "block_size=65536", "mid.fvd", "fvd")
    mid_writes = _pattern_writes(rng, size, 15, 0x20)
    top_writes = _pattern_writes(rng, size, 15, 0x60)
    for path, writes in ((tmp_path / "mid.fvd", mid_writes), (top, top_writes)):
        with corefmt.open(str(path), read_only=False) as disk:
            for offset, length, pattern in writes:
                disk.write(offset, bytes([pattern]) * length)
    reference = tmp_path / "reference.raw"
    reference.write_bytes(base)
    qemu(QEMU_IMG, "resize", "-q", "-f", "raw", reference, str(size))
    script = []
    for offset, length, pattern in mid_writes + top_writes:
        script += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    qemu(QEMU_IO, "-f", "raw", *script, reference)
    cli("convert", "-O", "raw", top.name, "converted.raw", cwd=tmp_path)
    result = qemu(QEMU_IMG, "compare", "-f", "raw", "-F", "raw", "converted.raw",
                  "reference.raw", cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

"""Hostile bitmap directories: a qemu-made image with two bitmaps whose
extension, directory entries and bitmap tables are set to values past the
file, misaligned, huge or pointing at metadata, and randomly mutated. Each
case is opened read-only (info), then read-write (a write, close): the
outcome is success or one CorefmtError of one line, never a crash, within
a time and memory bound, and an image corefmt wrote still passes qemu-img
check's corruption test."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import CorefmtError
from tests.fuzzing import CaseTimeout, time_limit

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024
CLUSTER = 4 * KiB
EXT_BITMAPS = 0x23852875
CASE_SECONDS = 2.0
MEMORY_BOUND = 64 * MiB


def run(*args: object) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("bitmap-fuzz") / "seed.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, "4M")
    run(QEMU_IMG, "bitmap", "--add", "-g", "512", path, "first")
    run(QEMU_IMG, "bitmap", "--add", "--disable", path, "second")
    run(QEMU_IO, "-c", "write 0 8k", "-c", "write 3M 4k", path)
    return path.read_bytes()


def locate(image: bytes) -> dict[str, int]:
    """Offsets of the bitmaps extension's data, the directory, its entries
    and the first bitmap's table."""
    position = struct.unpack_from(">I", image, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", image, position)
        if kind == EXT_BITMAPS:
            break
        assert kind, "no bitmaps extension"
        position += 8 + length + (-length % 8)
    ext = position + 8
    directory = struct.unpack_from(">Q", image, ext + 16)[0]
    name_size = struct.unpack_from(">H", image, directory + 18)[0]
    second = directory + ((24 + name_size + 7) // 8) * 8
    table = struct.unpack_from(">Q", image, directory)[0]
    return {"ext": ext, "dir": directory, "second": second, "table": table,
            "l1": struct.unpack_from(">Q", image, 40)[0],
            "reftable": struct.unpack_from(">Q", image, 48)[0]}


def patch(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(image)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


#: (field, offset key, delta, struct format, value) of each hostile value.
HOSTILE = [
    ("nb_bitmaps 0", "ext", 0, ">I", 0),
    ("nb_bitmaps 65536", "ext", 0, ">I", 65536),
    ("nb_bitmaps 3", "ext", 0, ">I", 3),
    ("nb_bitmaps 1", "ext", 0, ">I", 1),
    ("reserved", "ext", 4, ">I", 1),
    ("directory size 0", "ext", 8, ">Q", 0),
    ("directory size huge", "ext", 8, ">Q", 2**63),
    ("directory size past file", "ext", 8, ">Q", 60 * MiB),
    ("directory size short", "ext", 8, ">Q", 20),
    ("directory offset unaligned", "ext", 16, ">Q", 4 * KiB + 8),
    ("directory offset past file", "ext", 16, ">Q", 1 << 40),
    ("directory offset 0", "ext", 16, ">Q", 0),
    ("table offset past file", "dir", 0, ">Q", 1 << 40),
    ("table offset unaligned", "dir", 0, ">Q", 4 * KiB + 512),
    ("table offset 0", "dir", 0, ">Q", 0),
    ("table offset = header", "dir", 0, ">Q", 0),
    ("table size 0", "dir", 8, ">I", 0),
    ("table size huge", "dir", 8, ">I", 0xFFFFFFFF),
    ("table size too small", "second", 8, ">I", 0),
    ("reserved flags", "dir", 12, ">I", 1 << 5),
    ("in-use flag", "dir", 12, ">I", 3),
    ("type", "dir", 16, ">B", 2),
    ("granularity 0", "dir", 17, ">B", 0),
    ("granularity 8", "dir", 17, ">B", 8),
    ("granularity 32", "dir", 17, ">B", 32),
    ("granularity 255", "dir", 17, ">B", 255),
    ("name past directory", "second", 18, ">H", 0xFFFF),
    ("name size 0", "dir", 18, ">H", 0),
    ("extra data", "dir", 20, ">I", 8),
    ("extra data huge", "dir", 20, ">I", 0xFFFFFFFF),
    ("table entry reserved bits", "table", 0, ">Q", 1 << 60),
    ("table entry past file", "table", 0, ">Q", 1 << 40),
    ("table entry unaligned", "table", 0, ">Q", 8 * KiB + 512),
    ("table entry all ones with offset", "table", 0, ">Q", 8 * KiB | 1),
    ("table entry all ones", "table", 0, ">Q", 1),
    ("table entry -> header", "table", 0, ">Q", 0),
    ("table entry -> L1", "table", 0, ">Q", -1),
    ("table entry -> refcount table", "table", 0, ">Q", -2),
    ("table entry -> directory", "table", 0, ">Q", -3),
]


def hostile(image: bytes, key: str, delta: int, fmt: str, value: int) -> bytes:
    places = locate(image)
    named = {-1: places["l1"], -2: places["reftable"], -3: places["dir"]}
    if value in named:
        value = named[value]
    if key == "table" and value == 0 and fmt == ">Q":
        return patch(image, places["table"], fmt, 0)  # header cluster: "no data" (valid)
    return patch(image, places[key] + delta, fmt, value)


def exercise(path: Path) -> None:
    """Read-only info, then a read-write session that writes; only a
    one-line CorefmtError may stop it."""
    tracemalloc.start()
    try:
        with time_limit(CASE_SECONDS):
            for read_only in (True, False):
                try:
                    with corefmt.open(str(path), "qcow2", read_only=read_only) as node:
                        image = node.layer().image
                        image.info()
                        image.bitmap_list()
                        if not read_only:
                            node.write(512, b"z" * 4096)
                except CorefmtError as error:
                    assert str(error) and "\n" not in str(error), str(error)
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    except CaseTimeout:
        pytest.fail("a case took too long")
    finally:
        tracemalloc.stop()


def _corruptions(path: Path) -> int:
    """What qemu-img check counts (a check it cannot finish: -1)."""
    result = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)],
                            capture_output=True, text=True, timeout=60)
    try:
        return json.loads(result.stdout).get("corruptions", 0)
    except ValueError:
        return -1


@pytest.mark.parametrize("case", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_bitmap_fields_give_one_line(seed, tmp_path, case):
    _name, key, delta, fmt, value = case
    path = tmp_path / "hostile.qcow2"
    path.write_bytes(hostile(seed, key, delta, fmt, value))
    exercise(path)


def test_table_entries_pointing_at_metadata_are_refused_for_writing(seed, tmp_path):
    """Close would free such a cluster: the read-write open refuses instead."""
    places = locate(seed)
    for target in (places["l1"], places["reftable"], places["dir"]):
        path = tmp_path / "meta.qcow2"
        path.write_bytes(patch(seed, places["table"], ">Q", target))
        before = path.read_bytes()
        with pytest.raises(CorefmtError, match="overlaps with"):
            corefmt.open(str(path), "qcow2").close()
        assert path.read_bytes() == before


def test_nb_bitmaps_past_qemus_maximum(seed, tmp_path):
    path = tmp_path / "many.qcow2"
    path.write_bytes(patch(seed, locate(seed)["ext"], ">I", 65536))
    with pytest.raises(CorefmtError, match="bitmaps_ext: Image has 65536 bitmaps, exceeding "
                                           "the QEMU supported maximum of 65535"):
        corefmt.open(str(path), "qcow2", read_only=True)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_random_mutations_of_bitmap_metadata(seed, tmp_path_factory, data):
    places = locate(seed)
    regions = {"ext": (places["ext"], 24), "dir": (places["dir"], 64),
               "table": (places["table"], 16)}
    region = data.draw(st.sampled_from(sorted(regions)))
    start, length = regions[region]
    image = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        offset = start + data.draw(st.integers(0, length - 1))
        image[offset] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("mutated") / "mutated.qcow2"
    path.write_bytes(bytes(image))
    before = _corruptions(path)
    exercise(path)
    assert _corruptions(path) <= max(before, 0)  # corefmt made nothing worse

"""`corefmt check` on qcow2 against qemu-img check: images qemu-img and
qemu-io make, then damaged by editing their bytes (leaks, refcounts too
low or zero, wrong COPIED flags, unaligned and out-of-image table entries),
checked and repaired by both; the reports, exit codes, the ERROR/Leaked/
Repairing lines and the repaired images must agree."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corefmt.cli.main import main

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

pytestmark = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                reason="qemu-img/qemu-io not installed (qemu-utils)")

KiB, MiB = 1024, 1024 * 1024
ENV = {**os.environ, "LC_ALL": "C"}


# -- running both ---------------------------------------------------------------------
def qemu(program: str, *args: str | Path) -> subprocess.CompletedProcess:
    """qemu-img or qemu-io, run in the image's directory: qemu 7.2 finds a
    relative data file name from its working directory (corefmt from the
    image's)."""
    where = next((arg.parent for arg in args if isinstance(arg, Path)), None)
    return subprocess.run([program, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=60, check=False, cwd=where)


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess:
    return qemu(QEMU_IMG or "qemu-img", *args)


def qemu_io(*args: str | Path) -> subprocess.CompletedProcess:
    return qemu(QEMU_IO or "qemu-io", *args)


def corefmt(*args: str | Path) -> subprocess.CompletedProcess:
    """The corefmt CLI, in this process (fast): its status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in args])
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


def report_lines(stderr: str) -> list[str]:
    """What a check printed on stderr, sorted, without the program's name."""
    lines = (line.removeprefix("qemu-img: ").removeprefix("corefmt: ")
             for line in stderr.splitlines())
    return sorted(lines)


def check_json(run: Callable[..., subprocess.CompletedProcess], *args: str | Path
               ) -> tuple[int, dict, list[str]]:
    done = run("check", "--output=json", *args)
    document = json.loads(done.stdout) if done.stdout.strip() else {}
    document.pop("filename", None)
    return done.returncode, document, report_lines(done.stderr)


# -- editing qcow2 bytes --------------------------------------------------------------
class Raw:
    """A qcow2 file's tables, read and written byte by byte (no driver)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as file:
            head = file.read(112)
        (_magic, self.version, _bo, _bs, self.cluster_bits, self.size, _crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack_from(">4sIQIIQIIQQIIQ", head)
        self.cs = 1 << self.cluster_bits
        if self.version >= 3:
            self.incompat, self.compat, _auto, order, _hl = struct.unpack_from(">QQQII", head,
                                                                               72)
        else:
            self.incompat, order = 0, 4
        self.bits = 1 << order
        self.extended = bool(self.incompat & 16)
        self.entry_size = 16 if self.extended else 8

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(offset)
            return file.read(length)

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as file:
            file.seek(offset)
            file.write(data)

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.read(offset, 8))[0]

    def set_u64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value))

    # L1 and L2
    def l1_pos(self, index: int) -> int:
        return self.l1_offset + index * 8

    def l2_pos(self, guest: int) -> int:
        l1_index, l2_index = divmod(guest // self.cs, self.cs // self.entry_size)
        table = self.u64(self.l1_pos(l1_index)) & 0x00FFFFFFFFFFFE00
        assert table, f"no L2 table for guest offset {guest:#x}"
        return table + l2_index * self.entry_size

    def host(self, guest: int) -> int:
        return self.u64(self.l2_pos(guest)) & 0x00FFFFFFFFFFFE00

    # refcounts
    def reftable_pos(self, index: int) -> int:
        return self.rt_offset + index * 8

    def refcount_pos(self, cluster: int) -> tuple[int, int]:
        """(byte offset, bit shift) of a cluster's refcount entry."""
        per_block = self.cs * 8 // self.bits
        block_index, index = divmod(cluster, per_block)
        block = self.u64(self.reftable_pos(block_index)) & ~0x1FF
        assert block, f"no refcount block for cluster {cluster}"
        if self.bits >= 8:
            return block + index * self.bits // 8, 0
        return block + index * self.bits // 8, index * self.bits % 8

    def refcount(self, cluster: int) -> int:
        position, shift = self.refcount_pos(cluster)
        width = max(self.bits // 8, 1)
        value = int.from_bytes(self.read(position, width), "big")
        return value >> shift & ((1 << self.bits) - 1) if self.bits < 8 else value

    def set_refcount(self, cluster: int, value: int) -> None:
        position, shift = self.refcount_pos(cluster)
        if self.bits >= 8:
            self.write(position, value.to_bytes(self.bits // 8, "big"))
            return
        mask = ((1 << self.bits) - 1) << shift
        byte = self.read(position, 1)[0] & ~mask | value << shift
        self.write(position, bytes([byte]))

    def file_clusters(self) -> int:
        return -(-self.path.stat().st_size // self.cs)


# -- images qemu makes ----------------------------------------------------------------
def create(path: Path, options: str = "", size: str = "4M") -> Path:
    args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
    done = qemu_img(*args, path, size)
    assert done.returncode == 0, done.stderr
    return path


def write(path: Path, *commands: str) -> Path:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    done = qemu_io(*args, path)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr
    return path


WRITES = ("write -P 1 0 64k", "write -P 2 1M 128k", "write -P 3 3M 4k")


def plain(directory: Path, options: str = "") -> Path:
    return write(create(directory / "img.qcow2", options), *WRITES)


def with_snapshot(directory: Path) -> Path:
    path = plain(directory)
    assert qemu_img("snapshot", "-c", "s1", path).returncode == 0
    return write(path, "write -P 9 0 4k")  # copied: cluster 0 no longer shared


def compressed(directory: Path) -> Path:
    source = directory / "source.qcow2"
    write(create(source), *WRITES, "write -P 5 2M 256k")
    path = directory / "img.qcow2"
    done = qemu_img("convert", "-c", "-O", "qcow2", source, path)
    assert done.returncode == 0, done.stderr
    source.unlink()
    return write(path, "write -P 7 3M 64k")  # a normal cluster among compressed ones


def extended(directory: Path) -> Path:
    return write(create(directory / "img.qcow2", "extended_l2=on,cluster_size=128k"),
                 "write -P 1 0 4k", "write -P 2 1M 128k", "write -z 2M 8k",
                 "write -P 3 3M 64k")


def zeroes(directory: Path) -> Path:
    """Zero clusters that keep their host cluster (qemu's ZERO_ALLOC)."""
    return write(plain(directory), "write -z 1M 64k", "write -z -u 3M 64k")


def bitmaps(directory: Path) -> Path:
    """A persistent bitmap (its directory and table are refcounted)."""
    path = plain(directory)
    assert qemu_img("bitmap", "--add", path, "b0").returncode == 0
    return path


def data_file(directory: Path) -> Path:
    path = create(directory / "img.qcow2", "data_file=img.data")
    return write(path, *WRITES)


def dirty(directory: Path) -> Path:
    """lazy_refcounts, left dirty: qemu-io killed before it closes."""
    path = create(directory / "img.qcow2", "lazy_refcounts=on")
    write(path, "write -P 1 0 64k")
    done = qemu_io("-c", "write -P 2 1M 192k", "-c", "write -P 3 0 4k",
                   "-c", "sigraise 9", path)
    assert done.returncode == -signal.SIGKILL, done
    assert Raw(path).incompat & 1, "not dirty"
    return path


BASES: dict[str, Callable[[Path], Path]] = {
    "plain": plain,
    "v2": lambda d: plain(d, "compat=0.10"),
    "snapshot": with_snapshot,
    "compressed": compressed,
    "extended_l2": extended,
    "zeroes": zeroes,
    "refcount_bits_1": lambda d: plain(d, "refcount_bits=1"),
    "refcount_bits_64": lambda d: plain(d, "refcount_bits=64"),
    "cluster_512": lambda d: plain(d, "cluster_size=512"),
    "cluster_2M": lambda d: plain(d, "cluster_size=2M"),
    "data_file": data_file,
    "bitmaps": bitmaps,
    "dirty": dirty,
}


# -- damage ---------------------------------------------------------------------------
def leak_free(raw: Raw) -> None:
    """A free cluster past the end counted as used."""
    raw.set_refcount(raw.file_clusters() + 2, 1)


def leak_bump(raw: Raw) -> None:
    """A data cluster counted twice (so COPIED is wrong too)."""
    cluster = raw.host(1 * MiB) // raw.cs
    raw.set_refcount(cluster, raw.refcount(cluster) + 1)


def leak_l2_table(raw: Raw) -> None:
    """An L2 table (metadata) counted twice."""
    cluster = (raw.u64(raw.l1_pos(0)) & 0x00FFFFFFFFFFFE00) // raw.cs
    raw.set_refcount(cluster, raw.refcount(cluster) + 1)


def refcount_zero(raw: Raw) -> None:
    """A used data cluster counted as free: refcounts are rebuilt."""
    raw.set_refcount(raw.host(1 * MiB) // raw.cs, 0)


def refcount_low(raw: Raw) -> None:
    """A cluster a snapshot shares (refcount 2) counted once."""
    raw.set_refcount(raw.host(1 * MiB) // raw.cs, 1)


def copied_l1(raw: Raw) -> None:
    raw.set_u64(raw.l1_pos(0), raw.u64(raw.l1_pos(0)) & ~(1 << 63))


def copied_l2_clear(raw: Raw) -> None:
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position, raw.u64(position) & ~(1 << 63))


def copied_l2_set(raw: Raw) -> None:
    """COPIED on a cluster a snapshot shares."""
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position, raw.u64(position) | 1 << 63)


def l2_unaligned(raw: Raw) -> None:
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position, raw.u64(position) + 512)


def l2_unaligned_zero(raw: Raw) -> None:
    """A preallocated zero cluster with an unaligned offset (qemu repairs it)."""
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position, raw.u64(position) + 512)


def l2_outside(raw: Raw) -> None:
    position = raw.l2_pos(3 * MiB)
    raw.set_u64(position, (raw.file_clusters() + 8) * raw.cs | 1 << 63)


def l1_unaligned(raw: Raw) -> None:
    raw.set_u64(raw.l1_pos(0), raw.u64(raw.l1_pos(0)) + 512)


def reftable_unaligned(raw: Raw) -> None:
    raw.set_u64(raw.reftable_pos(0), raw.u64(raw.reftable_pos(0)) + 512)


def reftable_unaligned_data(raw: Raw) -> None:
    """A refcount block entry unaligned into data clusters: the rebuild
    works, but qemu's image has no driver after the corruption it signalled."""
    raw.set_u64(raw.reftable_pos(0), raw.host(1 * MiB) + 512)


def reftable_reserved(raw: Raw) -> None:
    raw.set_u64(raw.reftable_pos(0), raw.u64(raw.reftable_pos(0)) | 1)


def l1_reserved(raw: Raw) -> None:
    raw.set_u64(raw.l1_pos(0), raw.u64(raw.l1_pos(0)) | 1 << 56)


def l2_reserved(raw: Raw) -> None:
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position, raw.u64(position) | 1 << 57)


def bitmap_corrupt(raw: Raw) -> None:
    """Extended L2: a subcluster both allocated and zero."""
    position = raw.l2_pos(1 * MiB)
    raw.set_u64(position + 8, raw.u64(position + 8) | 1 << 32)


def bitmap_unallocated(raw: Raw) -> None:
    """Extended L2: allocation bits on a cluster without a host cluster."""
    raw.set_u64(raw.l2_pos(1 * MiB + 512 * KiB) + 8, 3)


def compressed_copied(raw: Raw) -> None:
    raw.set_u64(raw.l2_pos(0), raw.u64(raw.l2_pos(0)) | 1 << 63)


def reftable_outside(raw: Raw) -> None:
    """A refcount block past the end of the file (qemu makes the file longer)."""
    raw.set_u64(raw.reftable_pos(1), (raw.file_clusters() + 4) * raw.cs)


DAMAGES: dict[str, Callable[[Raw], None]] = {
    name: function for name, function in globals().items()
    if name in ("leak_free", "leak_bump", "leak_l2_table", "refcount_zero", "copied_l1",
                "copied_l2_clear", "l2_unaligned", "l2_outside", "l1_unaligned",
                "reftable_unaligned", "reftable_unaligned_data", "reftable_reserved",
                "l1_reserved", "l2_reserved", "reftable_outside")
}
#: (base, damage) pairs, beyond every damage on the plain image.
CASES = [("plain", name) for name in DAMAGES] + [
    (base, None) for base in BASES] + [
    ("snapshot", "refcount_low"), ("snapshot", "copied_l2_set"),
    ("snapshot", "leak_bump"), ("snapshot", "refcount_zero"),
    ("zeroes", "l2_unaligned_zero"),
    ("compressed", "leak_free"), ("compressed", "refcount_zero"),
    ("extended_l2", "leak_bump"), ("extended_l2", "refcount_zero"),
    ("extended_l2", "copied_l2_clear"), ("extended_l2", "bitmap_corrupt"),
    ("extended_l2", "bitmap_unallocated"), ("extended_l2", "l2_unaligned"),
    ("compressed", "compressed_copied"), ("bitmaps", "leak_free"),
    ("bitmaps", "refcount_zero"),
    ("refcount_bits_1", "leak_free"), ("refcount_bits_1", "refcount_zero"),
    ("refcount_bits_64", "leak_bump"), ("refcount_bits_64", "refcount_zero"),
    ("cluster_512", "leak_bump"), ("cluster_512", "refcount_zero"),
    ("cluster_512", "reftable_outside"),
    ("cluster_2M", "leak_free"), ("cluster_2M", "refcount_zero"),
    ("data_file", "copied_l2_clear"), ("data_file", "leak_free"),
    ("v2", "leak_bump"), ("v2", "refcount_zero"),
]
DAMAGES.update(refcount_low=refcount_low, copied_l2_set=copied_l2_set,
               l2_unaligned_zero=l2_unaligned_zero, bitmap_corrupt=bitmap_corrupt,
               bitmap_unallocated=bitmap_unallocated, compressed_copied=compressed_copied)


def case_id(case: tuple[str, str | None]) -> str:
    return f"{case[0]}-{case[1] or 'clean'}"


def build(directory: Path, base: str, damage: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = BASES[base](directory)
    if damage:
        DAMAGES[damage](Raw(path))
    return path


def copy_image(path: Path, directory: Path) -> Path:
    """The image (and its data file) in another directory."""
    directory.mkdir()
    for item in path.parent.iterdir():
        shutil.copy2(item, directory / item.name)
    return directory / path.name


# -- the tests ------------------------------------------------------------------------
#: Cases where qemu-img check -r leaves the image worse than corefmt does, and why.
#: corefmt's repaired image must then be clean.
CLEANER_THAN_QEMU = {
    ("plain", "reftable_unaligned_data", "all"):
        "qemu's image has no driver after the corruption it signalled: the leak its "
        "repair counted down stays in its refcount cache, never written",
}
#: qemu rewrites persistent bitmaps when it opens an image read-write and
#: closes it (new directory and tables: the file grows), corefmt leaves them
#: as they are: after a repair both images are compared for being clean only.
BITMAPS_REWRITTEN = {"bitmaps"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple], Path]:
    """Each case's image, built once for the module."""
    root = tmp_path_factory.mktemp("check")
    built: dict[tuple, Path] = {}

    def get(case: tuple) -> Path:
        if case not in built:
            built[case] = build(root / case_id(case) / "image", *case)
        return built[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_check_agrees_with_qemu_img(images, case):
    """Same JSON (but the file name), exit status, stderr lines and human report."""
    path = images(case)
    by_qemu = check_json(qemu_img, path)
    assert check_json(corefmt, path) == by_qemu
    human_qemu, human_corefmt = qemu_img("check", path), corefmt("check", path)
    assert (human_corefmt.returncode, human_corefmt.stdout) == (human_qemu.returncode,
                                                                human_qemu.stdout)


def _repair_cases() -> list:
    cases = []
    for case in CASES:
        for mode in ("leaks", "all"):
            cases.append(pytest.param(case, mode, id=f"{case_id(case)}-{mode}"))
    return cases


@pytest.mark.parametrize(("case", "mode"), _repair_cases())
def test_repair_agrees_with_qemu_img(images, tmp_path, case, mode):
    """check -r: same exit status, report and stderr lines; afterwards qemu-img
    check finds the same in both images, and they read the same."""
    path = images(case)
    by_qemu, by_corefmt = (copy_image(path, tmp_path / "qemu"),
                           copy_image(path, tmp_path / "corefmt"))
    repaired_qemu = qemu_img("check", "-r", mode, by_qemu)
    repaired_corefmt = corefmt("check", "-r", mode, by_corefmt)
    assert (repaired_corefmt.returncode, repaired_corefmt.stdout,
            report_lines(repaired_corefmt.stderr)) == (
        repaired_qemu.returncode, repaired_qemu.stdout, report_lines(repaired_qemu.stderr))
    after_qemu, after_corefmt = check_json(qemu_img, by_qemu), check_json(qemu_img, by_corefmt)
    if (*case, mode) in CLEANER_THAN_QEMU:
        assert after_qemu[0] != 0 and after_corefmt[0] == 0
    elif case[0] in BITMAPS_REWRITTEN:
        assert after_corefmt[0] == 0 or after_qemu[0] != 0
    else:
        assert after_corefmt == after_qemu
    if after_qemu[0] == 0:  # qemu-img compare reads only images without corruption
        compared = qemu_img("compare", by_qemu, by_corefmt)
        assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.mark.parametrize("case", [("plain", "leak_bump"), ("plain", "refcount_zero"),
                                  ("snapshot", "refcount_low"), ("plain", "copied_l1"),
                                  ("plain", "reftable_outside")], ids=case_id)
def test_repair_json_agrees_with_qemu_img(images, tmp_path, case):
    """check -r all --output=json: the double check's counts with the repair's
    fixed counts."""
    path = images(case)
    by_qemu, by_corefmt = (copy_image(path, tmp_path / "qemu"),
                           copy_image(path, tmp_path / "corefmt"))
    assert check_json(corefmt, "-r", "all", by_corefmt) == check_json(qemu_img, "-r", "all",
                                                                      by_qemu)


def test_dirty_image_is_repaired_when_opened_read_write(images, tmp_path):
    """A dirty lazy_refcounts image: corefmt's read-write open rebuilds its
    refcounts as qemu's does."""
    path = images(("dirty", None))
    by_qemu, by_corefmt = (copy_image(path, tmp_path / "qemu"),
                           copy_image(path, tmp_path / "corefmt"))
    assert check_json(qemu_img, by_qemu)[0] == 2  # refcount=0 for used clusters
    assert qemu_io("-c", "read 0 4k", by_qemu).returncode == 0
    assert corefmt("io", "-c", "read 0 4k", by_corefmt).returncode == 0
    assert not Raw(by_corefmt).incompat & 1
    after = check_json(qemu_img, by_corefmt)
    assert after[0] == 0
    assert after == check_json(qemu_img, by_qemu)
    assert qemu_img("compare", by_qemu, by_corefmt).returncode == 0


def test_corruption_repair_clears_the_corrupt_bit(images, tmp_path):
    """An image qemu marked corrupt (incompatible bit 1) is opened read-write
    by check -r, and the bit cleared once nothing is left to repair."""
    path = copy_image(images(("plain", "copied_l2_clear")), tmp_path / "image")
    raw = Raw(path)
    raw.set_u64(72, raw.incompat | 2)
    by_qemu = copy_image(path, tmp_path / "qemu")
    assert qemu_img("check", "-r", "all", by_qemu).returncode == 0
    assert not Raw(by_qemu).incompat & 2
    done = corefmt("check", "-r", "all", path)
    assert done.returncode == 0, done.stderr
    assert not Raw(path).incompat & 2

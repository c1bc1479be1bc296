"""qcow2 on hostile images: qemu-made images with hand-edited headers and
tables. Every refusal is a CorefmtError with one clear line (qemu's wording
where the issue asks for it), healthy ranges still read, a write into damaged
metadata marks the image corrupt where qemu does, and nothing else escapes.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import CorefmtError
from tests.conftest import run_cli

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024
CLUSTER = 64 * KiB
#: Offsets of the fixed header fields (qcow2.txt).
MAGIC, VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE = 0, 4, 8, 16, 20, 24
CRYPT, L1_SIZE, L1_OFFSET, RT_OFFSET, RT_CLUSTERS = 32, 36, 40, 48, 56
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH = 72, 80, 88, 96, 100
OFLAG_COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: Memory a refused open may take (the issue: no allocation sized by a header field).
MEMORY_BOUND = 64 * MiB
#: A hostile open must end well within this (seconds).
HANG_BOUND = 3


def qemu(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check and result.returncode:
        raise AssertionError(f"{args[0]} failed: {result.stderr}")
    return result


def qemu_error(path: Path) -> str | None:
    """qemu-img info's refusal, without "qemu-img: Could not open '...': "."""
    result = qemu(QEMU_IMG, "info", "-f", "qcow2", path, check=False)
    if not result.returncode:
        return None
    line = result.stderr.strip().splitlines()[-1]
    return line.split("': ", 1)[1] if "': " in line else line


def qemu_corrupt(path: Path) -> bool:
    return '"corrupt": true' in qemu(QEMU_IMG, "info", "-U", "--output=json", path).stdout


def u(data: bytes | bytearray, offset: int, fmt: str = "Q") -> int:
    return struct.unpack_from(">" + fmt, data, offset)[0]


def patched(source: Path, target: Path,
            edit: Callable[[bytearray], None]) -> Path:
    data = bytearray(source.read_bytes())
    edit(data)
    target.write_bytes(data)
    return target


def put(offset: int, value: int, fmt: str = "Q") -> Callable[[bytearray], None]:
    return lambda data: struct.pack_into(">" + fmt, data, offset, value)


def open_error(path: Path, read_only: bool = True) -> CorefmtError | None:
    """The CorefmtError opening (and reading all of) the image raises, or None.
    Any other exception fails the test."""
    try:
        with corefmt.open(str(path), "qcow2", read_only=read_only) as disk:
            disk.read(0, min(disk.virtual_size, 8 * MiB))
    except CorefmtError as error:
        assert str(error).strip() and "\n" not in str(error)
        return error
    return None


# -- images qemu made ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``plain``: 4 MiB v3 with data; ``tables``/``xl2``: 520 MiB (two L1 entries),
    guest cluster 0 compressed, 1M and 2M plain data, 514M plain data (a
    second L2 table, another status chunk); ``xl2`` with extended L2."""
    directory = tmp_path_factory.mktemp("hostile")
    plain = directory / "plain.qcow2"
    qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", plain, "4M")
    qemu(QEMU_IO, "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 1M 4k", plain)
    raw = directory / "source.raw"
    rng = random.Random(3)
    with raw.open("wb") as out:
        out.truncate(520 * MiB)
        out.write(bytes(rng.randrange(4) for _ in range(CLUSTER)))  # compressible
    made = {"plain": plain}
    for name, options in (("tables", "cluster_size=65536"),
                          ("xl2", "cluster_size=65536,extended_l2=on")):
        path = directory / f"{name}.qcow2"
        qemu(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", options, raw, path)
        qemu(QEMU_IO, "-c", "write -P 0xbb 1M 64k", "-c", "write -P 0xcc 2M 64k",
             "-c", "write -P 0xdd 514M 64k", path)
        made[name] = path
    return made


# -- 1. hand-edited headers ------------------------------------------------------------
#: (id, edit, words corefmt's message must hold, whether it must hold qemu's own message)
HEADER_CASES: list[tuple[str, Callable[[bytearray], None], str, bool]] = [
    ("bad-magic", put(MAGIC, 0x12345678, "I"), "Image is not in qcow2 format", True),
    ("version-1", put(VERSION, 1, "I"), "Unsupported qcow2 version 1", True),
    ("version-4", put(VERSION, 4, "I"), "Unsupported qcow2 version 4", True),
    ("cluster-bits-8", put(CLUSTER_BITS, 8, "I"), "Unsupported cluster size: 2^8", True),
    ("cluster-bits-22", put(CLUSTER_BITS, 22, "I"), "Unsupported cluster size: 2^22", True),
    ("huge-size", put(SIZE, (1 << 63) - 1), "Image is too big", True),
    ("l1-size-huge", put(L1_SIZE, 0x7FFFFFFF, "I"), "Active L1 table too large", True),
    ("l1-size-just-too-big", put(L1_SIZE, 32 * MiB // 8 + 1, "I"),
     "Active L1 table too large", True),
    ("l1-offset-unaligned", put(L1_OFFSET, 0x30200), "L1 table offset", False),
    ("l1-offset-past-eof", put(L1_OFFSET, 1 << 40), "past the end of the file", False),
    ("reftable-huge", put(RT_CLUSTERS, 0x7FFFFFFF, "I"), "Reference count table too large",
     True),
    ("reftable-unaligned", put(RT_OFFSET, 0x10200), "reference count table offset", False),
    ("reftable-past-eof", put(RT_OFFSET, 1 << 40), "past the end of the file", False),
    ("reftable-no-clusters", put(RT_CLUSTERS, 0, "I"), "reference count table", False),
    ("refcount-order-7", put(REFCOUNT_ORDER, 7, "I"),
     "Reference count entry width too large; may not exceed 64 bits", True),
    ("unknown-incompat-bit-20", put(INCOMPAT, 1 << 20),
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000", True),
    ("unknown-incompat-bit-5", put(INCOMPAT, 1 << 5),
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 20", True),
    ("header-length-odd", put(HEADER_LENGTH, 113, "I"), "header", False),
    ("header-length-too-big", put(HEADER_LENGTH, 1 << 20, "I"),
     "qcow2 header exceeds cluster size", True),
    ("header-length-cluster-plus-8", put(HEADER_LENGTH, CLUSTER + 8, "I"),
     "qcow2 header exceeds cluster size", True),
    ("extension-past-cluster", put(116, 100000, "I"), "extension", False),
    ("backing-offset-past-cluster",
     lambda d: (put(BACKING_OFFSET, 70000)(d), put(BACKING_SIZE, 10, "I")(d)),
     "backing file", False),
    ("backing-size-too-long",
     lambda d: (put(BACKING_OFFSET, 512)(d), put(BACKING_SIZE, 2000, "I")(d)),
     "Backing file name too long", True),
    ("crypt-method-1", put(CRYPT, 1, "I"), "AES", False),
    ("crypt-method-2", put(CRYPT, 2, "I"), "LUKS", False),
    ("crypt-method-3", put(CRYPT, 3, "I"), "encrypt", False),
]


@pytest.mark.parametrize(("edit", "words", "as_qemu"),
                         [pytest.param(*case[1:], id=case[0]) for case in HEADER_CASES])
def test_edited_header_refused(images: dict[str, Path], tmp_path: Path,
                               edit: Callable[[bytearray], None], words: str,
                               as_qemu: bool) -> None:
    path = patched(images["plain"], tmp_path / "edited.qcow2", edit)
    tracemalloc.start()
    try:
        error = open_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error is not None, "the edited image opened"
    assert words.lower() in str(error).lower()
    assert peak < MEMORY_BOUND, f"a refused open allocated {peak / MiB:.0f} MiB"
    if as_qemu:
        theirs = qemu_error(path)
        assert theirs is not None and theirs in str(error), (theirs, str(error))


def test_incompatible_bit_named_from_feature_table(images: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """The image's own feature name table names an unknown bit, as qemu says it."""
    def edit(data: bytearray) -> None:
        at = data.index(b"extended L2 entries")  # qemu's entry (type 0, bit 4)
        data[at - 1] = 20
        data[at:at + 46] = b"my feature".ljust(46, b"\0")
        put(INCOMPAT, 1 << 20)(data)

    path = patched(images["plain"], tmp_path / "named.qcow2", edit)
    error = open_error(path)
    assert error is not None and "Unsupported qcow2 feature(s): my feature" in str(error)
    assert qemu_error(path) == "Unsupported qcow2 feature(s): my feature"
    result = run_cli("info", "-f", "qcow2", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("corefmt: ")
    assert "my feature" in result.stderr


def test_header_refusal_is_one_cli_line(images: dict[str, Path], tmp_path: Path) -> None:
    path = patched(images["plain"], tmp_path / "l1.qcow2", put(L1_SIZE, 0x7FFFFFFF, "I"))
    result = run_cli("convert", "-f", "qcow2", "-O", "raw", str(path), str(tmp_path / "o.raw"))
    assert result.returncode == 1
    assert result.stderr.startswith("corefmt: ") and result.stderr.count("\n") == 1
    assert "Active L1 table too large" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_autoclear_bit_cleared_by_a_write(images: dict[str, Path],
                                                  tmp_path: Path) -> None:
    ours = patched(images["plain"], tmp_path / "ours.qcow2", put(AUTOCLEAR, 1 << 10))
    theirs = patched(images["plain"], tmp_path / "theirs.qcow2", put(AUTOCLEAR, 1 << 10))
    with corefmt.open(str(ours), "qcow2", read_only=True) as disk:
        assert disk.read(0, 4096) == b"\xaa" * 4096
    assert u(ours.read_bytes(), AUTOCLEAR) == 1 << 10  # a read-only open changes nothing
    with corefmt.open(str(ours), "qcow2") as disk:
        disk.write(0, b"\x11" * 512)
    qemu(QEMU_IO, "-c", "write -P 0x11 0 512", theirs)
    assert u(ours.read_bytes(), AUTOCLEAR) == u(theirs.read_bytes(), AUTOCLEAR) == 0
    with corefmt.open(str(ours), "qcow2", read_only=True) as disk:
        assert disk.read(0, 1024) == b"\x11" * 512 + b"\xaa" * 512


def test_unknown_compatible_bit_ignored(images: dict[str, Path], tmp_path: Path) -> None:
    path = patched(images["plain"], tmp_path / "compat.qcow2", put(COMPAT, 1 << 10))
    assert open_error(path) is None
    with corefmt.open(str(path), "qcow2") as disk:
        assert disk.read(1 * MiB, 4096) == b"\xbb" * 4096
        disk.write(8192, b"\x22" * 512)
    assert u(path.read_bytes(), COMPAT) & 1 << 10  # kept, as qemu keeps it
    assert qemu_error(path) is None


def test_corrupt_bit_read_only_works_read_write_refused(images: dict[str, Path],
                                                        tmp_path: Path) -> None:
    path = patched(images["plain"], tmp_path / "corrupt.qcow2", put(INCOMPAT, 1 << 1))
    with corefmt.open(str(path), "qcow2", read_only=True) as disk:
        assert disk.read(0, 64 * KiB) == b"\xaa" * (64 * KiB)
    error = open_error(path, read_only=False)
    assert error is not None
    theirs = qemu(QEMU_IO, "-c", "write 0 512", path, check=False)
    assert theirs.returncode
    qemu_message = theirs.stderr.strip().split(f"{path}: ", 1)[1]
    assert qemu_message == "qcow2: Image is corrupt; cannot be opened read/write"
    assert qemu_message in str(error)
    result = run_cli("io", "-c", "write 0 512", str(path))
    assert result.returncode == 1 and "Image is corrupt; cannot be opened read/write" in (
        result.stderr)


@pytest.mark.parametrize("kind", ["aes", "luks"])
def test_encrypted_image_refused(tmp_path: Path, kind: str) -> None:
    """Images qemu-img made with a secret: refused in one line, never read."""
    path = tmp_path / f"{kind}.qcow2"
    made = qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                "-o", f"encrypt.format={kind},encrypt.key-secret=s0"
                + (",encrypt.iter-time=10" if kind == "luks" else ""), path, "1M", check=False)
    if made.returncode:
        pytest.skip(f"qemu-img could not make a {kind} image here: {made.stderr.strip()}")
    if kind == "aes":  # data on disk (LUKS: each qemu open costs a key derivation)
        qemu(QEMU_IO, "--object", "secret,id=s0,data=pw", "--image-opts", "-c",
             "write -P 0x5a 0 64k",
             f"driver=qcow2,file.filename={path},encrypt.key-secret=s0", check=False)
    name = "AES" if kind == "aes" else "LUKS"
    for read_only in (True, False):
        error = open_error(path, read_only=read_only)
        assert error is not None and name in str(error) and "encrypt" in str(error).lower()
    result = run_cli("convert", "-f", "qcow2", "-O", "raw", str(path), str(tmp_path / "o.raw"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("corefmt: ") and name in result.stderr
    assert not (tmp_path / "o.raw").exists() or not any((tmp_path / "o.raw").read_bytes())


def test_refcount_table_of_many_blocks_opens_in_bounded_time(images: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A 512 KiB refcount table whose 65536 entries all name one empty
    block: opening must not scan 65536 blocks entry by entry (2^31 steps)."""
    source = images["plain"].read_bytes()
    size = len(source)
    empty_block = size  # a zero cluster appended
    table = size + CLUSTER
    data = bytearray(source) + bytes(CLUSTER) + struct.pack(">Q", empty_block) * CLUSTER
    put(RT_OFFSET, table)(data)
    put(RT_CLUSTERS, 8, "I")(data)
    path = tmp_path / "reftable.qcow2"
    path.write_bytes(data)
    code = ("import corefmt, sys\n"
            "from corefmt.errors import CorefmtError\n"
            "try:\n"
            f"    with corefmt.open({str(path)!r}, 'qcow2', read_only=True) as d:\n"
            "        d.read(0, 4096)\n"
            "except CorefmtError as e: print('refused', e)\n")
    try:
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=HANG_BOUND, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening took more than {HANG_BOUND} s")


# -- 2. edited tables ----------------------------------------------------------------------
def _l1(data: bytearray) -> int:
    return u(data, L1_OFFSET)


def _l2(data: bytearray, index: int = 0) -> int:
    return u(data, _l1(data) + 8 * index) & OFFSET_MASK


def _entry_edit(index: int, change: Callable[[bytearray, int], int], width: int = 8,
                second_word: bool = False) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        at = _l2(data) + width * index + (8 if second_word else 0)
        struct.pack_into(">Q", data, at, change(data, u(data, at)))
    return edit


def _garble_compressed(data: bytearray) -> None:
    offset = u(data, _l2(data)) & ((1 << 54) - 1)
    data[offset:offset + 256] = bytes(range(256))


#: (id, seed image, edit, damaged guest offset, healthy guest offsets and their byte,
#:  whether qemu-io's read of the damaged range fails too)
TABLE_CASES = [
    ("l1-unaligned", "tables",
     lambda d: struct.pack_into(">Q", d, _l1(d), u(d, _l1(d)) | 0x200),
     1 * MiB, {514 * MiB: 0xDD}),
    ("l1-past-eof", "tables",
     lambda d: struct.pack_into(">Q", d, _l1(d), OFLAG_COPIED | 1 << 40),
     1 * MiB, {514 * MiB: 0xDD}),
    ("l2-unaligned", "tables", _entry_edit(16, lambda d, e: e + 0x200),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("l2-past-eof", "tables", _entry_edit(16, lambda d, e: OFLAG_COPIED | 1 << 40),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("l2-reserved-bits", "tables", _entry_edit(16, lambda d, e: e | 0x2),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("l2-into-refcount-table", "tables",
     _entry_edit(16, lambda d, e: OFLAG_COPIED | u(d, RT_OFFSET)),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("l2-into-l1-table", "tables", _entry_edit(16, lambda d, e: OFLAG_COPIED | _l1(d)),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("compressed-past-eof", "tables",
     _entry_edit(0, lambda d, e: (e & ~((1 << 54) - 1)) | 1 << 50),
     0, {1 * MiB: 0xBB, 2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("compressed-garbage", "tables", _garble_compressed,
     0, {1 * MiB: 0xBB, 2 * MiB: 0xCC, 514 * MiB: 0xDD}),
    ("extl2-alloc-and-zero", "xl2", _entry_edit(16, lambda d, e: e | 1 << 32, 16, True),
     1 * MiB, {2 * MiB: 0xCC, 514 * MiB: 0xDD}),
]
TABLE_IDS = [case[0] for case in TABLE_CASES]
#: Cases where qemu 7.2 reads the damaged range without an error (it reads what the
#: entry points at): corefmt may do so too, but then must return qemu's bytes.
QEMU_READS = {"l1-past-eof", "l2-past-eof", "l2-reserved-bits", "l2-into-refcount-table",
              "l2-into-l1-table"}
#: The acceptance text asks for an error even where qemu reads (reserved L2
#: bits stay as qemu has them: ignored by reads, reported by check).
MUST_REFUSE = {"l2-past-eof"}

BUGS = {
}


def known_bug(item_name: str) -> str | None:
    """Strict xfails for the driver bugs above (see tests/qcow2/conftest.py)."""
    test, _, rest = item_name.partition("[")
    return BUGS.get((test, rest.rstrip("]")))


@pytest.fixture(params=TABLE_CASES, ids=TABLE_IDS)
def damaged(request: pytest.FixtureRequest, images: dict[str, Path],
            tmp_path: Path) -> tuple[str, Path, int, dict[int, int]]:
    name, seed, edit, bad, healthy = request.param
    return name, patched(images[seed], tmp_path / f"{name}.qcow2", edit), bad, healthy


def _read(path: Path, offset: int, length: int = 4096) -> bytes | CorefmtError:
    try:
        with corefmt.open(str(path), "qcow2", read_only=True) as disk:
            return disk.read(offset, length)
    except CorefmtError as error:
        return error


def _qemu_read(path: Path, offset: int, length: int = 4096) -> bytes | None:
    """What qemu-io reads (None: its read fails)."""
    out = qemu(QEMU_IO, "-r", "-f", "qcow2", "-c", f"read -v {offset} {length}", path,
               check=False).stdout
    if f"read {length}/{length}" not in out:
        return None
    data = bytearray()
    for line in out.splitlines():
        if ":  " in line:
            data += bytes.fromhex(line.split(":  ", 1)[1][:47])
    return bytes(data)


def test_damaged_range_read_refused(damaged: tuple[str, Path, int, dict[int, int]]) -> None:
    name, path, bad, _ = damaged
    ours = _read(path, bad)
    if name in QEMU_READS and name not in MUST_REFUSE:
        if isinstance(ours, bytes):
            assert ours == _qemu_read(path, bad)
        return
    assert isinstance(ours, CorefmtError), f"read {ours[:16]!r}... from the damaged range"
    message = str(ours)
    assert message.strip() and "\n" not in message
    result = run_cli("convert", "-f", "qcow2", "-O", "raw", str(path),
                     str(path.with_suffix(".raw")))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("corefmt: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_healthy_ranges_still_read(damaged: tuple[str, Path, int, dict[int, int]]) -> None:
    _, path, _, healthy = damaged
    for offset, byte in healthy.items():
        seen = _read(path, offset)
        assert seen == bytes([byte]) * 4096, f"at {offset:#x}: {seen}"


def test_write_to_damage_marks_corrupt(damaged: tuple[str, Path, int, dict[int, int]],
                                       tmp_path: Path) -> None:
    """Where qemu-io's write marks the image corrupt, corefmt's does too (and
    corefmt refuses the write); the image then opens read-only only."""
    _, path, bad, _ = damaged
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(path, theirs)
    qemu(QEMU_IO, "-f", "qcow2", "-c", f"write -P 0x77 {bad} 512", theirs, check=False)
    refused = False
    try:
        with corefmt.open(str(path), "qcow2") as disk:
            disk.write(bad, b"\x77" * 512)
    except CorefmtError as error:
        refused = True
        assert str(error).strip() and "\n" not in str(error)
    if qemu_corrupt(theirs):
        assert refused, "corefmt wrote where qemu refused"
        assert qemu_corrupt(path), "qemu marked its copy corrupt, corefmt did not"
    if qemu_corrupt(path):
        error = open_error(path, read_only=False)
        assert error is not None and "Image is corrupt" in str(error)


def test_only_corefmt_errors_escape(damaged: tuple[str, Path, int, dict[int, int]]) -> None:
    """Read everything, map, check, write: CorefmtError or success, nothing else."""
    _, path, bad, _ = damaged
    steps: list[tuple[str, Callable[[], object]]] = []

    def attempt(label: str, action: Callable[[], object]) -> None:
        try:
            action()
        except CorefmtError as error:
            assert str(error).strip(), f"{label}: empty message"
        steps.append((label, action))

    def read_all(disk: corefmt.BlockNode) -> None:
        for start in (0, 4 * MiB, 512 * MiB, disk.virtual_size - 4 * MiB):
            attempt(f"read {start:#x}", lambda s=start: disk.read(s, 4 * MiB))

    try:
        with corefmt.open(str(path), "qcow2", read_only=True) as disk:
            read_all(disk)
            attempt("block_status", lambda: disk.block_status(0, disk.virtual_size))
            if disk.image is not None:
                attempt("check", lambda: disk.image.check())
    except CorefmtError:
        pass
    try:
        with corefmt.open(str(path), "qcow2") as disk:
            attempt("write", lambda: disk.write(bad, b"\x33" * 4096))
            attempt("write healthy", lambda: disk.write(3 * MiB, b"\x33" * 4096))
            attempt("flush", disk.flush)
    except CorefmtError:
        pass

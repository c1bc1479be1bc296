"""qcow2 interop matrix against qemu-img / qemu-io 7.2.

Rows: a pairwise covering array (matrix.covering_array) of compat,
cluster_size, refcount_bits, extended_l2, data file (none / external /
external + data_file_raw), lazy_refcounts and backing (none / raw / qcow2).

* corefmt writes (Python API), qemu checks: ``qemu-img check`` is clean,
  ``qemu-img compare`` finds the raw reference the workload was mirrored
  into, and ``qemu-img map`` prints what ``corefmt map`` prints.
* qemu writes (qemu-io), corefmt reads: ``corefmt convert -O raw`` gives
  the bytes ``qemu-img convert -O raw`` gives, and ``corefmt map`` /
  ``corefmt check`` print what qemu-img prints.
* What qemu-img refuses to create, corefmt refuses with the same message.
* Preallocated images (metadata, falloc, full) made by either tool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import corefmt
from tests.conftest import run_cli
from tests.qcow2.matrix import (
    FACTORS,
    QEMU_IMG,
    QEMU_IO,
    REFUSED,
    Combo,
    apply_reference,
    covering_array,
    make_backing,
    ok,
    qemu,
    uncoverable_pairs,
    workload,
    write_data,
)

pytestmark = pytest.mark.interop

ROWS = covering_array()
SEED = 20240611

# -- known driver bugs (strict xfails, applied by conftest.py) -----------------------------
#: Not a data bug: qemu lays falloc/full preallocation out differently for
#: images with more than one L2 table; both read the same and check clean.
BUG_PREALLOC_LAYOUT = (
    "qcow2 difference: preallocation=falloc/full interleaves L2 tables with data; qemu-img "
    "7.2 places them differently")


def known_bug(name: str) -> str | None:
    """The driver bug ``name`` (a test item's name) fails with, if any."""
    test, _, param = name.partition("[")
    param = param.rstrip("]")
    if (test == "test_preallocated_layout_equals_qemus"
            and param.endswith(("-falloc", "-full"))
            and not param.startswith(("v3-c64k", "v3-c2M"))):
        return BUG_PREALLOC_LAYOUT
    return None


@dataclass
class Row:
    combo: Combo
    directory: Path
    image: Path
    reference: Path
    backing: Path | None


def create_args(combo: Combo, directory: Path, backing: Path | None,
                preallocation: str | None = None) -> list[str]:
    args = ["-f", "qcow2", "-o", combo.options(directory, preallocation)]
    if backing is not None:
        args += ["-b", str(backing), "-F", "raw" if backing.suffix == ".raw" else "qcow2"]
    return args


def row_seed(combo: Combo) -> int:
    return SEED + ROWS.index(combo)


@pytest.fixture(scope="module", params=ROWS, ids=[combo.id for combo in ROWS])
def corefmt_written(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Row:
    """A row's image made and written by corefmt's Python API, and the raw
    reference every request was mirrored into."""
    combo: Combo = request.param
    directory = tmp_path_factory.mktemp("corefmt-" + combo.id)
    seed = row_seed(combo)
    backing, content = make_backing(directory, combo.backing, combo.size, seed)
    image = directory / "image.qcow2"
    corefmt.create(str(image), "qcow2", combo.size, options=combo.options(directory),
                   backing=str(backing) if backing else None,
                   backing_format=None if backing is None else backing.suffix[1:])
    ops = workload(combo, seed)
    data = write_data(ops, seed)
    with corefmt.open(str(image)) as disk:
        for index, op in enumerate(ops):
            if op.kind == "write":
                disk.write(op.offset, data[index])
            elif op.kind == "zero":
                disk.write_zeroes(op.offset, op.length)
            elif op.kind == "zero_unmap":
                disk.write_zeroes(op.offset, op.length, unmap=True)
            else:
                disk.discard(op.offset, op.length)
    reference = bytearray(content)
    apply_reference(reference, combo, ops, data)
    (directory / "reference.raw").write_bytes(reference)
    return Row(combo, directory, image, directory / "reference.raw", backing)


@pytest.fixture(scope="module", params=ROWS, ids=[combo.id for combo in ROWS])
def qemu_written(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Row:
    """A row's image made by qemu-img and written by qemu-io (-d unmap, so
    write -z -u and discard give space back), with the reference of what
    the qemu-io script wrote."""
    combo: Combo = request.param
    directory = tmp_path_factory.mktemp("qemu-" + combo.id)
    seed = row_seed(combo)
    backing, content = make_backing(directory, combo.backing, combo.size, seed)
    image = directory / "image.qcow2"
    ok(qemu(QEMU_IMG, "create", "-q", *create_args(combo, directory, backing), image,
            combo.size, cwd=directory))
    ops = workload(combo, seed)
    script: list[str] = []
    for op in ops:
        script += ["-c", op.qemu_io()]
    written = ok(qemu(QEMU_IO, "-d", "unmap", *script, image, cwd=directory))
    assert "failed" not in written.stdout + written.stderr, written.stdout + written.stderr
    reference = bytearray(content)
    apply_reference(reference, combo, ops, {
        index: bytes([op.pattern]) * op.length for index, op in enumerate(ops)
        if op.kind == "write"})
    (directory / "reference.raw").write_bytes(reference)
    return Row(combo, directory, image, directory / "reference.raw", backing)


def qemu_map(row: Row) -> str:
    return ok(qemu(QEMU_IMG, "map", "--output=json", row.image, cwd=row.directory)).stdout


def map_without_zero(row: Row) -> list[dict]:
    return [{key: value for key, value in extent.items() if key != "zero"}
            for extent in json.loads(qemu_map(row))]


def corefmt_map(row: Row) -> str:
    return run_cli("map", "--output=json", str(row.image), check=True).stdout


# -- the matrix itself ----------------------------------------------------------------------
def test_covering_array_holds_every_accepted_pair():
    """Every pair of values appears in some row, but for the pairs qemu
    refuses (which the refusal tests cover), and the array stays small."""
    names = list(FACTORS)
    held = {((a, getattr(row, a)), (b, getattr(row, b)))
            for row in ROWS for i, a in enumerate(names) for b in names[i + 1:]}
    every = {((a, x), (b, y)) for i, a in enumerate(names) for b in names[i + 1:]
             for x in FACTORS[a] for y in FACTORS[b]}
    assert every - held == uncoverable_pairs()
    refused_pairs = {frozenset(pair) for pair in uncoverable_pairs()}
    assert len(refused_pairs) == 10
    assert len(ROWS) <= 20


# -- direction 1: corefmt writes, qemu reads --------------------------------------------
def test_corefmt_written_passes_qemu_check(corefmt_written: Row):
    result = qemu(QEMU_IMG, "check", "--output=json", corefmt_written.image,
                  cwd=corefmt_written.directory)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["check-errors"] == 0
    for key in ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed"):
        assert key not in report, report


def test_corefmt_written_equals_reference(corefmt_written: Row):
    result = qemu(QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", corefmt_written.image,
                  corefmt_written.reference, cwd=corefmt_written.directory)
    assert (result.returncode, result.stdout) == (0, "Images are identical.\n"), \
        result.stdout + result.stderr


def test_corefmt_written_map_equals_qemu_map(corefmt_written: Row):
    assert corefmt_map(corefmt_written) == qemu_map(corefmt_written)


def test_corefmt_written_raw_data_file_is_the_disk(corefmt_written: Row):
    """data_file_raw=on: the data file itself reads as the guest's disk."""
    if corefmt_written.combo.data_file != "raw":
        pytest.skip("no raw data file")
    data = (corefmt_written.directory / "image.data").read_bytes()
    assert data == corefmt_written.reference.read_bytes()


# -- direction 2: qemu writes, corefmt reads --------------------------------------------
def test_qemu_written_reads_identically(qemu_written: Row):
    directory = qemu_written.directory
    ok(qemu(QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", qemu_written.image,
            directory / "by-qemu.raw", cwd=directory))
    run_cli("convert", "-f", "qcow2", "-O", "raw", str(qemu_written.image),
            str(directory / "by-corefmt.raw"), check=True)
    by_qemu = (directory / "by-qemu.raw").read_bytes()
    assert by_qemu == qemu_written.reference.read_bytes(), "the workload's model is wrong"
    by_corefmt = (directory / "by-corefmt.raw").read_bytes()
    assert len(by_corefmt) == len(by_qemu)
    if by_corefmt != by_qemu:
        first = next(i for i, (a, b) in enumerate(zip(by_corefmt, by_qemu, strict=True)) if a != b)
        pytest.fail(f"corefmt reads differently from offset {first}")


def test_qemu_written_map_equals_qemu_map(qemu_written: Row):
    assert corefmt_map(qemu_written) == qemu_map(qemu_written)


def test_qemu_written_check_equals_qemu_check(qemu_written: Row):
    theirs = qemu(QEMU_IMG, "check", "--output=json", qemu_written.image,
                  cwd=qemu_written.directory)
    ours = run_cli("check", "--output=json", str(qemu_written.image))
    assert (ours.returncode, json.loads(ours.stdout)) == (theirs.returncode,
                                                           json.loads(theirs.stdout))


def test_qemu_written_check_agrees_on_errors_and_counts(qemu_written: Row):
    """As above, but for the keys where corefmt's output is not known to
    differ: exit code, errors, leaks, end offset, total and allocated."""
    theirs = qemu(QEMU_IMG, "check", "--output=json", qemu_written.image,
                  cwd=qemu_written.directory)
    ours = run_cli("check", "--output=json", str(qemu_written.image))
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    q, c = json.loads(theirs.stdout), json.loads(ours.stdout)
    for key in ("image-end-offset", "total-clusters", "check-errors", "allocated-clusters",
                "corruptions", "leaks", "filename", "format"):
        assert c.get(key) == q.get(key), (key, c, q)


# -- refused combinations -----------------------------------------------------------------
@pytest.mark.parametrize(("options", "backing", "message"),
                         [pytest.param(o, b, m, id=name) for name, o, b, m in REFUSED])
def test_refused_combination(tmp_path: Path, options: str, backing: str | bool,
                             message: str):
    options = options.format(dir=tmp_path)
    extra: list[str] = []
    if backing:
        base, _ = make_backing(tmp_path, backing, 1024 * 1024, 1)
        extra = ["-b", str(base), "-F", backing]
    theirs = qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", options, *extra,
                  tmp_path / "by-qemu.qcow2", "1M", cwd=tmp_path)
    assert theirs.returncode != 0
    assert theirs.stderr == f"qemu-img: {tmp_path / 'by-qemu.qcow2'}: {message}\n"
    before = sorted(p.name for p in tmp_path.iterdir())
    ours = run_cli("create", "-f", "qcow2", "-o", options, *extra,
                   str(tmp_path / "by-corefmt.qcow2"), "1M")
    assert ours.returncode != 0
    assert ours.stdout == ""
    assert ours.stderr == f"corefmt: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused create made files"


def test_refused_combination_through_the_api(tmp_path: Path):
    """The Python API refuses as the command line does (an OptionError)."""
    for _name, options, backing, message in REFUSED:
        if backing or _name.startswith("v2-refcount_bits"):
            continue
        with pytest.raises(corefmt.OptionError, match=message.split(" (")[0]):
            corefmt.create(str(tmp_path / "x.qcow2"), "qcow2", "1M",
                           options=options.format(dir=tmp_path))
        assert not (tmp_path / "x.qcow2").exists()


# -- preallocation ------------------------------------------------------------------------
PREALLOC_COMBOS = {
    "v3-c64k": Combo("1.1", 65536, 16, False, "none", False, "none"),
    "v2-c4k": Combo("0.10", 4096, 16, False, "none", False, "none"),
    "v3-c512-rb1": Combo("1.1", 512, 1, False, "none", False, "none"),
    "v3-c2M-extl2": Combo("1.1", 2 * 1024 * 1024, 16, True, "none", False, "none"),
    "v3-c64k-df_external": Combo("1.1", 65536, 16, False, "external", False, "none"),
    "v3-c64k-df_raw": Combo("1.1", 65536, 64, False, "raw", False, "none"),
    "v3-c64k-extl2-bk_raw": Combo("1.1", 65536, 16, True, "none", False, "raw"),
}


def preallocated(directory: Path, combo: Combo, mode: str, maker: str) -> Row:
    directory.mkdir()
    backing, content = make_backing(directory, combo.backing, combo.size, 7)
    image = directory / "image.qcow2"
    args = create_args(combo, directory, backing, mode)
    if maker == "qemu":
        ok(qemu(QEMU_IMG, "create", "-q", *args, image, combo.size, cwd=directory))
    else:
        run_cli("create", *args, str(image), str(combo.size), check=True)
    row = Row(combo, directory, image, directory / "reference.raw", backing)
    row.reference.write_bytes(content)
    return row


MODES = ["metadata", "falloc", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("maker", ["qemu", "corefmt"])
@pytest.mark.parametrize("combo", list(PREALLOC_COMBOS.values()), ids=list(PREALLOC_COMBOS))
def test_preallocated_reads_back(tmp_path: Path, combo: Combo, maker: str, mode: str):
    """Both tools read a preallocated image (made by either) as its backing
    file (or zeros), and corefmt maps it as qemu-img does."""
    row = preallocated(tmp_path / maker, combo, mode, maker)
    ok(qemu(QEMU_IMG, "convert", "-O", "raw", row.image, row.directory / "q.raw",
            cwd=row.directory))
    run_cli("convert", "-O", "raw", str(row.image), str(row.directory / "c.raw"), check=True)
    reference = row.reference.read_bytes()
    assert (row.directory / "q.raw").read_bytes() == reference
    assert (row.directory / "c.raw").read_bytes() == reference
    assert corefmt_map(row) == qemu_map(row)
    if maker == "corefmt":
        check = qemu(QEMU_IMG, "check", row.image, cwd=row.directory)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No errors were found on the image." in check.stdout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combo", list(PREALLOC_COMBOS.values()), ids=list(PREALLOC_COMBOS))
def test_preallocated_layout_equals_qemus(tmp_path: Path, combo: Combo, mode: str):
    """corefmt lays a preallocated image out as qemu-img 7.2 does: the same
    map, host offsets included, and the same file size."""
    ours = preallocated(tmp_path / "corefmt", combo, mode, "corefmt")
    theirs = preallocated(tmp_path / "qemu", combo, mode, "qemu")
    if combo.data_file == "none":
        assert qemu_map(ours) == qemu_map(theirs)
    else:  # qemu's file driver writes the first block of a new (data) file, corefmt not
        assert map_without_zero(ours) == map_without_zero(theirs)
    assert ours.image.stat().st_size == theirs.image.stat().st_size

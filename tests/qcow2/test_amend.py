"""`corefmt amend` on qcow2 against qemu-img amend: images qemu-img and
qemu-io make (data, `write -z` over holes and over data, `write -z -u`,
with and without a backing file) are amended by both on identical copies;
corefmt's must then pass `qemu-img check`, read the same as qemu-img's
(`qemu-img compare`) and as the original, and carry the same
format-specific `qemu-img info`; header cluster bytes are compared where
the layouts agree. Images corefmt made are amended too."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corefmt.cli.main import main

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

pytestmark = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                reason="qemu-img/qemu-io not installed (qemu-utils)")

MiB = 1024 * 1024
ENV = {**os.environ, "LC_ALL": "C"}
#: Data, a zero cluster over a hole, one over discarded data, a preallocated
#: zero cluster (write -z over data), zero clusters past the data, a partial cluster.
WRITES = ("write -P 2 0 64k", "write -z 64k 64k", "write -P 3 128k 64k", "write -z -u 128k 64k",
          "write -P 4 256k 128k", "write -z 256k 64k", "write -z 1M 128k", "write -P 5 3M 100k")
V2_WRITES = ("write -P 2 0 64k", "write -P 4 256k 128k", "write -P 5 3M 100k")


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*map(str, args)], capture_output=True, text=True, env=ENV)
    if check and result.returncode:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


def corefmt(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([*map(str, args)])
    return status, out.getvalue(), err.getvalue()


def format_specific(path: Path) -> tuple[dict, int]:
    info = json.loads(run(QEMU_IMG, "info", "--output=json", path).stdout)
    return info["format-specific"], info["virtual-size"]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", path, "4M")
    run(QEMU_IO, "-c", "write -P 1 0 4M", path)
    return path


def make(path: Path, create: tuple[str, ...], backing: Path | None,
         writes: tuple[str, ...] = WRITES) -> Path:
    extra = ("-b", backing.name, "-F", "qcow2") if backing else ()
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", *create, *extra, path, "4M")
    commands = [arg for command in writes for arg in ("-c", command)]
    run(QEMU_IO, *commands, path)
    return path


def both(tmp_path: Path, options: str, create: tuple[str, ...] = (), backed: bool = False,
         base: Path | None = None, writes: tuple[str, ...] = WRITES) -> tuple[Path, Path, Path]:
    original = make(tmp_path / "original.qcow2", create, base if backed else None, writes)
    by_qemu, by_corefmt = tmp_path / "q.qcow2", tmp_path / "c.qcow2"
    shutil.copy(original, by_qemu)
    shutil.copy(original, by_corefmt)
    run(QEMU_IMG, "amend", "-o", options, by_qemu)
    status, out, err = corefmt("amend", "-o", options, by_corefmt)
    assert (status, out, err) == (0, "", "")
    return original, by_qemu, by_corefmt


def assert_same(original: Path, by_qemu: Path, by_corefmt: Path, header: bool = True) -> None:
    checked = run(QEMU_IMG, "check", by_corefmt, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No errors were found" in checked.stdout
    assert run(QEMU_IMG, "compare", by_qemu, by_corefmt, check=False).returncode == 0
    assert run(QEMU_IMG, "compare", original, by_corefmt, check=False).returncode == 0
    assert format_specific(by_corefmt) == format_specific(by_qemu)
    if header:  # same layout: the whole header cluster is qemu's
        assert by_corefmt.read_bytes()[:65536] == by_qemu.read_bytes()[:65536]


CHANGES = [
    # (create options, amend options, header cluster identical); each runs
    # with and without a backing file where zero clusters are expanded.
    ((), "compat=0.10", True),
    ((), "compat=0.10,size=1M", True),
    ((), "compat=1.1", True),
    ((), "lazy_refcounts=on", True),
    (("-o", "lazy_refcounts=on"), "lazy_refcounts=off", True),
    (("-o", "lazy_refcounts=on"), "compat=0.10", True),
    ((), "refcount_bits=1", False),
    ((), "refcount_bits=8,lazy_refcounts=on", False),
    ((), "refcount_bits=2,compat=0.10,refcount_bits=16", True),
    ((), "refcount_bits=64", False),
    (("-o", "refcount_bits=8"), "compat=0.10,refcount_bits=16", False),
    (("-o", "cluster_size=4k"), "refcount_bits=2", False),
    (("-o", "cluster_size=4k"), "compat=0.10", True),
    (("-o", "compression_type=zstd"), "compat=0.10", True),
    ((), "size=2M", True),
    ((), "size=16M", True),
    ((), "data_file_raw=off", True),
]


CASES = [(create, options, header, backed) for create, options, header in CHANGES
         for backed in ((False, True) if "compat=0.10" in options else (False,))]


@pytest.mark.interop
@pytest.mark.parametrize(("create", "options", "header", "backed"), CASES,
                         ids=[f"{' '.join(c)}:{o}{':backed' if b else ''}"
                              for c, o, _, b in CASES])
def test_amend_like_qemu(tmp_path: Path, base: Path, create: tuple[str, ...], options: str,
                         header: bool, backed: bool) -> None:
    original, by_qemu, by_corefmt = both(tmp_path, options, create, backed, base)
    if "size=1M" in options or "size=2M" in options:  # shrunk: compare the kept part
        original = tmp_path / "shrunk.qcow2"
        shutil.copy(by_qemu, original)
    assert_same(original, by_qemu, by_corefmt, header)


V2_CHANGES = ["compat=1.1", "compat=1.1,lazy_refcounts=on", "compat=1.1,refcount_bits=4",
              "size=8M", "refcount_bits=16"]


@pytest.mark.interop
@pytest.mark.parametrize("options", V2_CHANGES)
def test_amend_v2_like_qemu(tmp_path: Path, base: Path, options: str) -> None:
    backed = options == "compat=1.1"
    original, by_qemu, by_corefmt = both(tmp_path, options, ("-o", "compat=0.10"), backed,
                                         base, V2_WRITES)
    assert_same(original, by_qemu, by_corefmt, header="refcount_bits=4" not in options)


def clusters(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """(cluster, depth, data, zero-and-not-data) per 64 KiB guest cluster: what
    the qcow2 structure says, not how sparse the host file is."""
    found = []
    for entry in entries:
        for start in range(entry["start"], entry["start"] + entry["length"], 65536):
            found.append((start // 65536, entry["depth"], entry["data"],
                          entry["zero"] and not entry["data"]))
    return found


@pytest.mark.interop
def test_downgrade_expands_zero_clusters_as_qemu(tmp_path: Path, base: Path) -> None:
    """A plain zero cluster is deallocated without a backing file and
    allocated (zeroed) with one; a preallocated one stays allocated, now as
    data: the maps are qemu's."""
    for backed in (False, True):
        _, by_qemu, by_corefmt = both(tmp_path, "compat=0.10", (), backed, base)
        maps = [clusters(json.loads(run(QEMU_IMG, "map", "--output=json", path).stdout))
                for path in (by_qemu, by_corefmt)]
        assert maps[0] == maps[1]
        assert by_corefmt.read_bytes()[:8] == b"QFI\xfb\0\0\0\x02"


@pytest.mark.interop
def test_downgrade_leaves_image_clean_and_v2(tmp_path: Path) -> None:
    _, _, by_corefmt = both(tmp_path, "compat=0.10", ("-o", "lazy_refcounts=on"))
    raw = by_corefmt.read_bytes()
    assert raw[4:8] == b"\0\0\0\x02"
    assert b"dirty bit" not in raw[:65536]  # no feature table in a v2 header


@pytest.mark.interop
def test_refcount_change_frees_the_old_structures(tmp_path: Path) -> None:
    """The old refcount table and blocks are freed: no leak, nothing more
    allocated than qemu's image has."""
    _, by_qemu, by_corefmt = both(tmp_path, "refcount_bits=4", ("-o", "cluster_size=4k"))
    reports = [json.loads(run(QEMU_IMG, "check", "--output=json", path).stdout)
               for path in (by_qemu, by_corefmt)]
    assert reports[1].get("leaks", 0) == 0
    assert reports[1]["allocated-clusters"] == reports[0]["allocated-clusters"]


@pytest.mark.interop
@pytest.mark.parametrize("options", ["compat=0.10", "refcount_bits=1", "lazy_refcounts=on",
                                     "size=8M"])
def test_amend_images_corefmt_made(tmp_path: Path, options: str) -> None:
    by_qemu, by_corefmt = tmp_path / "q.qcow2", tmp_path / "c.qcow2"
    assert corefmt("create", "-q", "-f", "qcow2", by_corefmt, "4M")[0] == 0
    status, _, err = corefmt("io", "-c", "write -P 7 0 96k", "-c", "write -z 64k 64k",
                             "-c", "write -z 1M 64k", "-c", "write -P 8 2M 64k",
                             "-c", "write -z 2M 64k", by_corefmt)
    assert status == 0, err
    shutil.copy(by_corefmt, by_qemu)
    original = tmp_path / "original.qcow2"
    shutil.copy(by_corefmt, original)
    run(QEMU_IMG, "amend", "-o", options, by_qemu)
    assert corefmt("amend", "-o", options, by_corefmt) == (0, "", "")
    assert_same(original, by_qemu, by_corefmt, header=options != "refcount_bits=1")


@pytest.mark.interop
def test_corefmt_reads_and_writes_the_amended_image(tmp_path: Path) -> None:
    """After a refcount change corefmt allocates through the new structures."""
    _, by_qemu, by_corefmt = both(tmp_path, "refcount_bits=2")
    for path in (by_qemu, by_corefmt):
        run(QEMU_IO, "-c", "write -P 9 2M 192k", path)
    assert corefmt("io", "-c", "write -P 10 3584k 128k", by_corefmt)[0] == 0
    run(QEMU_IO, "-c", "write -P 10 3584k 128k", by_qemu)
    assert_same(by_qemu, by_qemu, by_corefmt, header=False)

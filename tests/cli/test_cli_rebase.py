"""`corefmt rebase` next to `qemu-img rebase` on the same chains (made by
qemu-img): exit status, stdout, messages, and the resulting image (guest
content, map, check, backing reference); mixed-format chains qemu cannot
open checked by content; an interrupted rebase (SIGKILL, power cut) keeps
the guest view and a rerun finishes it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from chain_helpers import (
    MIB,
    QEMU_IMG,
    QEMU_IO,
    backing_of,
    check_clean,
    content_via_corefmt,
    copy_tree,
    corefmt,
    kill_at_random,
    layout,
    messages,
    qemu_img,
    qemu_io,
    run_time,
    same_content,
    three_layer_chain,
)

pytestmark = [pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                 reason="qemu-img/qemu-io not installed (qemu-utils)"),
              pytest.mark.interop]

SIZE = 4 * MIB


def _chain(directory: Path) -> Path:
    """base.raw <- mid.qcow2 <- top.qcow2, plus other.qcow2 (a second base
    with other data) and small.raw (shorter than the disk); ref.raw is what
    top shows."""
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 2M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "mid.qcow2")
    qemu_io(directory / "mid.qcow2", "write -P 2 1M 1M", "write -z 3M 256k",
            "write -P 4 3584k 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             directory / "top.qcow2")
    qemu_io(directory / "top.qcow2", "write -P 3 1536k 1M")
    qemu_img("create", "-q", "-f", "qcow2", directory / "other.qcow2", str(SIZE))
    qemu_io(directory / "other.qcow2", "write -P 1 0 1M", "write -P 9 3M 64k")
    qemu_img("create", "-q", "-f", "raw", directory / "small.raw", "1M")
    qemu_io(directory / "small.raw", "write -P 1 0 1M", fmt="raw")
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _chain(tmp_path_factory.mktemp("rebase") / "chain")


def _both(pristine: Path, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """qemu-img and corefmt on copies of the chain: same status, stdout, messages."""
    theirs = copy_tree(pristine, tmp_path / "qemu")
    ours = copy_tree(pristine, tmp_path / "corefmt")
    expected = qemu_img("rebase", *args, cwd=theirs)
    status, out, err = corefmt("rebase", *args, cwd=ours)
    assert (status, out) == (expected.returncode, expected.stdout)
    assert messages(err) == [line for line in messages(expected.stderr)
                             if not line.startswith(("WARNING", "  "))]
    return theirs, ours


SAFE_CASES = {
    "onto its base (in the chain)": ("-b", "base.raw", "-F", "raw", "top.qcow2"),
    "onto an unrelated image": ("-b", "other.qcow2", "-F", "qcow2", "top.qcow2"),
    "onto a shorter image": ("-b", "small.raw", "-F", "raw", "top.qcow2"),
    "flatten": ("-b", "", "top.qcow2"),
    "the mid layer onto nothing": ("-b", "", "mid.qcow2"),
    "unsafe": ("-u", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"),
    "unsafe without -b drops the reference": ("-u", "top.qcow2"),
}


@pytest.mark.parametrize("args", SAFE_CASES.values(), ids=SAFE_CASES.keys())
def test_rebase_as_qemu_img(pristine, tmp_path, args):
    theirs, ours = _both(pristine, tmp_path, *args)
    name = args[-1]
    assert backing_of(ours / name) == backing_of(theirs / name)
    assert layout(ours / name) == layout(theirs / name)
    check_clean(ours / name)
    if "-u" not in args:
        if name == "top.qcow2":
            assert same_content(ours / name, pristine / "ref.raw")
        assert qemu_img("compare", theirs / name, ours / name).returncode == 0


REFUSALS = {
    "no -b in safe mode": ("top.qcow2",),
    "two images": ("-b", "base.raw", "a", "b"),
    "a raw image has no backing reference": ("-b", "base.raw", "-F", "raw", "-f", "raw",
                                             "base.raw"),
    "unsafe without -F": ("-u", "-b", "base.raw", "top.qcow2"),
    "safe without -F": ("-b", "base.raw", "top.qcow2"),
    "a missing new backing": ("-b", "nothere", "-F", "raw", "top.qcow2"),
    "an unknown format": ("-b", "base.raw", "-F", "nope", "top.qcow2"),
}


@pytest.mark.parametrize("args", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_as_qemu_img(pristine, tmp_path, args):
    theirs, ours = _both(pristine, tmp_path, *args)
    assert backing_of(ours / "top.qcow2") == backing_of(theirs / "top.qcow2")
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")


def test_progress_line_is_qemu_img_s(pristine, tmp_path):
    ours = copy_tree(pristine, tmp_path / "c")
    status, out, _err = corefmt("rebase", "-p", "-b", "base.raw", "-F", "raw", "top.qcow2",
                                cwd=ours)
    assert status == 0
    assert out.startswith("    (0.00/100%)\r") and out.endswith("    (100.00/100%)\r\n")


def test_only_differing_data_is_read(pristine, tmp_path, monkeypatch):
    """Cost follows data: ranges both chains leave to the common base, and
    zeros on both sides, are never read."""
    from corefmt.ops import rebase

    ours = copy_tree(pristine, tmp_path / "c")
    reads: list[tuple[int, int]] = []
    real_read = rebase._Copier._read

    def counting_read(self, node, side, start, end, buffer):
        if node is not None and side is not rebase.Side.ZERO:  # a real read of a chain
            reads.append((start, end - start))
        return real_read(self, node, side, start, end, buffer)

    monkeypatch.setattr(rebase._Copier, "_read", counting_read)
    status, _out, err = corefmt("rebase", "-b", "base.raw", "-F", "raw", "top.qcow2", cwd=ours)
    assert status == 0, err
    # Read on both sides: mid's data outside top (1M..1.5M, and the cluster
    # of its 4k write at 3.5M); on base's side only: where mid has zeros
    # (256k; the copy made base.raw fully allocated). Nothing else.
    kib = 1024
    assert sum(length for _offset, length in reads) == 2 * (512 + 64) * kib + 256 * kib
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")


def _sector_chain(directory: Path, top_options: str) -> Path:
    """base.raw <- mid.qcow2 (512-byte clusters: sector-sized differences,
    and data equal to the base's) <- top.qcow2 made with ``top_options``."""
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 2M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.raw",
             "-F", "raw", directory / "mid.qcow2")
    qemu_io(directory / "mid.qcow2",
            "write -P 5 64k 512",          # one sector inside a cluster
            "write -P 6 199k 1536",        # across a 2 KiB subcluster's edge
            "write -P 1 512k 64k",         # the base's own bytes: nothing to copy
            "write -P 1 640k 32k", "write -P 8 660k 512",  # equal around one differing sector
            "write -P 9 3M 4608",          # past the base's data: zeros there
            "write -P 1 1050112 512", "write -P 4 1050624 512")  # one short run: an
                                           # equal sector, a differing one past a 2k edge
    qemu_img("create", "-q", "-f", "qcow2", "-o", top_options, "-b", "mid.qcow2",
             "-F", "qcow2", directory / "top.qcow2")
    qemu_io(directory / "top.qcow2", "write -P 3 192k 4k")
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")
    return directory


TOPS = {"64k clusters": "cluster_size=64k",
        "extended L2 (2k subclusters)": "cluster_size=64k,extended_l2=on",
        "512-byte clusters": "cluster_size=512"}


@pytest.mark.parametrize("options", TOPS.values(), ids=TOPS.keys())
def test_sector_sized_differences_allocate_as_qemu_img(tmp_path, options):
    """Differences smaller than a cluster: corefmt writes whole allocation
    units (a subcluster with extended L2), qemu-img only the differing
    sectors; the image must end up the same, allocation map included."""
    pristine = _sector_chain(tmp_path / "chain", options)
    theirs, ours = _both(pristine, tmp_path, "-b", "base.raw", "-F", "raw", "top.qcow2")
    assert layout(ours / "top.qcow2") == layout(theirs / "top.qcow2")
    check_clean(ours / "top.qcow2")
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")


def _fvd_over_raw(directory: Path) -> Path:
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 3M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", directory / "new.qcow2", str(SIZE))
    qemu_io(directory / "new.qcow2", "write -P 7 512k 1M")
    assert corefmt("create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
                   directory / "top.fvd")[0] == 0
    assert corefmt("io", "-c", "write -P 5 2M 64k", "-c", "write -P 6 100000 5000",
                   directory / "top.fvd")[0] == 0
    content_via_corefmt(directory / "top.fvd", directory / "ref.raw")
    return directory


@pytest.mark.parametrize("args", [("-b", "new.qcow2", "-F", "qcow2"), ("-b", "",)],
                         ids=["onto a qcow2", "flatten"])
def test_fvd_over_raw(tmp_path, args):
    directory = _fvd_over_raw(tmp_path / "fvd")
    status, out, err = corefmt("rebase", *args, "top.fvd", cwd=directory)
    assert (status, out, err) == (0, "", "")
    content_via_corefmt(directory / "top.fvd", directory / "after.raw")
    assert (directory / "after.raw").read_bytes() == (directory / "ref.raw").read_bytes()
    _status, info, _err = corefmt("info", "--output=json", directory / "top.fvd")
    assert ('"backing-filename": "new.qcow2"' in info) == bool(args[1])


def test_qcow2_over_fvd_onto_raw(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 4M", fmt="raw")
    assert corefmt("create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
                   directory / "mid.fvd")[0] == 0
    assert corefmt("io", "-c", "write -P 2 1M 1M", directory / "mid.fvd")[0] == 0
    assert corefmt("create", "-q", "-f", "qcow2", "-b", "mid.fvd", "-F", "fvd",
                   directory / "top.qcow2")[0] == 0
    assert corefmt("io", "-c", "write -P 3 1536k 1M", directory / "top.qcow2")[0] == 0
    content_via_corefmt(directory / "top.qcow2", directory / "ref.raw")
    assert corefmt("rebase", "-b", "base.raw", "-F", "raw", "top.qcow2", cwd=directory)[0] == 0
    assert backing_of(directory / "top.qcow2") == ("base.raw", "raw")
    assert same_content(directory / "top.qcow2", directory / "ref.raw")
    check_clean(directory / "top.qcow2")


def test_interrupted_rebase_keeps_the_guest_view(tmp_path):
    """SIGKILL at random points; after each, the chain reads as before; a
    rerun completes it."""
    directory = tmp_path / "kill"
    directory.mkdir()
    size = 64 * MIB
    rng = random.Random(7)
    three_layer_chain(directory, size, rng, 120, 40)
    args = ["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"]
    longest = run_time(args, directory)
    killed = 0
    for _ in range(4):
        if kill_at_random(args, directory, rng, longest=longest) is not None:
            killed += 1
        assert same_content(directory / "top.qcow2", directory / "ref.raw")
        if backing_of(directory / "top.qcow2")[0] == "base.raw":
            break
    assert corefmt(*args, cwd=directory)[0] == 0
    assert backing_of(directory / "top.qcow2") == ("base.raw", "raw")
    assert same_content(directory / "top.qcow2", directory / "ref.raw")
    check_clean(directory / "top.qcow2")
    assert killed, "no run was interrupted: raise the image size"


def _compressed_clusters(image: Path) -> int:
    result = qemu_img("check", "--output=json", image)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout).get("compressed-clusters", 0)


@pytest.mark.parametrize("compress", [False, True])
def test_c_stores_the_copied_clusters_compressed(pristine, tmp_path, compress):
    """qemu-img 7.2's rebase has no -c (later ones do): a cluster with any
    difference is copied whole and written compressed (qemu 8.2 aligns -c's
    writes to clusters too)."""
    ours = copy_tree(pristine, tmp_path / "c")
    status, _out, err = corefmt("rebase", *(("-c",) if compress else ()), "-b", "",
                                "top.qcow2", cwd=ours)
    assert status == 0, err
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")
    check_clean(ours / "top.qcow2")
    assert (_compressed_clusters(ours / "top.qcow2") > 0) == compress


def test_c_is_refused_where_the_format_cannot_compress(tmp_path):
    tmp_path.joinpath("base.raw").write_bytes(b"\1" * MIB)
    status, _out, err = corefmt("create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
                                "top.fvd", cwd=tmp_path)
    assert status == 0, err
    before = tmp_path.joinpath("top.fvd").read_bytes()
    status, _out, err = corefmt("rebase", "-c", "-b", "", "top.fvd", cwd=tmp_path)
    assert status == 1 and len(messages(err)) == 1, err
    assert tmp_path.joinpath("top.fvd").read_bytes() == before

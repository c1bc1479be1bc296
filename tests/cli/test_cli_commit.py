"""`corefmt commit` next to `qemu-img commit` on the same chains (made by
qemu-img): exit status, stdout, messages, and every image of the chain
afterwards (guest content, map, check, backing); mixed-format chains qemu
cannot open checked by content; an interrupted commit (SIGKILL) keeps the
guest view and a rerun finishes it."""

from __future__ import annotations

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
    scattered_writes,
)

pytestmark = [pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                 reason="qemu-img/qemu-io not installed (qemu-utils)"),
              pytest.mark.interop]

SIZE = 4 * MIB
IMAGES = ("base.raw", "mid.qcow2", "top.qcow2")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.raw <- mid.qcow2 <- top.qcow2 (top with data, a zeroed range and
    a discarded one); ref.raw is what top shows."""
    directory = tmp_path_factory.mktemp("commit") / "chain"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 2M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "mid.qcow2")
    qemu_io(directory / "mid.qcow2", "write -P 2 1M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             directory / "top.qcow2")
    qemu_io(directory / "top.qcow2", "write -P 3 1536k 1M", "write -z 256k 64k",
            "write -P 5 3M 4k")
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")
    return directory


def _both(pristine: Path, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    theirs = copy_tree(pristine, tmp_path / "qemu")
    ours = copy_tree(pristine, tmp_path / "corefmt")
    expected = qemu_img("commit", *args, cwd=theirs)
    status, out, err = corefmt("commit", *args, cwd=ours)
    assert (status, out) == (expected.returncode, expected.stdout)
    assert messages(err) == [line for line in messages(expected.stderr)
                             if not line.startswith(("WARNING", "  "))]
    return theirs, ours


CASES = {
    "into its backing": ("top.qcow2",),
    "keeping the top (-d)": ("-d", "top.qcow2"),
    "into the base (-b implies -d)": ("-b", "base.raw", "top.qcow2"),
    "the mid layer": ("mid.qcow2",),
    "quiet": ("-q", "top.qcow2"),
    "rate limited": ("-r", "100M", "top.qcow2"),
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_commit_as_qemu_img(pristine, tmp_path, args):
    theirs, ours = _both(pristine, tmp_path, *args)
    for name in IMAGES:
        assert layout(ours / name) == layout(theirs / name), name
        assert qemu_img("compare", theirs / name, ours / name).returncode == 0, name
        assert backing_of(ours / name) == backing_of(theirs / name)
    for name in IMAGES[1:]:
        check_clean(ours / name)
        # An emptied qcow2 is rebuilt and cut short as qemu-img's is.
        assert (ours / name).stat().st_size == (theirs / name).stat().st_size, name
    if args[-1] == "top.qcow2":
        assert same_content(ours / "top.qcow2", pristine / "ref.raw")


REFUSALS = {
    "no backing file": ("-f", "raw", "base.raw"),
    "a base not in the chain": ("-b", "nothere", "top.qcow2"),
    "the top as its own base": ("-b", "top.qcow2", "top.qcow2"),
    "a bad rate": ("-r", "abc", "top.qcow2"),
    "a bad cache mode": ("-t", "bogus", "top.qcow2"),
    "two images": ("top.qcow2", "mid.qcow2"),
}


@pytest.mark.parametrize("args", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_as_qemu_img(pristine, tmp_path, args):
    _theirs, ours = _both(pristine, tmp_path, *args)
    for name in IMAGES:
        assert (ours / name).read_bytes() == (pristine / name).read_bytes()


def test_progress_line_is_qemu_img_s(pristine, tmp_path):
    ours = copy_tree(pristine, tmp_path / "c")
    status, out, _err = corefmt("commit", "-p", "top.qcow2", cwd=ours)
    assert status == 0
    assert out.startswith("    (0.00/100%)\r")
    assert out.endswith("    (100.00/100%)\r\nImage committed.\n")


def test_qcow2_over_fvd(tmp_path):
    """Into an FVD base; the qcow2 top is emptied."""
    directory = tmp_path / "mixed"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 4M", fmt="raw")
    assert corefmt("create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
                   directory / "mid.fvd")[0] == 0
    assert corefmt("io", "-c", "write -P 2 1M 1M", directory / "mid.fvd")[0] == 0
    assert corefmt("create", "-q", "-f", "qcow2", "-b", "mid.fvd", "-F", "fvd",
                   directory / "top.qcow2")[0] == 0
    assert corefmt("io", "-c", "write -P 3 1536k 1M", "-c", "write -z 3M 64k",
                   directory / "top.qcow2")[0] == 0
    content_via_corefmt(directory / "top.qcow2", directory / "ref.raw")
    assert corefmt("commit", "top.qcow2", cwd=directory) == (0, "Image committed.\n", "")
    content_via_corefmt(directory / "mid.fvd", directory / "mid-after.raw")
    content_via_corefmt(directory / "top.qcow2", directory / "top-after.raw")
    reference = (directory / "ref.raw").read_bytes()
    assert (directory / "mid-after.raw").read_bytes() == reference
    assert (directory / "top-after.raw").read_bytes() == reference
    alone = ('json:{"driver": "qcow2", "backing": null, "file": {"driver": "file", '
             f'"filename": "{directory / "top.qcow2"}"}}}}')
    assert not any(run[3] for run in layout(alone)), "the top still holds data"


def test_fvd_over_raw_keeps_its_data_and_says_so(tmp_path):
    directory = tmp_path / "fvd"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    assert corefmt("create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
                   directory / "top.fvd")[0] == 0
    assert corefmt("io", "-c", "write -P 3 100000 2M", directory / "top.fvd")[0] == 0
    content_via_corefmt(directory / "top.fvd", directory / "ref.raw")
    status, out, err = corefmt("commit", "top.fvd", cwd=directory)
    assert (status, out) == (0, "Image committed.\n")
    assert err == ("corefmt: warning: 'top.fvd' keeps its data (as with -d): its format "
                   "cannot be emptied\n")
    assert (directory / "base.raw").read_bytes() == (directory / "ref.raw").read_bytes()
    content_via_corefmt(directory / "top.fvd", directory / "after.raw")
    assert (directory / "after.raw").read_bytes() == (directory / "ref.raw").read_bytes()


def test_interrupted_commit_keeps_the_guest_view(tmp_path):
    """SIGKILL at random points of a rate-limited commit; after each, the
    top reads as before; a rerun completes it."""
    directory = tmp_path / "kill"
    directory.mkdir()
    size = 64 * MIB
    rng = random.Random(11)
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(size))
    qemu_io(directory / "base.raw", "write -P 1 0 32M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "top.qcow2")
    scattered_writes(directory / "top.qcow2", size, 100, 3, rng)
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")
    args = ["commit", "-r", "40M", "top.qcow2"]
    longest = run_time(args, directory)
    killed = 0
    for _ in range(3):
        if kill_at_random(args, directory, rng, longest=longest) is not None:
            killed += 1
        assert same_content(directory / "top.qcow2", directory / "ref.raw")
    assert corefmt(*args, cwd=directory)[0] == 0
    assert same_content(directory / "top.qcow2", directory / "ref.raw")
    assert same_content(directory / "base.raw", directory / "ref.raw", "raw")
    assert not any(run[3] and run[2] == 0 for run in layout(directory / "top.qcow2"))
    check_clean(directory / "top.qcow2")
    assert killed, "no run was interrupted: raise the image size"

"""`corefmt stream` (QEMU's block-stream job; qemu-img has no such verb) on
chains made by qemu-img: the result checked by qemu-img (content, check,
backing), next to the same chain rebased by qemu-img (the guest view qemu
would keep); mixed-format chains by content; an interrupted stream
(SIGKILL) keeps the guest view and a rerun finishes it."""

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


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("stream") / "chain"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 2M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "mid.qcow2")
    qemu_io(directory / "mid.qcow2", "write -P 2 1M 1M", "write -z 256k 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             directory / "top.qcow2")
    qemu_io(directory / "top.qcow2", "write -P 3 1536k 1M")
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")
    return directory


@pytest.mark.parametrize("base", ["base.raw", None], ids=["onto the base", "to nothing"])
def test_stream_keeps_what_qemu_would(pristine, tmp_path, base):
    ours = copy_tree(pristine, tmp_path / "c")
    theirs = copy_tree(pristine, tmp_path / "q")
    args = ("-b", base) if base else ()
    assert corefmt("stream", *args, "top.qcow2", cwd=ours) == (0, "Image streamed.\n", "")
    rebased = qemu_img("rebase", "-b", base or "", *(("-F", "raw") if base else ()),
                       "top.qcow2", cwd=theirs)
    assert rebased.returncode == 0
    assert backing_of(ours / "top.qcow2") == backing_of(theirs / "top.qcow2")
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")
    check_clean(ours / "top.qcow2")
    # Everything above the base is now the top's own (whole clusters).
    assert all(run[2] == 0 or (run[2] == 1 and base) for run in layout(ours / "top.qcow2"))
    # A rerun has nothing left to do.
    again = corefmt("stream", *args, "top.qcow2", cwd=ours)
    assert again[0] == 0
    assert same_content(ours / "top.qcow2", pristine / "ref.raw")


def test_unknown_base_is_refused(pristine, tmp_path):
    ours = copy_tree(pristine, tmp_path / "c")
    assert corefmt("stream", "-b", "nothere", "top.qcow2", cwd=ours) == (
        1, "", "corefmt: Did not find 'nothere' in the backing chain of 'top.qcow2'\n")
    assert (ours / "top.qcow2").read_bytes() == (pristine / "top.qcow2").read_bytes()


def test_no_backing_file(pristine, tmp_path):
    ours = copy_tree(pristine, tmp_path / "c")
    assert corefmt("stream", "-f", "raw", "base.raw", cwd=ours) == (
        0, "'base.raw' has no backing file: nothing to stream\n", "")


def test_fvd_over_qcow2_over_raw(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(SIZE))
    qemu_io(directory / "base.raw", "write -P 1 0 3M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "mid.qcow2")
    qemu_io(directory / "mid.qcow2", "write -P 2 1M 1M")
    assert corefmt("create", "-q", "-f", "fvd", "-b", "mid.qcow2", "-F", "qcow2",
                   directory / "top.fvd")[0] == 0
    assert corefmt("io", "-c", "write -P 3 1536k 1M", directory / "top.fvd")[0] == 0
    content_via_corefmt(directory / "top.fvd", directory / "ref.raw")
    reference = (directory / "ref.raw").read_bytes()
    for args, backing in ((("-b", "base.raw"), "base.raw"), ((), None)):
        assert corefmt("stream", *args, "top.fvd", cwd=directory)[0] == 0
        content_via_corefmt(directory / "top.fvd", directory / "after.raw")
        assert (directory / "after.raw").read_bytes() == reference
        _status, info, _err = corefmt("info", "--output=json", directory / "top.fvd")
        assert ('"backing-filename": "base.raw"' in info) == bool(backing)


def test_interrupted_stream_keeps_the_guest_view(tmp_path):
    directory = tmp_path / "kill"
    directory.mkdir()
    size = 64 * MIB
    rng = random.Random(5)
    three_layer_chain(directory, size, rng, 150, 30)
    args = ["stream", "-b", "base.raw", "top.qcow2"]
    longest = run_time(args, directory)
    killed = 0
    for _ in range(3):
        if kill_at_random(args, directory, rng, longest=longest) is not None:
            killed += 1
        assert same_content(directory / "top.qcow2", directory / "ref.raw")
    assert corefmt(*args, cwd=directory)[0] == 0
    assert backing_of(directory / "top.qcow2") == ("base.raw", "raw")
    assert same_content(directory / "top.qcow2", directory / "ref.raw")
    check_clean(directory / "top.qcow2")
    assert killed, "no run was interrupted: raise the image size"

"""corefmt compare's -p, -U and exit statuses 0-4 next to qemu-img compare
(its man page: 0 identical, 1 different, 2 an image cannot be opened, 3
allocation cannot be checked, 4 data cannot be read). Cases run corefmt's
main() in-process, qemu-img as a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_inprocess import run_corefmt
from corefmt_cli_helpers import QEMU_IMG, QEMU_IO, runner

from corefmt.errors import CorefmtError
from corefmt.ops import compare as compare_op

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
READ_ERROR = ("driver=raw,file.driver=blkdebug,file.inject-error.0.event=read_aio,"
              "file.inject-error.0.errno=5,file.image.filename=same.raw")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once: the cases only read them."""
    tmp_path = tmp_path_factory.mktemp("compare")
    qemu_img = runner([QEMU_IMG or "qemu-img"], tmp_path)
    qemu_io = runner([QEMU_IO or "qemu-io"], tmp_path)

    def make(name: str, size: str, *writes: str) -> None:
        assert qemu_img("create", "-q", "-f", "raw", name, size).returncode == 0
        for write in writes:
            assert qemu_io("-f", "raw", "-c", write, name).returncode == 0

    make("a.raw", "10M", "write -P 1 0 10M")
    make("same.raw", "10M", "write -P 1 0 10M")
    make("longer.raw", "20M", "write -P 1 0 10M")
    make("differs.raw", "20M", "write -P 1 0 10M", "write -P 2 5M 512")
    make("tail.raw", "20M", "write -P 1 0 10M", "write -P 2 15M 512")
    assert qemu_img("convert", "-O", "qcow2", "a.raw", "a.qcow2").returncode == 0
    return tmp_path


CASES = [
    ["-p", "-f", "raw", "-F", "raw", "a.raw", "longer.raw"],  # warning between progress lines
    ["-p", "-f", "raw", "-F", "raw", "a.raw", "differs.raw"],
    ["-p", "-f", "raw", "-F", "raw", "a.raw", "tail.raw"],  # mismatch in the longer's tail
    ["-p", "-s", "-f", "raw", "-F", "raw", "a.raw", "longer.raw"],
    ["-p", "-s", "-F", "raw", "a.qcow2", "same.raw"],
    ["-p", "-q", "-f", "raw", "-F", "raw", "a.raw", "tail.raw"],
    ["-U", "-f", "raw", "-F", "raw", "a.raw", "longer.raw"],
    ["-p", "-f", "raw", "-F", "raw", "a.raw", "missing.raw"],  # 2, progress line still ended
    ["--image-opts", "driver=raw,file.filename=a.raw", READ_ERROR],  # 4
]


def _lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _first_error(text: str) -> str:
    lines = text.splitlines()
    return lines[0].split(": ", 1)[1] if lines else ""


@pytest.mark.parametrize("args", CASES, ids=range(len(CASES)))
def test_compare_answers_as_qemu_img(images: Path, args):
    qemu_img = runner([QEMU_IMG or "qemu-img"], images)
    ours, theirs = run_corefmt(images, "compare", *args), qemu_img("compare", *args)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert _lines(ours.stdout) == theirs.stdout  # text mode turned qemu-img's \r into \n
    assert _first_error(ours.stderr) == _first_error(theirs.stderr) or \
        theirs.returncode == 2  # qemu-img repeats "Could not open" for missing files


def test_allocation_failure_is_3(images: Path, monkeypatch):
    """qemu-img's "Sector allocation test failed" (its status 3), for a block
    status that cannot be had (corefmt's qcow2 defers a bad entry to reads)."""
    def failing(node, start, end):
        raise CorefmtError("no status")
        yield  # a generator, as chain_extents

    monkeypatch.setattr(compare_op, "chain_extents", failing)
    result = run_corefmt(images, "compare", "-f", "raw", "-F", "raw", "a.raw", "same.raw")
    assert result.returncode == compare_op.EXIT_STATUS_FAILED
    assert result.stderr == "corefmt: Sector allocation test failed for a.raw\n"


def test_json_progress_totals_the_larger_image(images: Path):
    import json

    result = run_corefmt(images, "compare", "--progress=json", "-f", "raw", "-F", "raw",
                         "a.raw", "longer.raw")
    assert result.returncode == 0
    last = json.loads(result.stderr.splitlines()[-1])
    assert (last["done"], last["total"]) == (20 * MiB, 20 * MiB)

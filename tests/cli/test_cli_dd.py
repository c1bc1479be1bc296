"""corefmt dd next to qemu-img dd on images qemu-img made: exit status,
stdout, stderr (program name aside) and the output image (its size,
qemu-img compare, qemu-img map: qemu-img writes every block, so the output
is allocated the same way). The case matrix runs corefmt's main()
in-process (fast); one test runs it as a user does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_inprocess import run_corefmt

from corefmt.ops.dd import DdArgs, plan

pytestmark = pytest.mark.interop

#: (options, operands); OUT is replaced by each tool's own output name.
CASES = [
    ([], ["if=src.raw", "of=OUT"]),
    (["-O", "qcow2"], ["if=src.raw", "of=OUT"]),
    ([], ["bs=64k", "count=3", "if=src.raw", "of=OUT"]),
    ([], ["bs=64k", "skip=3", "if=src.raw", "of=OUT"]),
    ([], ["bs=1000", "skip=3", "count=2", "if=src.raw", "of=OUT"]),  # count from the start
    ([], ["bs=1k", "count=2000", "if=src.raw", "of=OUT"]),
    ([], ["bs=1M", "skip=2", "if=src.raw", "of=OUT"]),  # past the end: warning, exit 0
    ([], ["skip=2000", "if=src.raw", "of=OUT"]),
    ([], ["bs=1.5k", "count=1", "if=src.raw", "of=OUT"]),
    ([], ["count=1k", "if=src.raw", "of=OUT"]),
    ([], ["bs=3", "count=100", "skip=5", "if=src.raw", "of=OUT"]),  # not whole sectors
    (["-O", "qcow2"], ["bs=3", "count=100", "skip=5", "if=src.raw", "of=OUT"]),
    ([], ["bs=1k", "bs=2k", "if=src.raw", "of=OUT"]),
    ([], ["count=0", "if=src.raw", "of=OUT"]),
    (["-U"], ["if=src.raw", "of=OUT"]),
    ([], ["bs=0", "if=src.raw", "of=OUT"]),
    ([], ["bs=1x", "if=src.raw", "of=OUT"]),
    ([], ["bs=8E", "if=src.raw", "of=OUT"]),
    ([], ["count=-1", "if=src.raw", "of=OUT"]),
    ([], ["skip=x", "if=src.raw", "of=OUT"]),
    ([], ["skip=99999999999999999999", "if=src.raw", "of=OUT"]),
    ([], ["if=src.raw"]),
    ([], ["of=OUT"]),
    ([], ["foo=1", "if=src.raw", "of=OUT"]),
    ([], ["bogus", "if=src.raw", "of=OUT"]),
    (["-O", "bogus"], ["if=src.raw", "of=OUT"]),
]
QCOW2_CASES = [
    ([], ["if=src.qcow2", "of=OUT"]),
    ([], ["bs=1000", "count=7", "skip=2", "if=src.qcow2", "of=OUT"]),
    (["-O", "qcow2"], ["bs=64k", "skip=1", "if=src.qcow2", "of=OUT"]),
]


@pytest.fixture
def sources(tmp_path: Path, qemu_img, qemu_io) -> Path:
    assert qemu_img("create", "-q", "-f", "raw", "src.raw", "1M").returncode == 0
    assert qemu_io("-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 512k 4k",
                   "src.raw").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "src.qcow2", "1000000").returncode == 0
    assert qemu_io("-f", "qcow2", "-c", "write -P 5 4k 8k", "src.qcow2").returncode == 0
    return tmp_path


def _without_program(text: str, ours: str, theirs: str) -> str:
    return "\n".join(line.removeprefix("qemu-img: ").removeprefix("corefmt: ")
                     .replace(theirs, ours) for line in text.splitlines())


def _map(qemu_img, path: str, fmt: str) -> list[dict]:
    entries = json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)
    for entry in entries:
        entry.pop("offset", None)  # where qcow2 put a cluster is the layout's business
    return entries


@pytest.mark.parametrize("fmt, cases", [("raw", CASES), ("qcow2", QCOW2_CASES)])
def test_dd_answers_and_copies_as_qemu_img(sources: Path, qemu_img, fmt, cases):
    for number, (options, operands) in enumerate(cases):
        case = (options, operands)
        mine, reference = f"ours{number}.img", f"theirs{number}.img"
        ours = run_corefmt(sources, "dd", "-f", fmt, *options,
                           *[word.replace("OUT", mine) for word in operands])
        theirs = qemu_img("dd", "-f", fmt, *options,
                          *[word.replace("OUT", reference) for word in operands])
        assert ours.returncode == theirs.returncode, (case, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout, case
        assert _without_program(ours.stderr, mine, reference) == \
            _without_program(theirs.stderr, mine, reference), case
        assert (sources / mine).exists() == (sources / reference).exists(), case
        if not (sources / reference).exists():
            continue
        out_format = options[options.index("-O") + 1] if "-O" in options else "raw"
        if out_format == "raw":
            assert (sources / mine).stat().st_size == (sources / reference).stat().st_size
        compared = qemu_img("compare", "-f", out_format, "-F", out_format, mine, reference)
        assert compared.returncode == 0, (case, compared.stdout)
        assert _map(qemu_img, mine, out_format) == _map(qemu_img, reference, out_format), case


def test_a_user_run(sources: Path, corefmt, qemu_img):
    result = corefmt("dd", "-f", "raw", "-O", "qcow2", "bs=64k", "count=4", "if=src.raw",
                     "of=out.qcow2")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert qemu_img("check", "-q", "out.qcow2").returncode == 0
    info = json.loads(qemu_img("info", "--output=json", "out.qcow2").stdout)
    assert info["virtual-size"] == 4 * 64 * 1024


def test_json_progress_goes_to_stderr(sources: Path):
    result = run_corefmt(sources, "dd", "-f", "raw", "--progress=json", "if=src.raw",
                         "of=out.raw")
    assert result.returncode == 0 and result.stdout == ""
    last = json.loads(result.stderr.splitlines()[-1])
    assert (last["phase"], last["done"], last["total"]) == ("dd", 1 << 20, 1 << 20)


@pytest.mark.parametrize("size, args, expected", [
    (1000, DdArgs(count=1, skip=2, block_size=1000), (1000, 1000, 0, True)),
    (4096, DdArgs(count=3, skip=1, block_size=1024), (1024, 3072, 2048, False)),
    (4096, DdArgs(skip=4, block_size=1024), (4096, 4096, 0, False)),  # at the end: no warning
    (4096, DdArgs(count=99), (0, 4096, 4096, False)),
])
def test_plan_is_qemu_img_arithmetic(size, args, expected):
    layout = plan(size, args)
    assert (layout.start, layout.end, layout.out_size, layout.skip_past_end) == expected

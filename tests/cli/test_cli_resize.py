"""corefmt resize next to qemu-img resize: each case runs on its own copy of
an image qemu-img made, and both tools must agree on the exit status,
stdout, stderr (program name aside) and the resulting image (qemu-img
compare, the virtual size, qemu-img check). The case matrix runs corefmt's
main() in-process (fast); the other tests run it as a user does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_inprocess import run_corefmt

import corefmt

pytestmark = pytest.mark.interop

#: (image, format, arguments before the image, size)
CASES = [
    ("disk.raw", "raw", [], "2M"),
    ("disk.raw", "raw", [], "+1M"),
    ("disk.raw", "raw", [], "-1M"),  # a negative size is not an option
    ("disk.raw", "raw", ["--shrink"], "-512"),
    ("disk.raw", "raw", ["--shrink"], "300k"),
    ("disk.raw", "raw", [], "1000001"),  # raw takes any size, shown rounded to 512
    ("disk.raw", "raw", ["-q"], "1.5M"),
    ("disk.raw", "raw", [], "0"),
    ("disk.raw", "raw", ["--shrink"], "-5G"),
    ("disk.raw", "raw", [], "8E"),
    ("disk.raw", "raw", [], "9223372036854775807"),
    ("disk.raw", "raw", [], "12x"),
    ("disk.raw", "raw", [], "99999999999999999999999"),
    ("disk.raw", "raw", ["--preallocation=full"], "3M"),
    ("disk.raw", "raw", ["--preallocation=falloc"], "3M"),
    ("disk.raw", "raw", ["--preallocation=metadata"], "3M"),
    ("disk.raw", "raw", ["--preallocation=full", "--shrink"], "512k"),
    ("disk.raw", "raw", ["--preallocation=bogus"], "3M"),
    ("disk.qcow2", "qcow2", [], "3M"),
    ("disk.qcow2", "qcow2", [], "1000000"),
    ("disk.qcow2", "qcow2", ["--shrink"], "1000"),
    ("disk.qcow2", "qcow2", ["--shrink"], "300k"),
    ("disk.qcow2", "qcow2", [], "+0"),
    ("disk.qcow2", "qcow2", ["--preallocation=metadata"], "3M"),
    ("disk.qcow2", "qcow2", ["--preallocation=full"], "3000320"),
    ("v2snap.qcow2", "qcow2", [], "2M"),
    ("v3snap.qcow2", "qcow2", ["--shrink"], "512k"),
    ("bitmap.qcow2", "qcow2", ["--shrink"], "512k"),
]


@pytest.fixture
def images(tmp_path: Path, qemu_img, qemu_io) -> Path:
    steps = [
        ("create", "-q", "-f", "raw", "disk.raw", "1M"),
        ("create", "-q", "-f", "qcow2", "disk.qcow2", "1M"),
        ("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2snap.qcow2", "1M"),
        ("snapshot", "-c", "s1", "v2snap.qcow2"),
        ("create", "-q", "-f", "qcow2", "v3snap.qcow2", "1M"),
        ("create", "-q", "-f", "qcow2", "bitmap.qcow2", "1M"),
        ("bitmap", "--add", "bitmap.qcow2", "b0"),
    ]
    for step in steps:
        assert qemu_img(*step).returncode == 0, step
    for name, fmt in (("disk.raw", "raw"), ("disk.qcow2", "qcow2"), ("v3snap.qcow2", "qcow2")):
        assert qemu_io("-f", fmt, "-c", "write -P 7 0 600k", name).returncode == 0
    assert qemu_img("snapshot", "-c", "s1", "v3snap.qcow2").returncode == 0
    return tmp_path


def _without_program(text: str) -> str:
    return "\n".join(line.removeprefix("qemu-img: ").removeprefix("corefmt: ")
                     for line in text.splitlines())


def _map(qemu_img, path: str, fmt: str) -> list[dict]:
    """Allocation as qemu-img map shows it (where qcow2 put clusters aside)."""
    entries = json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)
    for entry in entries:
        entry.pop("offset", None)
    return entries


def _virtual_size(qemu_img, path: str, fmt: str) -> int:
    return json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)["virtual-size"]


def test_resize_answers_and_resizes_as_qemu_img(images: Path, qemu_img):
    for number, (name, fmt, options, size) in enumerate(CASES):
        case = (name, options, size)
        mine, reference = f"ours{number}-{name}", f"theirs{number}-{name}"
        shutil.copy(images / name, images / mine)
        shutil.copy(images / name, images / reference)
        ours = run_corefmt(images, "resize", "-f", fmt, *options, mine, size)
        theirs = qemu_img("resize", "-f", fmt, *options, reference, size)
        assert ours.returncode == theirs.returncode, (case, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout, case
        assert _without_program(ours.stderr) == _without_program(theirs.stderr), case
        assert _virtual_size(qemu_img, mine, fmt) == _virtual_size(qemu_img, reference, fmt), case
        compared = qemu_img("compare", "-f", fmt, "-F", fmt, mine, reference)
        assert compared.returncode == 0, (case, compared.stdout)
        assert _map(qemu_img, mine, fmt) == _map(qemu_img, reference, fmt), case
        if fmt == "qcow2":
            assert qemu_img("check", "-q", "-f", fmt, mine).returncode == 0, case


def test_argument_errors_match_qemu_img(images: Path, qemu_img):
    for args in (["disk.raw"], [], ["-f", "raw", "disk.raw", "1M", "2M"]):
        ours, theirs = run_corefmt(images, "resize", *args), qemu_img("resize", *args)
        assert ours.returncode == theirs.returncode == 1, args
        assert ours.stderr.splitlines()[0].removeprefix("corefmt: ") == \
            theirs.stderr.splitlines()[0].removeprefix("qemu-img: "), args


def test_a_user_run_with_image_opts(images: Path, corefmt, qemu_img):
    spec = "driver=raw,file.filename=disk.raw"
    assert corefmt("resize", "--image-opts", spec, "-1k").stdout == ""  # no --shrink
    assert corefmt("resize", "--image-opts", spec, "3M").stdout == "Image resized.\n"
    assert _virtual_size(qemu_img, "disk.raw", "raw") == 3 * 1024 * 1024


def test_fvd_grows_only(images: Path):
    def run(*args: str):
        return run_corefmt(images, *args)

    assert run("create", "-q", "-f", "fvd", "disk.fvd", "1M").returncode == 0
    assert run("resize", "-f", "fvd", "disk.fvd", "+1M").returncode == 0
    with corefmt.open(str(images / "disk.fvd"), "fvd", read_only=True) as disk:
        assert disk.virtual_size == 2 << 20
    refused = run("resize", "-f", "fvd", "--shrink", "disk.fvd", "1M")
    assert refused.returncode == 1 and "shrinking is not supported" in refused.stderr
    assert "Unsupported preallocation mode: full" in run(
        "resize", "-f", "fvd", "--preallocation=full", "disk.fvd", "3M").stderr


def test_python_api(images: Path):
    path = str(images / "disk.raw")
    assert corefmt.resize(path, "+1M", "raw") == 2 * 1024 * 1024
    with pytest.raises(corefmt.CorefmtError, match="--shrink"):
        corefmt.resize(path, 4096, "raw")
    assert corefmt.resize(path, 4096, "raw", shrink=True) == 4096

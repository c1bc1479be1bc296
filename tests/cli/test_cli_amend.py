"""`corefmt amend` against `qemu-img amend` on identical images: exit status,
stdout (option help, -p progress) and the error text after the program-name
prefix must be qemu-img 7.2's, for the refusals of option syntax, option
values, images amend cannot change and option combinations."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corefmt.cli.main import main

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

pytestmark = [pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                 reason="qemu-img/qemu-io not installed (qemu-utils)"),
              pytest.mark.interop]

ENV = {**os.environ, "LC_ALL": "C"}
#: Needs Qcow2AmendOptions (plugins/qcow2/corefmt_qcow2/options.py) to carry
#: qemu's encrypt.* amend options and compat's amend wording.

def run(*args: str | Path) -> subprocess.CompletedProcess:
    """A qemu program; its output decoded without newline translation (-p's \\r)."""
    result = subprocess.run([*map(str, args)], capture_output=True, env=ENV)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def corefmt(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([*map(str, args)])
    return status, out.getvalue(), err.getvalue()


def image(directory: Path, name: str, create: str, write: str) -> Path:
    directory.mkdir()
    path = directory / name
    options = create.replace("DATA", str(directory / "data.raw"))
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", *(("-o", options) if options else ()),
        path, "1M")
    if write:
        run(QEMU_IO, "-c", write, path)
    return path


def compare(tmp_path: Path, create: str, args: tuple[str, ...], write: str = "",
            with_file: bool = True) -> tuple[int, str, str]:
    """Run both on identical images; assert the same status, stdout and
    messages; return corefmt's."""
    q = image(tmp_path / "q", "x.qcow2", create, write)
    c = image(tmp_path / "c", "x.qcow2", create, write)
    qemu = run(QEMU_IMG, "amend", *args, *((q,) if with_file else ()))
    ours = corefmt("amend", *args, *((c,) if with_file else ()))
    first_lines = [line.removeprefix("qemu-img: ") for line in qemu.stderr.splitlines()
                   if not line.startswith("Try 'qemu-img --help'")]
    assert (ours[0], ours[1]) == (qemu.returncode, qemu.stdout)
    assert [line.removeprefix("corefmt: ") for line in ours[2].splitlines()] == first_lines
    if qemu.returncode == 0:
        info = [run(QEMU_IMG, "info", path).stdout.replace(str(path.parent), "")
                for path in (q, c)]
        assert info[0].split("Format specific")[1] == info[1].split("Format specific")[1]
    return ours


REFUSALS = [
    # (create options, amend arguments, qemu-io command)
    ("", ("-o", "refcount_bits=3"), ""),
    ("", ("-o", "refcount_bits=128"), ""),
    ("", ("-o", "refcount_bits=x"), ""),
    ("", ("-o", "lazy_refcounts=maybe"), ""),
    ("", ("-o", "size=abc"), ""),
    ("", ("-o", "size=513"), ""),
    ("", ("-o", "compat=0.10,refcount_bits=8"), ""),
    ("", ("-o", "compat=0.10,lazy_refcounts=on"), ""),
    ("", ("-o", "data_file=foo"), ""),
    ("", ("-o", "data_file_raw=on"), ""),
    ("", ("-o", "lazy_refcounts=on,data_file=x"), ""),
    ("", ("-o", "backing_file=foo"), ""),
    ("", ("-o", "backing_fmt=raw"), ""),
    ("", ("-o", "cluster_size=4k"), ""),
    ("", ("-o", "preallocation=full"), ""),
    ("", ("-o", "nocow=on"), ""),
    ("", ("-o", "foo=1"), ""),
    ("", ("-o", "foo=1,cluster_size=4k"), ""),
    ("", ("-o", "cluster_size=4k,foo=1"), ""),
    ("", ("-o", ""), ""),
    ("", ("-o", ",compat=1.1"), ""),
    ("", ("-o", "compat=1.1,"), ""),
    ("", (), ""),
    ("", ("-o", "compat=1.1", "-t", "bogus"), ""),
    ("", ("-p", "-o", "foo=1"), ""),
    ("", ("-q", "-p", "-o", "foo=1"), ""),
    ("", ("-f", "raw", "-o", "size=2M"), ""),
    ("", ("-f", "raw", "-o", "help"), ""),
    ("", ("-f", "nosuch", "-o", "help"), ""),
    ("", ("-o", "size=2M,compat=0.10,refcount_bits=8"), ""),
    ("extended_l2=on", ("-o", "compat=0.10"), ""),
    ("data_file=DATA", ("-o", "compat=0.10"), ""),
    ("data_file=DATA", ("-o", "data_file_raw=on"), ""),
    ("refcount_bits=8", ("-o", "compat=0.10"), ""),
    ("compression_type=zstd", ("-o", "compat=0.10"), "write -c 0 64k"),
    ("compat=0.10", ("-o", "lazy_refcounts=on"), ""),
    ("compat=0.10", ("-o", "refcount_bits=8"), ""),
    ("compat=0.10", ("-o", "compat=1.1,backing_file=foo"), ""),
]


@pytest.mark.parametrize(("create", "args", "write"), REFUSALS,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _ in REFUSALS])
def test_refusals_like_qemu(tmp_path: Path, create: str, args: tuple[str, ...],
                            write: str) -> None:
    status, _, err = compare(tmp_path, create, args, write)
    assert status == 1 and err.startswith("corefmt: ")


ACCEPTED = [
    ("", ("-o", "refcount_bits=0x10")),
    ("", ("-o", "lazy_refcounts")),
    ("", ("-o", "nolazy_refcounts")),
    ("", ("-o", "data_file_raw=off")),
    ("", ("-o", "size=0")),
    ("", ("-o", "compat=0.10", "-o", "lazy_refcounts=off")),
    ("", ("-o", "size=2M", "-t", "none")),
    ("", ("-o", "size=2M", "--force")),
    ("", ("-q", "-p", "-o", "compat=0.10")),
    ("", ("-p", "-o", "compat=0.10")),
    ("", ("-p", "-o", "size=2M")),
    ("compat=0.10", ("-p", "-o", "compat=1.1")),
    ("refcount_bits=8", ("-o", "compat=0.10,refcount_bits=16")),
    ("compression_type=zstd", ("-o", "compat=0.10")),
    ("lazy_refcounts=on", ("-o", "compat=0.10")),
    ("data_file=DATA,data_file_raw=on", ("-o", "data_file_raw=off")),
]


@pytest.mark.parametrize(("create", "args"), ACCEPTED,
                         ids=[f"{c}:{' '.join(a)}" for c, a in ACCEPTED])
def test_accepted_like_qemu(tmp_path: Path, create: str, args: tuple[str, ...]) -> None:
    assert compare(tmp_path, create, args)[0] == 0


def test_data_file_renamed_like_qemu(tmp_path: Path) -> None:
    for name in ("renamed.raw", ""):
        q = image(tmp_path / f"q{name}", "x.qcow2", "data_file=DATA", "write -P 1 0 64k")
        c = image(tmp_path / f"c{name}", "x.qcow2", "data_file=DATA", "write -P 1 0 64k")
        assert run(QEMU_IMG, "amend", "-o", f"data_file={name}", q).returncode == 0
        assert corefmt("amend", "-o", f"data_file={name}", c) == (0, "", "")
        assert q.read_bytes()[:65536] == c.read_bytes()[:65536]


def test_option_help_exactly_qemus(tmp_path: Path) -> None:
    qemu = run(QEMU_IMG, "amend", "-f", "qcow2", "-o", "help")
    assert corefmt("amend", "-f", "qcow2", "-o", "help") == (0, qemu.stdout, "")


@pytest.mark.parametrize("args", [("-o", "compat=0.9"), ("-o", "compat"),
                                  ("-o", "encrypt.keyslot=1"),
                                  ("-o", "refcount_bits=3,compat=0.9")])
def test_refusals_options_py_must_word(tmp_path: Path, args: tuple[str, ...]) -> None:
    compare(tmp_path, "", args)


def test_missing_image_is_an_error(tmp_path: Path) -> None:
    status, out, err = corefmt("amend", "-o", "compat=0.10", tmp_path / "none.qcow2")
    assert (status, out) == (1, "") and err.startswith("corefmt: ")

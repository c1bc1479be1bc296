"""corefmt measure against qemu-img measure: the same stdout, the same
stderr (the program's name aside) and the same exit status, for --size and
for source images qemu made (raw and qcow2 targets)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest
from corefmt_cli_helpers import QEMU_IMG, QEMU_IO, run_parallel, runner

from corefmt.cli.main import main

pytestmark = pytest.mark.interop

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def _qemu_stderr(text: str) -> str:
    return re.sub(r"^qemu-img: ", "corefmt: ", text, flags=re.MULTILINE)


def _corefmt_in_process(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """corefmt's main in this process (as fast as many cases need)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        status = main(["measure", *args])
    return status, out.getvalue(), err.getvalue()


def _qemu(args: list[str], cwd: Path) -> tuple[int, str, str]:
    result = subprocess.run([QEMU_IMG or "qemu-img", "measure", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=60, check=False,
                            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    return result.returncode, result.stdout, _qemu_stderr(result.stderr)


def _compare_all(cases: list[list[str]], cwd: Path) -> None:
    """Every case run by both; the differences listed together."""
    expected = run_parallel({index: (lambda case=case: _qemu(case, cwd))
                             for index, case in enumerate(cases)})
    differences = []
    for index, case in enumerate(cases):
        got = _corefmt_in_process(case, cwd)
        if got != expected[index]:
            differences.append(f"measure {' '.join(case)}:\n  qemu-img {expected[index]}\n"
                               f"  corefmt  {got}")
    assert not differences, "\n".join(differences)


def _qemu_img(*args: str | Path, cwd: Path) -> None:
    subprocess.run([QEMU_IMG or "qemu-img", *map(str, args)], cwd=cwd, check=True,
                   capture_output=True)


def _qemu_io(image: str, *commands: str, cwd: Path, format: str = "qcow2") -> None:
    arguments = [QEMU_IO or "qemu-io", "-f", format]
    for command in commands:
        arguments += ["-c", command]
    subprocess.run([*arguments, image], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Source images, all made by qemu-img and qemu-io."""
    if not (QEMU_IMG and QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("measure")
    # raw, sparse, with data in a few places (one past 4G)
    _qemu_img("create", "-f", "raw", "sparse.raw", "5G", cwd=d)
    _qemu_io("sparse.raw", "write -P 1 0 4k", "write -P 2 1M 130k", "write -P 3 4100M 512",
             cwd=d, format="raw")
    # raw with an odd size (not whole sectors), its tail written
    (d / "odd.raw").write_bytes(b"\x07" * 100 + bytes(70000) + b"\x09" * 3)
    # qcow2 with data, zero clusters and subcluster-sized writes
    _qemu_img("create", "-f", "qcow2", "data.qcow2", "64M", cwd=d)
    _qemu_io("data.qcow2", "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 5M 4k",
             "write -P 3 10M 512", "write -P 0 20M 64k", "write -z 30M 4k", cwd=d)
    # a chain: raw base, qcow2 middle, qcow2 top larger than its backing file
    _qemu_img("create", "-f", "raw", "base.raw", "16M", cwd=d)
    _qemu_io("base.raw", "write -P 5 0 2M", "write -P 6 8M 64k", cwd=d, format="raw")
    _qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", cwd=d)
    _qemu_io("mid.qcow2", "write -P 7 4M 1M", "write -z 0 64k", cwd=d)
    _qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "32M",
              cwd=d)
    _qemu_io("top.qcow2", "write -P 8 20M 200k", "write -z 8M 64k", cwd=d)
    # qcow2 with persistent bitmaps
    _qemu_img("create", "-f", "qcow2", "bitmaps.qcow2", "3G", cwd=d)
    _qemu_io("bitmaps.qcow2", "write -P 1 0 1M", cwd=d)
    _qemu_img("bitmap", "--add", "bitmaps.qcow2", "b0", cwd=d)
    _qemu_img("bitmap", "--add", "-g", "512", "bitmaps.qcow2", "a-longer-bitmap-name", cwd=d)
    # v2, extended L2, small clusters, compressed, preallocated
    _qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M", cwd=d)
    _qemu_io("v2.qcow2", "write -P 1 0 70k", cwd=d)
    _qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "ext.qcow2",
              "10M", cwd=d)
    _qemu_io("ext.qcow2", "write -P 1 4k 4k", "write -z 1M 256k", "write -P 2 3M 8k", cwd=d)
    _qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "small.qcow2", "10M", cwd=d)
    _qemu_io("small.qcow2", "write -P 1 1k 10k", "write -P 2 2M 1k", cwd=d)
    _qemu_img("convert", "-c", "-O", "qcow2", "data.qcow2", "compressed.qcow2", cwd=d)
    _qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", "meta.qcow2", "8M",
              cwd=d)
    _qemu_io("meta.qcow2", "write -P 1 1M 64k", cwd=d)
    _qemu_img("create", "-f", "qcow2", "empty.qcow2", "0", cwd=d)
    return d


# -- --size -----------------------------------------------------------------------------
SIZES = ["0", "1", "512", "513", "1M", "1G", "1T", "123456789", "1.5M", "1000000007"]
CLUSTER_SIZES = ["512", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k",
                 "1M", "2M"]


def test_size_per_cluster_size(images: Path) -> None:
    cases = [["-O", "qcow2", "-o", f"cluster_size={cs}", "--size", size]
             for cs in CLUSTER_SIZES for size in SIZES]
    cases += [["-O", "qcow2", "-o", f"cluster_size={cs}", "--size", "1P"]
              for cs in ("64k", "2M")]
    _compare_all(cases, images)


def test_size_raw_and_defaults(images: Path) -> None:
    cases = [[*target, "--size", size] for target in ([], ["-O", "raw"], ["-O", "qcow2"])
             for size in [*SIZES, "1P", "1e", "0x10", "1.3k", "9223372036854775807"]]
    cases += [["--output=json", "-O", fmt, "--size", "1G"] for fmt in ("raw", "qcow2")]
    cases += [["--output", "json", "--size", "1T", "-O", "qcow2"],
              ["--output=human", "-O", "qcow2", "--size", "1G"],
              ["-O", "raw", "-o", "preallocation=full,nocow=on", "--size", "5M"],
              ["-O", "raw", "-o", "extent_size_hint=8G,preallocation=bogus", "--size", "5M"],
              ["-O", "raw", "-o", "size=7M", "--size", "5M"]]
    _compare_all(cases, images)


def test_refcount_bits_extended_l2_preallocation(images: Path) -> None:
    cases = [["-O", "qcow2", "-o", f"refcount_bits={bits},cluster_size={cs}", "--size", size]
             for bits in (1, 2, 4, 8, 16, 32, 64) for cs in ("512", "64k", "2M")
             for size in ("1G", "1T")]
    cases += [["-O", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}", "--size", size]
              for cs in ("16k", "64k", "2M") for size in ("1M", "1G", "1T")]
    cases += [["-O", "qcow2", "-o", f"preallocation={mode}{extra}", "--size", "1G"]
              for mode in ("off", "metadata", "falloc", "full")
              for extra in ("", ",cluster_size=4k,refcount_bits=64", ",extended_l2=on")]
    cases += [["--output=json", "-O", "qcow2", "-o", option, "--size", "100M"]
              for option in ("compat=0.10", "compat=1.1", "lazy_refcounts=on",
                             "backing_file=x,backing_fmt=raw", "compression_type=zstd",
                             "cluster_size=8k",
                             "size=5G", "nocow=on,extent_size_hint=0", "lazy_refcounts",
                             "nolazy_refcounts", "refcount_bits=0x10", "data_file=d.raw",
                             "encrypt.format=aes", "encryption=on")]
    cases.append(["-O", "qcow2", "-o", "cluster_size=8k", "-o", "cluster_size=32k",
                  "--size", "100M"])
    _compare_all(cases, images)


# -- source images ----------------------------------------------------------------------
SOURCES = ["sparse.raw", "odd.raw", "data.qcow2", "base.raw", "mid.qcow2", "top.qcow2",
           "bitmaps.qcow2", "v2.qcow2", "ext.qcow2", "small.qcow2", "compressed.qcow2",
           "meta.qcow2", "empty.qcow2"]


def test_sources(images: Path) -> None:
    cases = [[*target, source] for source in SOURCES
             for target in ([], ["-O", "qcow2"], ["--output=json", "-O", "qcow2"])]
    cases += [["-O", "qcow2", "-o", option, source] for source in SOURCES
              for option in ("cluster_size=512", "cluster_size=2M,refcount_bits=1",
                             "extended_l2=on,cluster_size=16k", "compat=0.10",
                             "preallocation=full", "backing_file=base.raw")]
    cases += [["--output=json", "-O", "raw", "top.qcow2"], ["-f", "qcow2", "top.qcow2"],
              ["-f", "raw", "-O", "qcow2", "mid.qcow2"], ["-U", "-O", "qcow2", "data.qcow2"],
              ["-O", "qcow2", "-o", "size=1T,cluster_size=512", "data.qcow2"],
              ["-O", "qcow2", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
              ["-O", "qcow2", "--image-opts", "driver=raw,file.driver=file,"
               "file.filename=sparse.raw"]]
    _compare_all(cases, images)


# -- refusals ---------------------------------------------------------------------------
REFUSED = [
    [], ["-O", "qcow2"], ["--size", "1G", "data.qcow2"], ["data.qcow2", "base.raw"],
    ["-f", "raw"], ["-l", "snap"], ["--image-opts"], ["-f", "raw", "--size", "1M"],
    ["-O", "bogus", "--size", "1G"], ["-O", "bogus", "data.qcow2"],
    ["--output=xml", "--size", "1G"], ["--size", "1G", "--output=yaml", "--size", "x"],
    ["--size", "-1"], ["--size", "abc"], ["--size", "1Q"], ["--size", "1.5"], ["--size", ""],
    ["--size", "8E"], ["--size", "9223372036854775808"], ["--size", "1M "],
    ["-O", "qcow2", "-o", "foo=1", "--size", "1G"], ["-O", "qcow2", "-o", "foo", "--size", "1G"],
    ["-O", "qcow2", "-o", "help", "--size", "1G"], ["-O", "raw", "-o", "?", "--size", "1G"],
    ["-O", "qcow2", "-o", "=", "--size", "1M"], ["-O", "qcow2", "-o", "a=b,", "--size", "1M"],
    ["-O", "qcow2", "-o", ",a=b", "--size", "1M"], ["-O", "qcow2", "-o", "", "--size", "1M"],
    ["-O", "raw", "-o", "backing_file=x", "--size", "1M"],
    ["-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
    ["-O", "qcow2", "-o", "version=v3", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster-size=4k", "--size", "1M"],
    ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=-1", "--size", "1G"],
    ["-O", "qcow2", "-o", "size=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on,compat=0.10", "--size", "1M"],
    ["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1M"],
    ["-O", "qcow2", "-o", "extended_l2=1", "--size", "1M"],
    ["-O", "raw", "-o", "nocow=2", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
    ["-O", "qcow2", "-o", "cluster_size=512,size=1T", "data.qcow2"],
    ["-O", "qcow2", "--size", "9223372036854775807"],
    ["-l", "snap", "base.raw"], ["-l", "snapshot.id=1", "base.raw"],
    ["--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=top.qcow2"],
    ["-O", "qcow2", "-o", "preallocation=bogus", "data.qcow2"],
]


def test_refusals(images: Path) -> None:
    _compare_all(REFUSED, images)


def test_open_errors(images: Path) -> None:
    """A source that cannot be opened: exit 1 and qemu's reason, in corefmt's
    words for where (corefmt's open errors name the file their own way)."""
    for case, reason in ((["-f", "qcow2", "base.raw"], "Image is not in qcow2 format"),
                         (["missing.qcow2"], "No such file or directory")):
        want = _qemu(case, images)
        got = _corefmt_in_process(case, images)
        assert (got[0], got[1]) == (want[0], want[1]) == (1, ""), case
        assert reason in want[2] and reason in got[2], (want, got)
        assert got[2].startswith("corefmt: ") and got[2].count("\n") == 1, got


def test_refusals_exit_1_nothing_on_stdout(images: Path) -> None:
    for case in REFUSED[:12]:
        status, out, err = _corefmt_in_process(case, images)
        assert (status, out) == (1, ""), case
        assert err.startswith("corefmt: "), (case, err)


# -- the real command line --------------------------------------------------------------
def test_subprocess_matches_qemu_img(images: Path, tmp_path: Path) -> None:
    """A few cases through `python -m corefmt.cli.main`, as a user runs it."""
    import sys

    corefmt = runner([sys.executable, "-m", "corefmt.cli.main"], images)
    qemu = runner([QEMU_IMG or "qemu-img"], images)
    cases = [["measure", "-O", "qcow2", "top.qcow2"],
             ["measure", "--output=json", "-O", "qcow2", "bitmaps.qcow2"],
             ["measure", "--size", "1G", "-O", "qcow2", "-o", "cluster_size=2M"],
             ["measure", "--size", "abc"],
             ["measure", "-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
             ["measure"]]
    results = run_parallel({("c", i): (lambda case=case: corefmt(*case))
                            for i, case in enumerate(cases)}
                           | {("q", i): (lambda case=case: qemu(*case))
                              for i, case in enumerate(cases)})
    for index, case in enumerate(cases):
        got, want = results["c", index], results["q", index]
        assert (got.returncode, got.stdout, got.stderr) == (
            want.returncode, want.stdout, _qemu_stderr(want.stderr)), case

"""Bad input to the command line: one 'corefmt: ' line on stderr, a non-zero
exit status, and no file changed or created. Also compare's exit statuses
and convert -p."""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from corefmt_cli_helpers import (
    assert_one_error_line,
    commands,
    directory_state,
    run_parallel,
    runner,
)

import corefmt as corefmt_api

MiB = 1024 * 1024


def _image(path: Path, size: str, *writes: tuple[int, int, int]) -> None:
    """A sparse raw image with (offset, length, byte) runs written into it."""
    corefmt_api.create(str(path), "raw", size)
    with corefmt_api.open(str(path), "raw") as disk:
        for offset, length, byte in writes:
            disk.write(offset, bytes([byte]) * length)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """img.raw: 1 MiB, 0x5a in its first 64 KiB."""
    path = tmp_path_factory.mktemp("template") / "img.raw"
    _image(path, "1M", (0, 64 * 1024, 0x5A))
    return path


@pytest.fixture
def workdir(tmp_path, template) -> Path:
    """A directory holding a copy of the template img.raw."""
    shutil.copyfile(template, tmp_path / "img.raw")
    return tmp_path


#: (arguments, exit status, text the error line holds)
REFUSED = [
    # unknown format names
    (["create", "-f", "bogus", "new.raw", "1M"], 1, "Unknown file format 'bogus'"),
    (["convert", "-O", "bogus", "img.raw", "new.raw"], 1, "Unknown file format 'bogus'"),
    (["info", "-f", "bogus", "img.raw"], 1, "Unknown file format 'bogus'"),
    (["io", "-f", "bogus", "-c", "write 0 512", "img.raw"], 1, "Unknown file format 'bogus'"),
    (["compare", "-F", "bogus", "img.raw", "img.raw"], 2, "Unknown file format 'bogus'"),
    # bad -o options
    (["create", "-o", "foo=1", "new.raw", "1M"], 1, "Invalid parameter 'foo'"),
    (["create", "-o", "preallocation=bogus", "new.raw", "1M"], 1, "preallocation"),
    (["create", "-o", "foo", "new.raw", "1M"], 1, "Invalid option 'foo'"),
    (["create", "-o", "preallocation=full,size=-1", "new.raw"], 1, "must not be negative"),
    (["convert", "-o", "preallocation=bogus", "img.raw", "new.raw"], 1, "preallocation"),
    (["convert", "-o", "foo", "img.raw", "new.raw"], 1, "Invalid option 'foo'"),
    # sizes: negative, not numbers, bad suffixes
    (["create", "new.raw", "--", "-1M"], 1, "must not be negative"),
    (["create", "new.raw", "-1M"], 1, "-1M"),
    (["create", "new.raw", "abc"], 1, "Invalid image size 'abc'"),
    (["create", "new.raw", "1Q"], 1, "Invalid image size '1Q'"),
    (["create", "new.raw", "1.5"], 1, "Invalid image size '1.5'"),
    (["create", "new.raw", ""], 1, "Invalid image size"),
    (["create", "new.raw"], 1, "size"),
    (["convert", "-S", "abc", "img.raw", "new.raw"], 1, "Invalid sparse size 'abc'"),
    (["convert", "-S", "100", "img.raw", "new.raw"], 1, "sparse size"),
    (["convert", "-m", "0", "img.raw", "new.raw"], 1, "between 1 and 16"),
    (["convert", "-m", "1000", "img.raw", "new.raw"], 1, "between 1 and 16"),
    (["convert", "-m", "1" + "0" * 400, "img.raw", "new.raw"], 1, "between 1 and 16"),
    # numbers too large for any field: a clear line, never a traceback
    (["create", "new.raw", "1" + "0" * 400], 1, "Invalid image size"),
    (["convert", "-S", "1" + "0" * 400, "img.raw", "new.raw"], 1, "Invalid sparse size"),
    (["create", "-o", "extent_size_hint=1" + "0" * 400, "new.raw", "1M"], 1,
     "extent_size_hint"),
    # paths that do not exist
    (["info", "missing.raw"], 1, "Could not open 'missing.raw': No such file or directory"),
    (["map", "missing.raw"], 1, "Could not open 'missing.raw'"),
    (["convert", "missing.raw", "new.raw"], 1, "Could not open 'missing.raw'"),
    (["convert", "img.raw", "no/such/dir/new.raw"], 1, "No such file or directory"),
    (["compare", "missing.raw", "img.raw"], 2, "Could not open 'missing.raw'"),
    (["compare", "img.raw", "missing.raw"], 2, "Could not open 'missing.raw'"),
    (["io", "-c", "read 0 512", "missing.raw"], 1, "Could not open 'missing.raw'"),
    # converting an image onto itself would truncate it before copying a byte
    (["convert", "img.raw", "img.raw"], 1, "img.raw"),
    # command-line syntax
    (["compare", "img.raw"], 2, "compare: the following arguments are required"),
    (["info", "--output=xml", "img.raw"], 1, "info: argument --output"),
    (["frobnicate", "img.raw"], 1, "invalid choice: 'frobnicate'"),
    ([], 1, "required: verb"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, template) -> dict[int, tuple]:
    """Every REFUSED command, each in its own copy of the directory:
    (result, directory state before, directory state after)."""
    top = tmp_path_factory.mktemp("refused")

    def one(index: int, args: list[str]) -> tuple:
        directory = top / f"case{index}"
        directory.mkdir()
        shutil.copyfile(template, directory / "img.raw")
        before = directory_state(directory)
        result = runner([sys.executable, "-m", "corefmt.cli.main"], directory)(*args)
        return result, before, directory_state(directory)

    return run_parallel({index: functools.partial(one, index, args)
                         for index, (args, _, _) in enumerate(REFUSED)})


@pytest.mark.parametrize(("index", "status", "text"),
                         [(index, status, text) for index, (_, status, text) in enumerate(REFUSED)],
                         ids=[" ".join(args) or "no-arguments" for args, _, _ in REFUSED])
def test_refused_without_touching_files(refusals, index, status, text):
    result, before, after = refusals[index]
    line = assert_one_error_line(result, status, text)
    assert "Traceback" not in line
    assert not line.startswith("corefmt: corefmt")
    assert after == before


def test_read_only_open_refuses_writes(workdir, corefmt):
    before = directory_state(workdir)
    result = corefmt("io", "-r", "-c", "write -P 1 0 512", "img.raw")
    assert_one_error_line(result, 1, "Block node is read-only")
    assert result.stderr == "corefmt: Block node is read-only\n"

    every = corefmt("io", "-r", *commands("write -z 0 512", "discard 0 512", "truncate 2M",
                                          "read -P 0x5a 0 64k"), "img.raw")
    assert every.returncode == 1
    assert every.stderr.splitlines() == ["corefmt: Block node is read-only"] * 3
    assert "read 65536/65536 bytes at offset 0" in every.stdout.splitlines()
    assert directory_state(workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a mode 0444 file anyway")
def test_read_only_file(workdir, corefmt):
    image = workdir / "img.raw"
    image.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = directory_state(workdir)
    result = corefmt("io", "-c", "write -P 1 0 512", "img.raw")
    assert_one_error_line(result, 1, "Could not open 'img.raw': Permission denied")
    converted = corefmt("convert", "-O", "raw", "-o", "preallocation=full", "img.raw",
                        "img.raw")
    assert_one_error_line(converted, 1)
    reading = corefmt("io", "-r", "-c", "read -P 0x5a 0 64k", "img.raw")
    assert reading.returncode == 0, reading.stdout
    assert directory_state(workdir) == before


def test_io_past_the_end_fails_and_changes_nothing(workdir, corefmt):
    before = directory_state(workdir)
    script = ("write 1M 512", "write -P 1 1048575 2", "write -z 1M 512", "discard 1M 512",
              "read 1M 512", "read 1048064 1024", "write -P 1 2M 0")
    result = corefmt("io", "-f", "raw", *commands(*script), "img.raw")
    assert result.returncode == 1
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"{command.split()[0]} failed: Input/output error" for command in script
    ]
    assert directory_state(workdir) == before
    # A good command in the same run still runs; the run still fails.
    mixed = corefmt("io", "-f", "raw", *commands("read 1M 1", "read -P 0x5a 0 512"),
                    "img.raw")
    assert mixed.returncode == 1
    assert mixed.stdout.splitlines()[:2] == ["read failed: Input/output error",
                                             "read 512/512 bytes at offset 0"]


@pytest.fixture(scope="module")
def compare_images(tmp_path_factory) -> Path:
    """a: 1 MiB with data; b: a plus a zero tail; c: b with data in the tail;
    d: a with one byte changed; e: b with every block allocated."""
    directory = tmp_path_factory.mktemp("compare")
    _image(directory / "a.raw", "1M", (0, 4096, 1))
    _image(directory / "b.raw", "2M", (0, 4096, 1))
    _image(directory / "c.raw", "2M", (0, 4096, 1), (1536 * 1024, 512, 2))
    _image(directory / "d.raw", "1M", (0, 4096, 1), (1000, 1, 9))
    (directory / "e.raw").write_bytes((directory / "b.raw").read_bytes())
    return directory


#: (compare arguments, exit status, stdout): qemu-img compare's behaviour.
COMPARES = [
    (["a.raw", "a.raw"], 0, "Images are identical.\n"),
    (["a.raw", "d.raw"], 1, "Content mismatch at offset 512!\n"),
    (["-q", "a.raw", "d.raw"], 1, ""),
    (["a.raw", "b.raw"], 0, "Warning: Image size mismatch!\nImages are identical.\n"),
    (["b.raw", "a.raw"], 0, "Warning: Image size mismatch!\nImages are identical.\n"),
    (["a.raw", "c.raw"], 1, "Warning: Image size mismatch!\nContent mismatch at offset 1572864!\n"),
    (["c.raw", "a.raw"], 1, "Warning: Image size mismatch!\nContent mismatch at offset 1572864!\n"),
    # a difference inside the common part: no size warning (qemu checks that part first)
    (["d.raw", "c.raw"], 1, "Content mismatch at offset 512!\n"),
    (["b.raw", "e.raw"], 0, "Images are identical.\n"),
    (["-s", "a.raw", "b.raw"], 1, "Strict mode: Image size mismatch!\n"),
    (["-s", "a.raw", "a.raw"], 0, "Images are identical.\n"),
    (["-s", "a.raw", "d.raw"], 1, "Content mismatch at offset 512!\n"),
    (["-s", "b.raw", "c.raw"], 1, "Strict mode: Offset 4096 block status mismatch!\n"),
    (["-s", "b.raw", "e.raw"], 1, "Strict mode: Offset 0 block status mismatch!\n"),
    (["-q", "-s", "a.raw", "b.raw"], 1, ""),
]


@pytest.fixture(scope="module")
def compare_results(compare_images) -> dict[int, object]:
    corefmt = runner([sys.executable, "-m", "corefmt.cli.main"], compare_images)
    before = directory_state(compare_images)
    results = run_parallel({
        index: functools.partial(corefmt, "compare", "-f", "raw", "-F", "raw", *args)
        for index, (args, _, _) in enumerate(COMPARES)})
    assert directory_state(compare_images) == before
    return results


@pytest.mark.parametrize(("index", "status", "output"),
                         [(index, status, output)
                          for index, (_, status, output) in enumerate(COMPARES)],
                         ids=[" ".join(args) for args, _, _ in COMPARES])
def test_compare_exit_status(compare_results, index, status, output):
    result = compare_results[index]
    assert (result.returncode, result.stdout, result.stderr) == (status, output, "")


@pytest.mark.interop
@pytest.mark.parametrize(("args", "status", "output"), COMPARES,
                         ids=[" ".join(args) for args, _, _ in COMPARES])
def test_compare_table_is_qemu_img_compare(compare_images, qemu_img, args, status, output):
    result = qemu_img("compare", "-f", "raw", "-F", "raw", *args, cwd=compare_images)
    assert (result.returncode, result.stdout) == (status, output), result.stderr


def test_compare_error_exit_status(compare_images, corefmt):
    result = corefmt("compare", "a.raw", "nothing.raw", cwd=compare_images)
    assert_one_error_line(result, 2, "nothing.raw")


def test_convert_progress(workdir, corefmt):
    image = workdir / "img.raw"
    with corefmt_api.open(str(image), "raw") as disk:
        disk.write(768 * 1024, b"\x33" * 256 * 1024)
    before = directory_state(workdir)
    result = corefmt("convert", "-p", "-O", "raw", "img.raw", "out.raw")
    assert result.returncode == 0, result.stderr
    # qemu-img's line, which scripts parse: "    (NN.NN/100%)\r" on stdout (read
    # here as text, so each \r arrives as a line end).
    assert re.fullmatch(r"(    \(\d{1,3}\.\d\d/100%\)\n)+", result.stdout), result.stdout
    assert result.stdout.startswith("    (0.00/100%)\n")
    assert result.stdout.endswith("    (100.00/100%)\n")
    assert result.stderr == ""
    assert (workdir / "out.raw").read_bytes() == image.read_bytes()
    assert {name: state for name, state in directory_state(workdir).items()
            if name != "out.raw"} == before
    same = corefmt("compare", "img.raw", "out.raw")
    assert (same.returncode, same.stdout) == (0, "Images are identical.\n")

    quiet = corefmt("convert", "-p", "-q", "img.raw", "quiet.raw")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert (workdir / "quiet.raw").read_bytes() == image.read_bytes()

    failed = corefmt("convert", "-p", "missing.raw", "never.raw")
    assert failed.stdout == "    (0.00/100%)\n"  # qemu-img's too: "\r\n" read as text
    assert_one_error_line(subprocess.CompletedProcess(failed.args, failed.returncode, "",
                                                      failed.stderr), 1, "missing.raw")
    assert not (workdir / "never.raw").exists()

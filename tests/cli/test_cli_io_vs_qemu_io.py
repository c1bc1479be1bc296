"""`corefmt io` against `qemu-io` (the reference): the same -c commands on two
copies of one image give the same stdout (timing lines aside), the same
stderr (program name aside), the same exit status and the same file."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import pytest
from corefmt_cli_helpers import (
    QEMU_IMG,
    QEMU_IO,
    commands,
    io_stderr,
    io_stdout,
    run_parallel,
    runner,
)

pytestmark = pytest.mark.interop


class Outcome:
    def __init__(self, result, image: Path):
        self.returncode = result.returncode
        self.stdout = io_stdout(result.stdout)
        self.stderr = io_stderr(result.stderr)
        self.raw_stdout = result.stdout
        self.content = image.read_bytes()

    def key(self) -> tuple:
        return self.returncode, self.stdout, self.stderr


def _make_base(directory: Path) -> Path:
    """A 1 MiB raw image with some data, made by qemu."""
    qemu_img = runner([QEMU_IMG or "qemu-img"], directory)
    qemu_io = runner([QEMU_IO or "qemu-io"], directory)
    assert qemu_img("create", "-f", "raw", "base.raw", "1M").returncode == 0
    made = qemu_io("-f", "raw", *commands("write -P 0x11 0 64k", "write -P 0x22 512k 4k"),
                   "base.raw")
    assert made.returncode == 0, made.stderr
    return directory / "base.raw"


def run_both(directory: Path, image: Path, *args: str) -> tuple[Outcome, Outcome]:
    """The same qemu-io arguments through qemu-io and corefmt io, each on its own copy."""
    theirs, ours = directory / "theirs.raw", directory / "ours.raw"
    shutil.copyfile(image, theirs)
    shutil.copyfile(image, ours)
    qemu = Outcome(runner([QEMU_IO or "qemu-io"], directory)(*args, theirs.name), theirs)
    mine = Outcome(runner([sys.executable, "-m", "corefmt.cli.main", "io"], directory)(
        *args, ours.name), ours)
    return qemu, mine


@pytest.fixture
def base(tmp_path) -> Path:
    return _make_base(tmp_path)


@pytest.fixture
def both(tmp_path, base):
    """both(*io_args, image=base) -> (qemu-io outcome, corefmt io outcome)."""

    def run(*args: str, image: Path = base) -> tuple[Outcome, Outcome]:
        return run_both(tmp_path, image, *args)

    return run


SCRIPT = (
    "write -P 0xab 0 64k",
    "read -P 0xab 0 64k",
    "read -P 0xcd 0 64k",          # pattern mismatch
    "write -z 64k 64k",
    "read -P 0 64k 64k",
    "discard 128k 64k",
    "read 1M 512",                 # past the end
    "read 1020k 8k",               # across the end
    "write -P 1 1048575 2",        # across the end
    "read abc 512",                # not a number
    "read 0 12x",                  # bad suffix
    "write -P 0x100 0 1",          # not a byte
    "length",
    "map",
    "alloc 0 1M",
    "read -v 0 32",
    "write -P 0x41 512 20",
    "read -v 500 40",
    "write -q -P 7 900k 3k",
    "read -q -P 7 900k 3k",
    "read -P 0x22 -s 512 -l 1k 511k 2k",
    "info",
    "flush",
    "truncate 2M",
    "length",
    "map",
    "read -v 2097136 16",
    "r -P 0 1M 4k",
    "w -z 0 512",
)


def test_same_script_same_output(both):
    qemu, mine = both("-f", "raw", *commands(*SCRIPT))
    assert qemu.returncode == 1  # some commands fail on purpose
    assert mine.key() == qemu.key()
    assert mine.content == qemu.content
    # The comparison covers what it should.
    for expected in ("Pattern verification failed at offset 0, 65536 bytes",
                     "read failed: Input/output error", "write failed: Input/output error",
                     "Parsing error: non-numeric argument, or extraneous/unrecognized "
                     "suffix -- abc",
                     "0x100 is not a valid pattern byte",
                     "1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)",
                     "000001f4:  ab ab ab ab ab ab ab ab ab ab ab ab 41 41 41 41  ............AAAA",
                     "001ffff0:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................",
                     "2 MiB"):
        assert expected in mine.stdout.splitlines(), expected
    assert " ops; " in mine.raw_stdout  # the timing lines exist, and were left out


#: One command at a time: (command, exit status qemu-io 7.2 gives).
SINGLE = [
    ("write -P 0xab 0 64k", 0),
    ("write -P 1 2M 0", 1),
    ("write -z 1M 512", 1),
    ("write -zu 4k 8k", 0),
    ("write -u 0 512", 1),
    ("write -z -P 1 0 512", 1),
    ("write -n 0 512", 1),
    ("write 0 3G", 1),
    ("write -c 0 512", 1),
    ("write -b 1 512", 1),
    ("write -P 1 0 -q", 1),
    ("write 0 512 -q -P 3", 0),
    ("write -P 1 0", 1),
    ("write -r 0 1", 1),
    ("write -P", 1),
    ("read -P 0x11 0 64k", 0),
    ("read -P 0x11 0 65k", 1),
    ("read -P 0x11 -s 1k -l 2k 0 4k", 0),
    ("read -P 0 -s 1k 0 512", 1),
    ("read -l 512 0 512", 1),
    ("read 1048064 1024", 1),
    ("read 1M 0", 0),
    ("read 0 0x1k", 0),
    ("read 0 1.5", 1),
    ("read 0 -1", 1),
    ("read 0 1 -P", 1),
    ("read -vq 0 16", 0),
    ("read 0 9999999999999999999", 1),
    ("read 0 3G", 1),
    ("discard 0 64k", 0),
    ("discard 1048575 1", 0),
    ("discard 1M 512", 1),
    ("alloc 1048064 1024", 0),
    ("alloc 2M", 0),
    ("alloc", 1),
    ("map", 0),
    ("map 1", 1),
    ("info", 0),
    ("truncate 512k", 0),
    ("truncate -m falloc 2M", 0),
    ("truncate -m falloc 512k", 1),
    ("truncate -m bogus 2M", 1),
    ("truncate abc", 1),
    ("frobnicate 0 1", 1),
]


@pytest.fixture(scope="module")
def single_outcomes(tmp_path_factory) -> tuple[Path, dict[str, tuple[Outcome, Outcome]]]:
    """Every SINGLE command through both tools, each on its own copies."""
    if not (QEMU_IMG and QEMU_IO):
        pytest.skip("qemu-img/qemu-io not installed")
    top = tmp_path_factory.mktemp("single")
    base = _make_base(top)

    def one(index: int, command: str) -> tuple[Outcome, Outcome]:
        directory = top / f"c{index}"
        directory.mkdir()
        return run_both(directory, base, "-f", "raw", "-c", command)

    return base, run_parallel({command: functools.partial(one, index, command)
                               for index, (command, _status) in enumerate(SINGLE)})


@pytest.mark.parametrize(("command", "status"), SINGLE, ids=[c for c, _ in SINGLE])
def test_single_command(single_outcomes, command, status):
    base, outcomes = single_outcomes
    qemu, mine = outcomes[command]
    assert qemu.returncode == status, (qemu.stdout, qemu.stderr)
    assert mine.key() == qemu.key()
    assert mine.content == qemu.content
    if status:
        assert mine.content == base.read_bytes()  # a failed command changes nothing


def test_read_only_image(both, base):
    script = ("write -P 1 0 512", "write -z 0 512", "discard 0 512", "truncate 2M",
              "read -P 0x11 0 4k", "flush", "length")
    qemu, mine = both("-r", "-f", "raw", *commands(*script))
    assert qemu.returncode == 1
    assert mine.key() == qemu.key()
    assert mine.stderr.splitlines() == ["<prog>: Block node is read-only"] * 4
    assert mine.content == base.read_bytes()


def test_hexdump_of_every_byte_value(tmp_path, both):
    image = tmp_path / "bytes.raw"
    image.write_bytes(bytes(range(256)) * 4)
    qemu, mine = both("-r", "-f", "raw", *commands("read -v 0 256", "read -v 3 29",
                                                   "read -v 1000 24"), image=image)
    assert qemu.returncode == 0
    assert mine.key() == qemu.key()
    assert "00000040:  40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f  .ABCDEFGHIJKLMNO" \
        in mine.stdout.splitlines()
    assert "000003f8:  f8 f9 fa fb fc fd fe ff  ........" in mine.stdout.splitlines()


NUMBERS = ("0x200", "0X200", "1.5k", "1.0", "010", "1K", "1kb", "1e3", "+512", "512b", "0.5k",
           "1.00000001k", "1.333k", "9223372036854775807", "9223372036854775808",
           "18446744073709551616", "99999999999999999999k", "8E", "7E", "1.5E", "0x1k", "0x",
           ".", "1.k", ".5k", "1,5k", "1KiB", "1.5b", "0.0", "00", "1m", "1.25m", "0x1.5",
           "1.", "1.e", "1.5e3k", "00x10", "0.0009765625k", "1+", "1k1")


def test_number_syntax(both):
    script = [f"read -q 0 {number}" for number in NUMBERS]
    script += [f"alloc {number}" for number in NUMBERS]
    script += [f"read -q -P {pattern} 0 1" for pattern in ("0", "0x0", "00", "0377", "08",
                                                           "+0", "-0", "0x", "256", "1a")]
    qemu, mine = both("-f", "raw", *commands(*script))
    assert qemu.returncode == 1
    assert mine.key() == qemu.key()
    assert "Parsing error: argument too large -- 8E" in mine.stdout.splitlines()
    assert "<prog>: warning: Using a multiplier suffix on hex numbers is deprecated: 0x1k" \
        in mine.stderr.splitlines()

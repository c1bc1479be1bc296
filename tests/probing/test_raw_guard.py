"""A probed raw image (no format given) opened read-write prints qemu's
warning and refuses any change of its first bytes after which it would probe
as another format: qemu's EPERM, so `corefmt io` prints what qemu-io prints
and nothing is written. Naming the format (-f raw) lifts both."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import StorageError
from corefmt.known_formats import ProbedRawWriteError, UnsupportedFormatError, identify
from tests.probing.images import QEMU_IMG, SECTOR, qcow2_header

MiB = 1 << 20
WARNING = ("WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
           "         Automatically detecting the format is dangerous for raw images, write "
           "operations on block 0 will be restricted.\n"
           "         Specify the 'raw' format explicitly to remove the restrictions.\n")
#: qemu-io's rate line, which holds timings.
RATE_LINE = re.compile(r"^.* ops; .*$\n?", re.M)
#: The first bytes of files that are raw now, but one small change from another format.
ALMOST_QCOW2 = b"QFI\xfb"                                  # version 0
ALMOST_QCOW2_MAGIC = b"\0FI\xfb\0\0\0\x02"                # the magic's first byte missing
ALMOST_LUKS = b"LUKS\xba\xbe\x05\x01"                       # version 0x0501, not 1
ALMOST_PARALLELS = b"WithoutFreeSpace\x02\0\0\x05"          # version 0x05000002, not 2


def raw_image(path: Path, head: bytes = b"", size: int = MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + bytes(size - len(head)))
    return path


@pytest.fixture
def header_file(tmp_path: Path) -> Path:
    """A qcow2 header whose backing file is /etc/passwd, built here."""
    path = tmp_path / "header.bin"
    path.write_bytes(qcow2_header(b"/etc/passwd"))
    return path


# -- the warning ---------------------------------------------------------------------------
def test_the_warning_is_qemus_and_only_for_a_probed_writable_image(tmp_path, cli, qemu_io):
    raw_image(tmp_path / "disk.raw")
    for args, warned in ((("-c", "read 0 512"), True), (("-r", "-c", "read 0 512"), False),
                         (("-f", "raw", "-c", "read 0 512"), False)):
        theirs, ours = qemu_io(*args, "disk.raw"), cli("io", *args, "disk.raw")
        assert ours.stderr == theirs.stderr == (WARNING.format("disk.raw") if warned else "")
        assert (ours.returncode, RATE_LINE.sub("", ours.stdout)) == (
            theirs.returncode, RATE_LINE.sub("", theirs.stdout))
    info = cli("info", "disk.raw")  # read-only, as qemu-img info: no warning
    assert (info.returncode, info.stderr) == (0, "")


def test_the_api_warns_on_stderr_as_qemu_does(tmp_path, capfd):
    path = raw_image(tmp_path / "disk.raw")
    with corefmt.open(str(path)):
        pass
    assert capfd.readouterr().err == WARNING.format(path)
    with corefmt.open(str(path), read_only=True), corefmt.open(str(path), "raw"):
        pass
    assert capfd.readouterr().err == ""


# -- the guard, against qemu-io -----------------------------------------------------------
GUARD_CASES = {
    # name: (first bytes, qemu-io arguments, refused)
    "qcow2-header-with-backing": (b"", ("-c", "write -s ../header.bin 0 512"), True),
    "unaligned-completes-version": (ALMOST_QCOW2, ("-c", "write -P 3 7 1"), True),
    "unaligned-completes-magic": (ALMOST_QCOW2_MAGIC, ("-c", "write -P 0x51 0 1"), True),
    "partial-zeroing-completes-luks": (ALMOST_LUKS, ("-c", "write -z 6 1"), True),
    "zeroing-sector-0-is-raw": (ALMOST_LUKS, ("-c", "write -z 0 512"), False),
    "zero-pattern-is-raw": (ALMOST_QCOW2, ("-c", "write -P 0 0 512"), False),
    "ordinary-data": (b"", ("-c", "write -P 0x41 0 4k"), False),
    "header-in-sector-1": (b"", ("-c", "write -s ../header.bin 512 512"), False),
    "later-writes-still-run": (b"", ("-c", "write -s ../header.bin 0 512",
                                     "-c", "write -P 0x42 64k 4k"), True),
    "f-raw-allows-it": (b"", ("-f", "raw", "-c", "write -s ../header.bin 0 512"), False),
}


@pytest.mark.parametrize("case", GUARD_CASES)
def test_corefmt_io_guards_as_qemu_io(case, tmp_path, header_file, cli, qemu_io):
    head, args, refused = GUARD_CASES[case]
    # The same name in two directories (the warning names the file); not "corefmt/":
    # a directory of that name in the working directory would shadow the package.
    theirs_dir, ours_dir = tmp_path / "theirs", tmp_path / "ours"
    theirs = raw_image(theirs_dir / "disk.raw", head)
    ours = raw_image(ours_dir / "disk.raw", head)
    before = ours.read_bytes()
    expected = qemu_io(*args, "disk.raw", cwd=theirs_dir)
    result = cli("io", *args, "disk.raw", cwd=ours_dir)
    assert (result.returncode, RATE_LINE.sub("", result.stdout), result.stderr) == (
        expected.returncode, RATE_LINE.sub("", expected.stdout), expected.stderr)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ("write failed: Operation not permitted" in result.stdout) == refused
    if refused:
        assert result.returncode == 1
        assert ours.read_bytes()[:SECTOR] == before[:SECTOR]


def test_where_qemu_lets_a_format_through_corefmt_does_not(tmp_path, cli, qemu_io):
    """qemu punches a single byte out of sector 0 on `discard 6 1` and does not
    guard truncation: both can complete a header. corefmt drops sub-sector
    discards of a probed image (whole-sector requests, as qemu's own alignment
    intends) and refuses the truncation."""
    for head, command, fmt in ((ALMOST_LUKS, "discard 6 1", "luks"),
                               (ALMOST_PARALLELS, "truncate 19", "parallels")):
        theirs = raw_image(tmp_path / "theirs" / "disk.raw", head)
        ours = raw_image(tmp_path / "ours" / "disk.raw", head)
        assert qemu_io("-c", command, theirs).returncode == 0
        assert identify(theirs.read_bytes()).name == fmt  # qemu's own rules say fmt now
        cli("io", "-c", command, ours)
        assert ours.read_bytes() == head + bytes(MiB - len(head))
        info = cli("info", "--output=json", ours)
        assert json.loads(info.stdout)["format"] == "raw"


# -- the guard through the API ----------------------------------------------------------
def test_the_api_refuses_a_qcow2_header_with_a_backing_file(tmp_path):
    path = raw_image(tmp_path / "disk.raw", b"guest data")
    header = qcow2_header(b"/etc/passwd")
    before = path.read_bytes()
    with corefmt.open(str(path)) as disk:
        with pytest.raises(ProbedRawWriteError) as refused:
            disk.write(0, header)
        assert isinstance(refused.value, StorageError)
        assert refused.value.errno == errno.EPERM and refused.value.format_name == "qcow2"
        assert str(refused.value) == (
            f"{path}: write refused: the image was probed as raw and this would make it "
            "probe as qcow2 (open it with format raw, -f raw, to allow it)")
        # unaligned: each piece is harmless alone, the write completing the header is not
        disk.write(8, header[8:])
        with pytest.raises(ProbedRawWriteError):
            disk.write(0, header[:8])
        disk.write(4, header[4:8])
        disk.write(0, header[:1])
        with pytest.raises(ProbedRawWriteError):
            disk.write(1, header[1:4])
    assert path.read_bytes() == header[:1] + before[1:4] + header[4:] + before[SECTOR:]
    with corefmt.open(str(path), read_only=True) as disk:
        assert disk.format_name == "raw"


def test_with_format_raw_the_write_is_allowed_and_the_image_is_then_a_qcow2(tmp_path,
                                                                             qemu_img):
    path = raw_image(tmp_path / "disk.raw")
    with corefmt.open(str(path), "raw") as disk:
        disk.write(0, qcow2_header(b"/etc/passwd"))
    with corefmt.open(str(path), read_only=True) as disk:  # probed: now a qcow2 over a host file
        assert disk.format_name == "qcow2"
        assert disk.layer().image.backing.path == "/etc/passwd"
    if QEMU_IMG:  # what the guard prevents: the next probing open reads a host file
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        assert (info["format"], info["backing-filename"]) == ("qcow2", "/etc/passwd")


def test_zeroes_discard_and_truncate_are_guarded_too(tmp_path):
    luks = raw_image(tmp_path / "luks.raw", ALMOST_LUKS)
    parallels = raw_image(tmp_path / "parallels.raw", ALMOST_PARALLELS)
    with corefmt.open(str(luks)) as disk:
        with pytest.raises(ProbedRawWriteError, match="probe as luks"):
            disk.write_zeroes(6, 1)
        with pytest.raises(ProbedRawWriteError, match="probe as luks"):
            disk.write(0, ALMOST_LUKS[:6] + b"\0")
        disk.discard(6, 1)  # sub-sector: nothing is discarded
        disk.write_zeroes(SECTOR, SECTOR)
    assert luks.read_bytes().startswith(ALMOST_LUKS)
    with corefmt.open(str(parallels)) as disk:
        with pytest.raises(ProbedRawWriteError, match=r"truncate refused.*parallels"):
            disk.truncate(19)
        disk.truncate(SECTOR)
        assert disk.virtual_size == SECTOR
    with corefmt.open(str(luks), "raw") as disk:  # not probed: nothing is guarded
        disk.write_zeroes(6, 1)
    with pytest.raises(UnsupportedFormatError, match="luks"):
        corefmt.open(str(luks), read_only=True)


def test_beyond_the_probed_bytes_anything_may_be_written(tmp_path):
    path = raw_image(tmp_path / "disk.raw")
    header = qcow2_header(b"/etc/passwd")
    with corefmt.open(str(path)) as disk:
        disk.write(SECTOR, header)
        disk.write(MiB - SECTOR, header)
    assert path.read_bytes()[SECTOR:2 * SECTOR] == header


def test_an_installed_plugins_format_is_guarded_too(blockmap, tmp_path):
    path = raw_image(tmp_path / "disk.raw")
    with corefmt.open(str(path)) as disk, \
            pytest.raises(ProbedRawWriteError, match="probe as blockmap"):
        disk.write(0, b"BLKMAP01" + bytes(SECTOR - 8))
    assert path.read_bytes() == bytes(MiB)

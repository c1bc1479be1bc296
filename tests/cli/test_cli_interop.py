"""corefmt's command line against qemu-img / qemu-io on the same raw files:
content written by one is read back by the other, and `map`, `info` and
`compare` print what qemu-img prints."""

from __future__ import annotations

import json

import pytest
from corefmt_cli_helpers import commands

import corefmt as corefmt_api

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
#: One script for both tools: data runs, a zeroed range inside data, the last byte.
WRITES = (
    "write -P 0xab 0 64k",
    "write -P 0x5a 1M 192k",
    "write -z 1056k 4k",
    "write -P 0x01 3M 512",
    "write -P 0xff 4194303 1",
)


def test_corefmt_written_and_converted_image_equals_qemu_built_one(tmp_path, corefmt, qemu_img,
                                                                   qemu_io):
    created = corefmt("create", "-f", "raw", "disk.raw", "4M")
    assert created.returncode == 0, created.stderr
    assert created.stdout == "Formatting 'disk.raw', fmt=raw size=4194304\n"
    written = corefmt("io", "-f", "raw", *commands(*WRITES), "disk.raw")
    assert written.returncode == 0, written.stdout + written.stderr
    converted = corefmt("convert", "-f", "raw", "-O", "raw", "disk.raw", "copy.raw")
    assert (converted.returncode, converted.stdout, converted.stderr) == (0, "", "")

    assert qemu_img("create", "-f", "raw", "expected.raw", "4M").returncode == 0
    assert qemu_io("-f", "raw", *commands(*WRITES), "expected.raw").returncode == 0

    for image in ("disk.raw", "copy.raw"):
        same = qemu_img("compare", "-f", "raw", "-F", "raw", image, "expected.raw")
        assert (same.returncode, same.stdout) == (0, "Images are identical.\n"), same.stderr
    assert (tmp_path / "copy.raw").read_bytes() == (tmp_path / "expected.raw").read_bytes()

    # One sector of different content: both tools see it, at the same offset.
    (tmp_path / "other.raw").write_bytes((tmp_path / "expected.raw").read_bytes())
    assert qemu_io("-f", "raw", "-c", "write -P 0x5b 1100k 512", "other.raw").returncode == 0
    differs = qemu_img("compare", "-f", "raw", "-F", "raw", "copy.raw", "other.raw")
    assert (differs.returncode, differs.stdout) == (1, "Content mismatch at offset 1126400!\n")
    ours = corefmt("compare", "-f", "raw", "-F", "raw", "copy.raw", "other.raw")
    assert (ours.returncode, ours.stdout, ours.stderr) == (differs.returncode, differs.stdout, "")


def test_qemu_made_image_reads_back_identically(tmp_path, corefmt, qemu_img, qemu_io):
    image = tmp_path / "q.raw"
    assert qemu_img("create", "-f", "raw", "q.raw", "2M").returncode == 0
    made = qemu_io("-f", "raw", *commands("write -P 0x11 0 4k", "write -P 0x22 4k 60k",
                                          "write -z 8k 4k", "write -P 0x33 1M 1M"), "q.raw")
    assert made.returncode == 0, made.stdout

    checks = ("read -P 0x11 0 4k", "read -P 0x22 4k 4k", "read -P 0 8k 4k",
              "read -P 0x22 12k 52k", "read -P 0 64k 960k", "read -P 0x33 1M 1M")
    read = corefmt("io", "-r", "-f", "raw", *commands(*checks), "q.raw")
    assert read.returncode == 0, read.stdout
    assert "Pattern verification failed" not in read.stdout
    assert [line for line in read.stdout.splitlines() if line.startswith("read ")] == [
        "read 4096/4096 bytes at offset 0", "read 4096/4096 bytes at offset 4096",
        "read 4096/4096 bytes at offset 8192", "read 53248/53248 bytes at offset 12288",
        "read 983040/983040 bytes at offset 65536", "read 1048576/1048576 bytes at offset 1048576",
    ]
    wrong = corefmt("io", "-r", "-f", "raw", "-c", "read -P 0x22 0 4k", "q.raw")
    assert wrong.returncode == 1
    assert wrong.stdout.splitlines()[0] == "Pattern verification failed at offset 0, 4096 bytes"

    # The Python API sees the file's bytes, whole and through the file view.
    with corefmt_api.open(str(image), "raw", read_only=True) as disk:
        assert disk.virtual_size == 2 * MiB
        assert disk.read(0, disk.virtual_size) == image.read_bytes()
        assert disk.read(8 * 1024, 4096) == bytes(4096)
        with disk.io() as view:
            view.seek(MiB - 2)
            assert view.read(4) == b"\0\0\x33\x33"

    # The same content written by corefmt compares equal, for both tools.
    assert corefmt("create", "-q", "c.raw", "2M").returncode == 0
    assert corefmt("io", *commands("write -P 0x11 0 4k", "write -P 0x22 4k 60k",
                                   "write -z 8k 4k", "write -P 0x33 1M 1M"),
                   "c.raw").returncode == 0
    ours = corefmt("compare", "q.raw", "c.raw")
    assert (ours.returncode, ours.stdout) == (0, "Images are identical.\n"), ours.stderr
    theirs = qemu_img("compare", "-f", "raw", "-F", "raw", "q.raw", "c.raw")
    assert (theirs.returncode, theirs.stdout) == (0, "Images are identical.\n")


#: (size, qemu-io commands) making sparse raw files of different shapes.
LAYOUTS = {
    # data, holes, a zeroed range inside data, and a hole up to the end
    "data-holes-zero-tailhole": ("4M", ("write -P 1 0 64k", "write -P 2 1M 128k",
                                        "write -z 1056k 32k", "write -P 3 3M 4k")),
    "unmapped-zeroes-in-data": ("1M", ("write -P 7 0 256k", "write -z -u 64k 64k",
                                       "write -z 192k 4k")),
    "discarded-range": ("1M", ("write -P 9 0 1M", "discard 256k 256k")),
    "all-hole": ("1M", ()),
    "data-at-the-end": ("1049088", ("write -P 1 1048576 512",)),
    "only-data": ("64k", ("write -P 5 0 64k",)),
    "empty-file": ("0", ()),
    # data across the 2 GiB boundary: map asks for status in 1 GiB windows
    "across-status-windows": ("3G", ("write -P 1 2047M 2M", "write -P 2 1G 4k")),
}


#: Layouts whose human-readable map is compared too.
HUMAN_TOO = ("data-holes-zero-tailhole", "across-status-windows", "empty-file")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_map_json_is_qemu_img_map_byte_for_byte(tmp_path, layout, corefmt, qemu_img, qemu_io):
    size, script = LAYOUTS[layout]
    assert qemu_img("create", "-f", "raw", "s.raw", size).returncode == 0
    if script:
        assert qemu_io("-f", "raw", *commands(*script), "s.raw").returncode == 0

    theirs = qemu_img("map", "-f", "raw", "--output=json", "s.raw")
    ours = corefmt("map", "-f", "raw", "--output=json", "s.raw")
    assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stderr) == (0, "")
    assert ours.stdout == theirs.stdout
    entries = json.loads(ours.stdout)
    assert entries == json.loads(theirs.stdout)
    assert sum(entry["length"] for entry in entries) == (tmp_path / "s.raw").stat().st_size

    if layout in HUMAN_TOO:
        human_theirs = qemu_img("map", "-f", "raw", "s.raw")
        human_ours = corefmt("map", "-f", "raw", "s.raw")
        assert (human_ours.returncode, human_ours.stdout) == (0, human_theirs.stdout)

    if layout == "data-holes-zero-tailhole":
        # The layout has what the test is about: a zero range between data runs
        # and a hole up to the end of the file.
        kinds = [(entry["data"], entry["zero"]) for entry in entries]
        assert kinds[:3] == [(True, False), (False, True), (True, False)]
        assert (False, True) in kinds[3:-1]
        assert kinds[-1] == (False, True)
        assert entries[-1]["start"] + entries[-1]["length"] == 4 * MiB


@pytest.mark.parametrize("how", ["qemu-sparse", "corefmt-sparse", "corefmt-full"])
def test_info_json_agrees_with_qemu_img(tmp_path, how, corefmt, qemu_img, qemu_io):
    if how == "qemu-sparse":
        assert qemu_img("create", "-f", "raw", "i.raw", "3M").returncode == 0
        assert qemu_io("-f", "raw", "-c", "write -P 1 1M 72k", "i.raw").returncode == 0
    else:
        option = "preallocation=full" if how == "corefmt-full" else "preallocation=off"
        assert corefmt("create", "-q", "-f", "raw", "-o", option, "i.raw", "3M").returncode == 0
        assert corefmt("io", "-c", "write -P 1 1M 72k", "i.raw").returncode == 0

    theirs = qemu_img("info", "-f", "raw", "--output=json", "i.raw")
    ours = corefmt("info", "-f", "raw", "--output=json", "i.raw")
    assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stderr) == (0, "")
    info, expected = json.loads(ours.stdout), json.loads(theirs.stdout)
    for key in ("virtual-size", "format", "actual-size", "filename"):
        assert info[key] == expected[key], key
    assert info["virtual-size"] == 3 * MiB
    assert info == expected
    if how == "corefmt-full":
        assert info["actual-size"] >= 3 * MiB
    else:
        assert info["actual-size"] < 3 * MiB

    if how == "qemu-sparse":
        human = corefmt("info", "-f", "raw", "i.raw")
        assert (human.returncode, human.stdout) == (0, qemu_img("info", "-f", "raw",
                                                                "i.raw").stdout)


def test_raw_size_not_a_sector_multiple(tmp_path, corefmt, qemu_img):
    """qemu rounds a raw file's size up to whole sectors; the tail reads as zeros."""
    (tmp_path / "odd.raw").write_bytes(b"x" * 1000)
    theirs = json.loads(qemu_img("info", "-f", "raw", "--output=json", "odd.raw").stdout)
    ours = json.loads(corefmt("info", "-f", "raw", "--output=json", "odd.raw").stdout)
    assert theirs["virtual-size"] == 1024
    assert ours["virtual-size"] == theirs["virtual-size"]
    tail = corefmt("io", "-f", "raw", "-r", "-c", "read -P 0 1000 24", "-c", "read -P 0x78 0 1000",
                   "odd.raw")
    assert tail.returncode == 0, tail.stdout

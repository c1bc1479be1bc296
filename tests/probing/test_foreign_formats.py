"""An image of a format corefmt has no plugin for is refused when its format is
probed (never read as raw: a qcow2 is not its container bytes); with -f raw
it is read as bytes. Each image is real: qemu-img made it, or qemu opens the
crafted bytes as that format (checked here too)."""

from __future__ import annotations

import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import corefmt
from corefmt import plugins
from corefmt.driver import PROBE_CERTAIN, PROBE_NO, FormatDriver, Image
from corefmt.errors import BackingChainError, CorefmtError, UnknownFormatError
from corefmt.extents import Extent
from corefmt.known_formats import UnsupportedFormatError, identify
from tests.probing.images import (
    ALL_CASES,
    CRAFTED,
    QEMU_IMG,
    SECTOR,
    dmg,
    format_of,
    make,
    qemu_made,
)

#: Subprocesses run at once by one test.
PARALLEL = 4
EXIT_ERROR, EXIT_COMPARE_ERROR = 1, 2


def refusal(path: str, fmt: str) -> str:
    return (f"'{path}': this is a {fmt} image; no corefmt plugin for {fmt} is installed "
            "(use -f raw to read its bytes)")


def directory_state(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file: size, mtime and content (a refusal creates and changes nothing)."""
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns,
                                               path.read_bytes())
            for path in sorted(directory.rglob("*")) if path.is_file()}


def sector_padded(data: bytes) -> bytes:
    """A file as raw shows it: its size rounded up to whole sectors, with zeros."""
    return data + bytes(-len(data) % SECTOR)


@pytest.fixture(scope="module")
def made_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """case -> the image, each made once (in a directory of its own: a flat
    vmdk has a second file) and copied for each test."""
    return {}


@pytest.fixture(params=ALL_CASES)
def foreign(request: pytest.FixtureRequest, made_images: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> tuple[str, Path]:
    case = request.param
    if format_of(case) in plugins.registry().formats:
        pytest.skip(f"corefmt has a {format_of(case)} plugin now (its own tests cover it)")
    if case not in CRAFTED and not QEMU_IMG:
        pytest.skip("qemu-img is needed to make this image")
    if case not in made_images:
        made_images[case] = make(tmp_path_factory.mktemp(case), case)
    original = made_images[case]
    for file in original.parent.iterdir():
        shutil.copy2(file, tmp_path / file.name)
    return format_of(case), tmp_path / original.name


def test_qemu_probes_the_same_format(foreign, qemu_img):
    fmt, path = foreign
    result = qemu_img("info", "--output=json", path.name)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == fmt


def test_every_verb_refuses_and_touches_nothing(foreign, cli, tmp_path):
    fmt, path = foreign
    before = directory_state(tmp_path)
    runs = {
        "info": ("info", path.name),
        "map": ("map", "--output=json", path.name),
        "convert": ("convert", "-O", "raw", path.name, "out.raw"),
        "io-read": ("io", "-c", "read 0 512", path.name),
        "io-write": ("io", "-c", "write -P 0x55 0 512", path.name),
        "compare": ("compare", path.name, path.name),
    }
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(runs, pool.map(lambda args: cli(*args), runs.values()),
                           strict=True))
    for verb, result in results.items():
        assert (result.returncode, result.stdout, result.stderr) == (
            EXIT_COMPARE_ERROR if verb == "compare" else EXIT_ERROR, "",
            f"corefmt: {refusal(path.name, fmt)}\n"), verb
    assert directory_state(tmp_path) == before


def test_the_api_refuses(foreign):
    fmt, path = foreign
    before = path.read_bytes()
    for read_only in (True, False):
        with pytest.raises(UnsupportedFormatError) as refused:
            corefmt.open(str(path), read_only=read_only)
        assert str(refused.value) == refusal(str(path), fmt)
        assert refused.value.format_name == fmt
        assert isinstance(refused.value, UnknownFormatError | CorefmtError)
    assert path.read_bytes() == before


def test_with_f_raw_it_is_read_as_its_bytes(foreign, cli, tmp_path):
    _, path = foreign
    content = path.read_bytes()
    info = cli("info", "-f", "raw", "--output=json", path.name)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["format"] == "raw"
    assert json.loads(info.stdout)["virtual-size"] == len(sector_padded(content))
    converted = cli("convert", "-f", "raw", "-O", "raw", path.name, "out.raw")
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "out.raw").read_bytes() == sector_padded(content)
    with corefmt.open(str(path), "raw", read_only=True) as disk:
        assert disk.format_name == "raw"
        assert disk.read(0, len(content)) == content
    assert path.read_bytes() == content


def test_a_fixed_vhd_is_raw_to_qemu_and_to_corefmt(tmp_path, qemu_img, cli):
    """qemu's vpc probe looks at the start only; a fixed VHD's footer is at the end."""
    made = qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", "fixed.vpc", "1M")
    assert made.returncode == 0, made.stderr
    theirs = qemu_img("info", "--output=json", "fixed.vpc")
    ours = cli("info", "--output=json", "fixed.vpc")
    assert json.loads(theirs.stdout)["format"] == json.loads(ours.stdout)["format"] == "raw"


def test_a_backing_file_of_an_unreadable_format_is_refused(blockmap, tmp_path):
    """A backing chain is not hidden: a qed backing (format not recorded) is
    refused, not shown as raw bytes under the overlay."""
    if not QEMU_IMG:
        pytest.skip("qemu-img is needed to make a qed")
    base = qemu_made(tmp_path, "qed")
    top = tmp_path / "top.bm"
    corefmt.create(str(top), "blockmap", "1M", backing=base.name, backing_format="raw")
    with top.open("r+b") as image:  # leave the backing format unrecorded: it is probed
        image.seek(24)
        image.write(struct.pack(">I", 0))
    with pytest.raises(BackingChainError, match=r"this is a qed image; no corefmt plugin"):
        corefmt.open(str(top), read_only=True)


# -- an installed plugin wins ---------------------------------------------------------------
#: qed's header: the virtual size is the u64 at byte 48 (little endian).
QED_SIZE_OFFSET = 48


class _QedImage(Image):
    def __init__(self, storage, context):
        super().__init__(storage, context)
        self.virtual_size = struct.unpack("<Q", storage.read(QED_SIZE_OFFSET, 8))[0]

    def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, data=False, zero=True, allocated=False)

    def readinto(self, offset, buf) -> None:
        raise AssertionError("nothing is allocated")

    def write(self, offset, data) -> None:
        raise AssertionError("read-only test driver")


class _QedDriver(FormatDriver):
    """A stand-in qed plugin (``accepts`` decides what its probe claims)."""

    name = "qed"

    def __init__(self, accepts: bool):
        self.accepts = accepts

    def probe(self, head: bytes, path: str | None) -> int:
        return PROBE_CERTAIN if self.accepts and head.startswith(b"QED\0") else PROBE_NO

    def create(self, storage, size, options, backing) -> None:
        raise AssertionError("not used")

    def open(self, storage, context) -> _QedImage:
        return _QedImage(storage, context)


class _Plugin:
    def __init__(self, driver: FormatDriver):
        self.driver = driver

    @corefmt.hookimpl
    def corefmt_register(self, registry) -> None:
        registry.add_format(self.driver)


@pytest.fixture
def qed_plugin():
    installed: list[_Plugin] = []

    def install(accepts: bool) -> None:
        installed.append(_Plugin(_QedDriver(accepts)))
        plugins.register_plugin(installed[-1])

    yield install
    for plugin in installed:
        plugins.unregister_plugin(plugin)


def test_an_installed_plugin_for_the_format_wins(qed_plugin, tmp_path):
    if not QEMU_IMG:
        pytest.skip("qemu-img is needed to make a qed")
    path = qemu_made(tmp_path, "qed")
    qed_plugin(accepts=True)
    with corefmt.open(str(path), read_only=True) as disk:
        assert (disk.format_name, disk.virtual_size) == ("qed", 1 << 20)


def test_a_plugin_that_declines_its_own_format_is_not_bypassed(qed_plugin, tmp_path):
    if not QEMU_IMG:
        pytest.skip("qemu-img is needed to make a qed")
    path = qemu_made(tmp_path, "qed")
    qed_plugin(accepts=False)
    with pytest.raises(UnsupportedFormatError,
                       match="the installed qed plugin does not recognise it"):
        corefmt.open(str(path), read_only=True)


# -- qemu's probe rules, case by case ----------------------------------------------------------
def _head(*pieces: tuple[int, bytes], size: int = SECTOR) -> bytes:
    head = bytearray(size)
    for offset, data in pieces:
        head[offset:offset + len(data)] = data
    return bytes(head)


@pytest.mark.parametrize(("head", "expected"), [
    (b"", None),                                            # empty: raw, never probed
    (bytes(SECTOR), None),
    (b"QFI\xfb", None),                                     # version 0 (zeros past the end)
    (b"QFI\xfb\0\0\0\x01", "qcow"),
    (b"QFI\xfb\0\0\0\x02", "qcow2"),                        # short file: qemu pads with zeros
    (b"QFI\xfb\0\0\0\x03", "qcow2"),
    (b"QFI\xfb\x01\0\0\0", "qcow2"),                        # any version >= 2
    (b"KDMV", "vmdk"), (b"COWD", "vmdk"),
    (b"# Disk DescriptorFile\nversion=1\nCID=1\n", "vmdk"),
    (b"#c\n   \n \r\nversion=3\r\n", "vmdk"),               # comments, blank lines, CRLF
    (b"\nversion=1\n", None),                               # an empty line is not blank
    (b"x\nversion=1\n", None),                              # only the first line counts
    (b"  x\nversion=1\n", None),
    (b"version=4\n", None),
    (b"version=1", None),                                   # no line end
    (b"conectix", "vpc"), (b"vhdxfile", "vhdx"), (b"QED\0", "qed"),
    (b"QED", "qed"),                                        # zeros past the end count
    (_head((0x40, b"\x7f\x10\xda\xbe")), "vdi"),
    (b"LUKS\xba\xbe\0\x01", "luks"), (b"LUKS\xba\xbe\0\x02", None),  # qemu 7.2: LUKS1 only
    (_head((0, b"WithoutFreeSpace"), (16, b"\x02\0\0\0")), "parallels"),
    (_head((0, b"WithouFreSpacExt"), (16, b"\x02\0\0\0")), "parallels"),
    (_head((0, b"WithoutFreeSpace"), (16, b"\x02\0\0\x01")), None),
    (_head((0, b"Bochs Virtual HD Image"), (32, b"Redolog"), (48, b"Growing"),
           (64, b"\0\0\x01\0")), "bochs"),
    (_head((0, b"Bochs Virtual HD ImageX"), (32, b"Redolog"), (48, b"Growing"),
           (64, b"\0\0\x02\0")), None),                     # strcmp: the NUL counts
    (_head((0, b"Bochs Virtual HD Image"), (32, b"Redolog"), (48, b"Undoable"),
           (64, b"\0\0\x02\0")), None),
    (b"#!/bin/sh\n#V2.0 Format\n", None),                   # cloop: the whole preamble
])
def test_qemus_probe_rules(head, expected):
    found = identify(head, "image")
    assert (found.name if found else None) == expected


def test_dmg_needs_its_name_and_its_trailer(tmp_path, cli):
    image = dmg(tmp_path).read_bytes()
    for name in ("other.img", ".dmg", "x.DMG"):  # qemu: "*.dmg", longer than 4 characters
        (tmp_path / name).write_bytes(image)
    (tmp_path / "plain.dmg").write_bytes(bytes(len(image)))
    (tmp_path / "tiny.dmg").write_bytes(b"koly")
    for name in ("other.img", ".dmg", "x.DMG", "plain.dmg", "tiny.dmg"):
        result = cli("info", "--output=json", name)
        assert result.returncode == 0, (name, result.stderr)
        assert json.loads(result.stdout)["format"] == "raw", name
    # the trailer is found where qemu's open looks: it may start up to 1023 bytes from the end
    for extra in (0, 511):
        (tmp_path / "shifted.dmg").write_bytes(image + bytes(extra))
        with pytest.raises(UnsupportedFormatError, match="this is a dmg image"):
            corefmt.open(str(tmp_path / "shifted.dmg"), read_only=True)
    (tmp_path / "shifted.dmg").write_bytes(image + bytes(512))
    with corefmt.open(str(tmp_path / "shifted.dmg"), read_only=True) as disk:
        assert disk.format_name == "raw"


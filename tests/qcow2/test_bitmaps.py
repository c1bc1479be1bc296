"""Persistent dirty bitmaps, held to qemu 7.2: info lists qemu's bitmaps as
qemu-img does; corefmt's writes, zeroing and discards set the bits qemu's
would (read back through qemu-nbd and nbdinfo); corefmt bitmap answers as
qemu-img bitmap; a crash or power cut leaves bitmaps in-use, never
consistent and wrong; a read-only open writes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import corefmt
from corefmt import CorefmtError, plugins
from corefmt.cli.main import main as corefmt_main
from corefmt.storage.simulated import SimFault

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
NBDINFO = shutil.which("nbdinfo") or "nbdinfo"
KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB
#: Guest changes, as qemu-io commands (corefmt io takes the same words):
#: partial clusters, a write across a cluster edge, an unaligned and an
#: aligned zeroing, a cluster-aligned discard.
CHANGES = ("write 0 4k", "write 1020k 100k", "write -z 8M 64k", "write -z 9M 6k",
           "discard 16M 128k", "write 63M 1M")
LATER = ("write 30M 4k", "write -z 40M 64k")


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=60)
    assert not check or result.returncode == 0, result.stderr
    return result


def dirty_map(path: Path, name: str) -> list[tuple[int, int]]:
    """The dirty runs qemu reads from a bitmap (qemu-nbd -B, nbdinfo --map)."""
    out = run(NBDINFO, f"--map=qemu:dirty-bitmap:{name}", "--json", "--",
              "[", QEMU_NBD, "-r", "-B", name, "-f", "qcow2", path, "]").stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]


def qemu_bitmaps(path: Path) -> list[dict] | None:
    out = run(QEMU_IMG, "info", "--output=json", "-U", path).stdout
    return json.loads(out)["format-specific"]["data"].get("bitmaps")


def qemu_check_clean(path: Path) -> None:
    result = run(QEMU_IMG, "check", "--output=json", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def corefmt_cli(*args: object, capsys) -> tuple[int, str, str]:
    code = corefmt_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """qemu-made: enabled bitmaps at 64 KiB and 4 KiB, a disabled one, and data."""
    path = tmp_path / "base.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", path, str(SIZE))
    run(QEMU_IO, "-c", "write 5M 12k", path)
    run(QEMU_IMG, "bitmap", "--add", path, "b64")
    run(QEMU_IMG, "bitmap", "--add", "-g", "4k", path, "b4")
    run(QEMU_IMG, "bitmap", "--add", "--disable", path, "off")
    run(QEMU_IO, "-c", "write 6M 4k", path)  # dirty before corefmt ever sees it
    return path


def crash_qemu_io(path: Path) -> None:
    """qemu-io killed while it has the image open read-write (once its
    bitmaps are IN_USE on disk)."""
    process = subprocess.Popen([QEMU_IO, "-c", "write 0 4k", "-c", "sleep 20000", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            flags = [entry["flags"] for entry in qemu_bitmaps(path) or []]
            if flags and all("in-use" in words for words in flags):
                break
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()


# -- info ---------------------------------------------------------------------------
@pytest.mark.parametrize("crashed", [False, True], ids=["consistent", "in-use"])
def test_info_lists_qemus_bitmaps_as_qemu_img_does(image, crashed, capsys):
    if crashed:
        crash_qemu_io(image)
    for output in ("human", "json"):
        code, out, _ = corefmt_cli("info", f"--output={output}", image, capsys=capsys)
        expected = run(QEMU_IMG, "info", f"--output={output}", image).stdout
        assert (code, out) == (0, expected)
    flags = [entry["flags"] for entry in qemu_bitmaps(image)]
    assert flags == ([["in-use", "auto"], ["in-use", "auto"], ["in-use"]] if crashed
                     else [["auto"], ["auto"], []])


def test_read_only_opens_write_nothing(image, capsys):
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    for args in (("info", image), ("io", "-r", "-c", "read 0 64k", image), ("check", image),
                 ("measure", "-O", "qcow2", image), ("map", image)):
        corefmt_cli(*args, capsys=capsys)
    with corefmt.open(str(image), "qcow2", read_only=True) as node:
        node.read(0, 4096)
        assert [b.name for b in node.layer().image.bitmap_list()] == ["b64", "b4", "off"]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


# -- tracking -------------------------------------------------------------------------
def test_corefmt_writes_set_the_bits_qemus_would(image, tmp_path, capsys):
    theirs = tmp_path / "qemu.qcow2"
    shutil.copy(image, theirs)
    args = [part for command in CHANGES for part in ("-c", command)]
    assert corefmt_cli("io", *args, image, capsys=capsys)[0] == 0
    run(QEMU_IO, *args, theirs)
    assert [entry["flags"] for entry in qemu_bitmaps(image)] == [["auto"], ["auto"], []]
    for name in ("b64", "b4", "off"):
        assert dirty_map(image, name) == dirty_map(theirs, name), name
    assert (0, 64 * KiB) in dirty_map(image, "b64")
    assert dirty_map(image, "off") == []
    qemu_check_clean(image)
    # qemu's own writes afterwards keep the bitmaps going from where corefmt left them.
    later = [part for command in LATER for part in ("-c", command)]
    run(QEMU_IO, *later, image)
    run(QEMU_IO, *later, theirs)
    for name in ("b64", "b4", "off"):
        assert dirty_map(image, name) == dirty_map(theirs, name), name
    qemu_check_clean(image)


def test_bitmaps_are_in_use_on_disk_before_the_first_write(image):
    with corefmt.open(str(image), "qcow2") as node:
        flags = [entry["flags"] for entry in qemu_bitmaps(image)]
        assert flags == [["in-use", "auto"], ["in-use", "auto"], ["in-use"]]
        node.write(0, b"x" * 512)
    assert [entry["flags"] for entry in qemu_bitmaps(image)] == [["auto"], ["auto"], []]


def test_a_killed_writer_leaves_its_bitmaps_in_use(image, tmp_path, capsys):
    script = ("import sys, corefmt\n"
              "node = corefmt.open(sys.argv[1], 'qcow2')\n"
              "node.write(0, b'x' * 4096)\n"
              "node.flush()\n"
              "print('ready', flush=True)\n"
              "sys.stdin.read()\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(image)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [entry["flags"] for entry in qemu_bitmaps(image)] == [
        ["in-use", "auto"], ["in-use", "auto"], ["in-use"]]
    code, _, err = corefmt_cli("bitmap", "--clear", image, "b64", capsys=capsys)
    expected = run(QEMU_IMG, "bitmap", "--clear", image, "b64", check=False)
    assert (code, err.replace("corefmt: ", "")) == (
        expected.returncode, expected.stderr.replace("qemu-img: ", ""))
    # An inconsistent bitmap is left alone by later sessions, and qemu agrees.
    assert corefmt_cli("io", "-c", "write 1M 4k", image, capsys=capsys)[0] == 0
    assert qemu_bitmaps(image)[0]["flags"] == ["in-use", "auto"]
    qemu_check_clean(image)


def _sim_image(name: str) -> None:
    corefmt.create(name, "qcow2", SIZE, options="cluster_size=4k")
    corefmt.bitmap(name, "b", ["add"], granularity=4096)
    with corefmt.open(name, "qcow2") as node:
        node.write(0, b"a" * 4096)


def test_a_power_cut_while_storing_never_leaves_a_wrong_consistent_bitmap(tmp_path):
    """A cut before each request of the closing session's store, with seeds
    that keep and drop unflushed writes: the bitmap is in-use (old) or
    consistent and has every written range; the image is sound."""
    name = f"sim:{tmp_path.name}-bitmaps"
    _sim_image(name)
    disk = plugins.registry().storage_for(name).disk(name)
    disk.sync()
    pristine = bytes(disk.current)
    writes = [(2 * MiB + 4 * KiB, 8 * KiB), (9 * MiB, 4 * KiB)]

    def session(cut: int | None, seed: int) -> int:
        disk.restore(pristine)
        node = corefmt.open(name, "qcow2")
        try:
            for offset, length in writes:
                node.write(offset, b"w" * length)
            start = disk.requests
            if cut is not None:
                target = start + cut
                disk.policy = lambda request: (SimFault(power_cut=seed)
                                               if disk.requests == target + 1 else None)
        finally:
            with contextlib.suppress(CorefmtError):  # the cut, reported by close
                node.close()
            disk.policy = None
        return disk.requests - start

    requests = session(None, 0)
    assert requests > 5
    for cut in range(requests):
        for seed in range(3):
            session(cut, seed)
            assert disk.dead
            copy = tmp_path / "crashed.qcow2"
            copy.write_bytes(bytes(disk.crash_image or b""))
            result = run(QEMU_IMG, "check", "--output=json", copy, check=False)
            assert result.returncode in (0, 3), (cut, seed, result.stdout + result.stderr)
            [entry] = qemu_bitmaps(copy)
            if "in-use" not in entry["flags"]:
                dirty = dirty_map(copy, "b")
                for offset, length in writes:
                    assert any(o <= offset and offset + length <= o + n for o, n in dirty), (
                        cut, seed, dirty)


# -- the verb -----------------------------------------------------------------------------
BITMAP_CASES = [
    "IMG b",
    "--add IMG",
    "--add -g 64k --remove IMG b",
    "--remove -g 64k IMG b",
    "--merge x -F qcow2 IMG b",
    "--add -b SRC IMG b",
    "--remove IMG nope",
    "--clear IMG nope",
    "--add -g 1000 IMG b",
    "--add -g 4G IMG b",
    "--add -g 6G IMG b",
    "--add -g 0 IMG b",
    "--add -g abc IMG b",
    "--add IMG b64",
    "--add --add IMG y",
    "--add --clear --disable --enable --remove IMG z",
    "--remove IMG b64",
    "--clear IMG b4",
    "--disable IMG b64",
    "--enable IMG off",
    "--add -g 512 IMG n --merge b64 --merge off",
    "--merge s -b SRC IMG b64",
    "--merge s -b SRC -F qcow2 IMG off",
    "--merge s -b SMALL IMG b64",
    "--add IMG b extra",
]


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src, small = tmp_path / "src.qcow2", tmp_path / "small.qcow2"
    run(QEMU_IMG, "create", "-f", "qcow2", src, str(SIZE))
    run(QEMU_IMG, "bitmap", "--add", "-g", "512", src, "s")
    run(QEMU_IO, "-c", "write 1M 4k", "-c", "write 40M 1k", src)
    run(QEMU_IMG, "create", "-f", "qcow2", small, str(32 * MiB))
    run(QEMU_IMG, "bitmap", "--add", small, "s")
    return {"SRC": src, "SMALL": small}


@pytest.mark.parametrize("case", BITMAP_CASES)
def test_bitmap_verb_answers_as_qemu_img(image, sources, tmp_path, case, capsys):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(image, ours)
    shutil.copy(image, theirs)

    def argv(target: Path) -> list[str]:
        names = {"IMG": str(target), **{k: str(v) for k, v in sources.items()}}
        return [names.get(word, word) for word in case.split(" ")]

    code, _, err = corefmt_cli("bitmap", *argv(ours), capsys=capsys)
    expected = run(QEMU_IMG, "bitmap", *argv(theirs), check=False)
    assert code == expected.returncode
    assert err.replace("corefmt: ", "").replace(str(ours), "X") == (
        expected.stderr.replace("qemu-img: ", "").replace(str(theirs), "X"))
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    for entry in qemu_bitmaps(ours) or []:
        assert dirty_map(ours, entry["name"]) == dirty_map(theirs, entry["name"])
    qemu_check_clean(ours)


def test_python_api_and_capabilities(image):
    corefmt.bitmap(str(image), "new", ["add", ("merge", "b64"), "disable"], granularity=8192)
    with pytest.raises(CorefmtError, match="Operation add on bitmap new failed: Bitmap "
                                           "already exists: new"):
        corefmt.bitmap(str(image), "new", ["add"])
    with corefmt.open(str(image), "qcow2") as node:
        disk = node.layer().image
        assert [(b.name, b.granularity, b.flags) for b in disk.bitmap_list()] == [
            ("b64", 65536, ("auto",)), ("b4", 4096, ("auto",)), ("off", 65536, ()),
            ("new", 8192, ())]
        assert disk.bitmap_dirty_ranges("new") == [(6 * MiB, 64 * KiB)]
        disk.bitmap_remove("b4")
        disk.bitmap_clear("b64")
        disk.bitmap_enable("off")
    assert [(e["name"], e["flags"]) for e in qemu_bitmaps(image)] == [
        ("b64", ["auto"]), ("off", ["auto"]), ("new", [])]
    assert dirty_map(image, "b64") == []
    assert dirty_map(image, "new") == [(6 * MiB, 64 * KiB)]
    qemu_check_clean(image)


# -- resize, stale bitmaps, measure ---------------------------------------------------------
@pytest.mark.parametrize("new_size", [128 * MiB, 32 * MiB, SIZE + 100 * KiB])
def test_resize_carries_consistent_bitmaps_as_qemu(image, tmp_path, new_size):
    theirs = tmp_path / "theirs.qcow2"
    run(QEMU_IO, "-c", "write 40M 64k", image)
    shutil.copy(image, theirs)
    with corefmt.open(str(image), "qcow2") as node:
        node.truncate(new_size)
    run(QEMU_IMG, "resize", "--shrink", theirs, str(new_size))
    for name in ("b64", "b4", "off"):
        assert dirty_map(image, name) == dirty_map(theirs, name), name
    qemu_check_clean(image)


def test_resize_refuses_inconsistent_bitmaps(image):
    crash_qemu_io(image)
    with corefmt.open(str(image), "qcow2") as node, pytest.raises(
            CorefmtError, match="Bitmap 'b64' is inconsistent and cannot be used\nTry "
                                "block-dirty-bitmap-remove"):
        node.truncate(128 * MiB)


def test_a_cleared_autoclear_bit_makes_bitmaps_stale(image, capsys):
    data = bytearray(image.read_bytes())
    data[95] &= ~1  # AUTOCLEAR_BITMAPS (the autoclear field is bytes 88-95)
    image.write_bytes(bytes(data))
    assert qemu_bitmaps(image) is None
    _, out, _ = corefmt_cli("info", "--output=json", image, capsys=capsys)
    assert "bitmaps" not in json.loads(out)["format-specific"]["data"]
    with pytest.warns(UserWarning, match="a program lacking bitmap support"), corefmt.open(
            str(image), "qcow2") as node:
        node.write(0, b"x" * 512)
    data = image.read_bytes()
    assert (0x23852875).to_bytes(4, "big") not in data[:4096]  # the extension is gone
    leaks = run(QEMU_IMG, "check", "--output=json", image, check=False)
    assert leaks.returncode == 3  # its clusters leak, as after qemu; check -r reclaims them


def test_measure_reports_bitmaps_size_as_qemu(image, capsys):
    corefmt.bitmap(str(image), "wide", ["add"], granularity=512)
    for extra in ((), ("-o", "cluster_size=4k")):
        for output in ("human", "json"):
            code, out, _ = corefmt_cli("measure", f"--output={output}", "-O", "qcow2", *extra,
                                       image, capsys=capsys)
            expected = run(QEMU_IMG, "measure", f"--output={output}", "-O", "qcow2", *extra,
                           image).stdout
            assert (code, out) == (0, expected)


def test_many_random_writes_match_qemu(image, tmp_path, capsys):
    rng = random.Random(5)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(image, theirs)
    commands = []
    for _ in range(40):
        offset = rng.randrange(0, SIZE - 256 * KiB, 512)
        length = rng.randrange(512, 256 * KiB, 512)
        verb = rng.choice(["write", "write -z", "discard"])
        if verb == "discard":  # corefmt drops the unaligned edges qemu marks: aligned only
            offset, length = offset // (64 * KiB) * 64 * KiB, -(-length // (64 * KiB)) * 64 * KiB
        commands += ["-c", f"{verb} {offset} {length}"]
    assert corefmt_cli("io", *commands, image, capsys=capsys)[0] == 0
    run(QEMU_IO, *commands, theirs)
    for name in ("b64", "b4"):
        assert dirty_map(image, name) == dirty_map(theirs, name), name

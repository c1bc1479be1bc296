"""qemu-nbd's -s, -A, -B, --cache/-n and --aio on corefmt's server, checked
with the real clients (qemu-io, nbdinfo, qemu-img) and next to qemu-nbd
given the same options on a copy of the same image."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import corefmt
from corefmt.block.chain import open_chain
from corefmt.errors import CorefmtError
from corefmt.flags import RequestFlags
from corefmt.nbd import protocol as p
from corefmt.nbd import serving
from corefmt.nbd.protocol import Option, Reply
from tests.nbd.conftest import IMAGE_SIZE
from tests.nbd.nbd_client import Client, meta_context_data
from tests.nbd.test_nbd_interop import TIMEOUT, qemu_nbd, run, unix_uri, wait_for

TOOLS = ("nbdinfo", "qemu-img", "qemu-io", "qemu-nbd")
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                       reason="needs nbdinfo (libnbd-bin) and qemu-img/qemu-io/qemu-nbd"),
]
DEPTH, BITMAP = "qemu:allocation-depth", "qemu:dirty-bitmap:"
#: Writes made through an export: over data, over holes, unaligned.
WRITES = ("write -P 0x77 32k 64k", "write -P 0x5a 1M 4k", "write -z 3M 8k",
          "write -P 0x3c 2097664 1536")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(uri: str, *commands: str) -> str:
    """qemu-io with its write cache on (its default, writethrough, sends FUA)."""
    args = [arg for command in commands for arg in ("-c", command)]
    return run("qemu-io", "-f", "raw", "-t", "writeback", *args, uri).stdout


def nbd_map(uri: str, context: str = "base:allocation", check: bool = True
            ) -> subprocess.CompletedProcess:
    return run("nbdinfo", f"--map={context}", uri, check=check)


def contexts(uri: str) -> list[str]:
    return json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["contexts"]


def corefmt_nbd(*args: str, tmpdir: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               **({"TMPDIR": str(tmpdir)} if tmpdir else {}))
    return subprocess.Popen([sys.executable, "-m", "corefmt.cli.main", "nbd", *args],
                            stderr=subprocess.PIPE, text=True, env=env)


def refusal(command: list[str]) -> tuple[int, str]:
    """Exit code and the one-line message without its program prefix."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    return result.returncode, result.stderr.strip().split(": ", 1)[-1]


def corefmt_refusal(*args: str) -> tuple[int, str]:
    return refusal([sys.executable, "-m", "corefmt.cli.main", "nbd", *args])


@pytest.fixture
def qcow2_image(raw_image: Path, tmp_path: Path) -> Path:
    """The conftest image's content as a qcow2 (its data runs and holes)."""
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw_image), str(image))
    return image


@pytest.fixture
def bitmap_image(tmp_path: Path) -> Path:
    """A qcow2 with bitmap "b0" (64k granularity, enabled) and "b1" (4k,
    disabled after the first writes), marked by qemu-io's writes."""
    image = tmp_path / "bitmaps.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(IMAGE_SIZE))
    run("qemu-img", "bitmap", "--add", str(image), "b0")
    run("qemu-img", "bitmap", "--add", "-g", "4k", str(image), "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 8k 4k", "-c", "write -P 2 1M 70k",
        str(image))
    run("qemu-img", "bitmap", "--disable", str(image), "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 3M 1", "-c", "write -z 2M 64k",
        str(image))
    return image


# -- -s / --snapshot ----------------------------------------------------------------------
def make_image(kind: str, raw_image: Path, tmp_path: Path) -> tuple[Path, str]:
    if kind == "raw":
        return raw_image, "raw"
    image = tmp_path / f"disk.{kind}"
    corefmt.convert(str(raw_image), str(image), source_format="raw", target_format=kind)
    return image, kind


@pytest.mark.parametrize("kind", ["raw", "qcow2", "fvd"])
def test_snapshot_writes_reach_only_a_temporary_overlay(kind, raw_image, tmp_path):
    image, format = make_image(kind, raw_image, tmp_path)
    before = sha256(image)
    ours_tmp, theirs_tmp = tmp_path / "ours-tmp", tmp_path / "theirs-tmp"
    ours_tmp.mkdir()
    theirs_tmp.mkdir()
    reference = tmp_path / "reference.raw"  # qemu-nbd -s over the same content
    shutil.copy(raw_image, reference)
    sock = tmp_path / "c"
    process = corefmt_nbd("-t", "-s", "-f", format, "-k", str(sock), str(image),
                          tmpdir=ours_tmp)
    try:
        wait_for(sock)
        uri = unix_uri(sock)
        assert len(list(ours_tmp.iterdir())) == 1  # the overlay went where TMPDIR says
        qemu_io(uri, *WRITES)
        read = qemu_io(uri, "read -P 0x77 32k 64k", "read -P 0xaa 0 32k",
                       "read -P 0x5a 1M 4k", "read -P 0 3M 8k", "read -P 0x3c 2097664 1536")
        assert read.count("read ") == 5 and "Pattern verification failed" not in read
        with qemu_nbd(reference, tmp_path / "q", "-s", "-f", "raw", tmpdir=theirs_tmp) as theirs:
            qemu_io(theirs, *WRITES)
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, theirs)
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
    assert sha256(image) == before
    assert list(ours_tmp.iterdir()) == [] and list(theirs_tmp.iterdir()) == []
    assert sha256(reference) == sha256(raw_image)


def test_snapshot_from_the_api_with_copy_on_read_and_cache(qcow2_image, tmp_path,
                                                           monkeypatch):
    """-s -C: NBD_CMD_CACHE copies into the overlay, never into the image."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = sha256(qcow2_image)
    with serving(str(qcow2_image), "qcow2", snapshot=True, copy_on_read=True,
                 allocation_depth=True) as server:
        with Client(("127.0.0.1", server.port)) as client:
            client.go()
            client.request(p.Command.NBD_CMD_CACHE, 0, 64 * 1024)
            assert client.any_reply()[1] == 0
        depth = nbd_map(server.address, DEPTH).stdout.splitlines()[0].split()
        assert depth[:3] == ["0", "65536", "1"]  # cached: now the overlay's (depth 1)
    assert sha256(qcow2_image) == before
    assert list((tmp_path / "tmp").iterdir()) == []


def test_snapshot_of_an_image_options_graph(raw_image, tmp_path, monkeypatch):
    """A graph given as options (no file name to record) is the overlay's backing."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    spec = {"driver": "raw", "file": {"driver": "file", "filename": str(raw_image)}}
    before = sha256(raw_image)
    with serving(spec, snapshot=True) as server:
        qemu_io(server.address, "write -P 0x66 0 4k")
        read = qemu_io(server.address, "read -P 0x66 0 4k", "read -P 0xaa 4k 4k")
        assert read.count("read 4096/4096") == 2
    assert sha256(raw_image) == before
    assert list(tmp_path.glob("corefmt-nbd-snapshot-*")) == []


def test_snapshot_never_probes_the_image(tmp_path, monkeypatch):
    """-f raw -s over a raw image that holds a qcow2 header: the overlay's
    backing is the raw bytes, not the qcow2 they look like."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    inner, image = tmp_path / "inner.qcow2", tmp_path / "looks-like-qcow2.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(inner), str(IMAGE_SIZE))
    image.write_bytes(inner.read_bytes().ljust(IMAGE_SIZE, b"\0"))
    with serving(str(image), "raw", snapshot=True, read_only=False) as server:
        assert int(run("nbdinfo", "--size", server.address).stdout) == IMAGE_SIZE
        dump = tmp_path / "dump.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.address, str(dump))
    assert dump.read_bytes() == image.read_bytes()


# -- -A / --allocation-depth ---------------------------------------------------------------
@pytest.fixture
def chain(qcow2_image: Path, tmp_path: Path) -> Path:
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2_image), "-F", "qcow2",
        str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 3M 4k", "-c", "write -P 0x33 32k 4k",
        str(top))
    return top


@pytest.mark.parametrize("depth", [False, True])
def test_allocation_depth_is_offered_only_with_A(depth, chain, tmp_path):
    option = ("-A",) if depth else ()
    with qemu_nbd(chain, tmp_path / "q", "-r", "-f", "qcow2", *option) as theirs, \
            serving(str(chain), "qcow2", read_only=True, allocation_depth=depth,
                    unix_socket=str(tmp_path / "c")) as server:
        ours = server.address
        assert contexts(ours) == contexts(theirs)
        assert (DEPTH in contexts(ours)) is depth
        mine, reference = nbd_map(ours, DEPTH, check=False), nbd_map(theirs, DEPTH, check=False)
        assert (mine.returncode, mine.stdout) == (reference.returncode, reference.stdout)
        assert (mine.returncode == 0) is depth
        if depth:
            # top's clusters 1, the base's 2 (3M: top's first cluster over the base's two)
            assert [line.split()[2] for line in mine.stdout.splitlines()] == [
                "1", "0", "2", "0", "1", "2", "0"]


def test_the_api_offers_allocation_depth_unless_told_not_to(raw_image):
    """Programs written before -A existed keep the depth context."""
    with serving(str(raw_image), "raw", read_only=True) as server:
        assert DEPTH in contexts(server.address)


def test_allocation_depth_listing_by_namespace(raw_image):
    for depth, expected in ((False, []), (True, [DEPTH])):
        with serving(str(raw_image), "raw", allocation_depth=depth) as server, \
                Client(("127.0.0.1", server.port)) as client:
            client.greeting()
            client.option(Option.NBD_OPT_LIST_META_CONTEXT, meta_context_data("", ("qemu:",)))
            names = [data[4:].decode() for reply, data in client.replies()
                     if reply == Reply.NBD_REP_META_CONTEXT]
            assert names == expected


# -- -B / --bitmap -------------------------------------------------------------------------
@pytest.mark.parametrize("snapshot", [False, True])
def test_bitmap_maps_equal_qemu_nbd(snapshot, bitmap_image, tmp_path, monkeypatch):
    """With -s the bitmap is found under the overlay, in the image itself."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    options = ("-s",) if snapshot else ("-r",)
    with qemu_nbd(bitmap_image, tmp_path / "q", *options, "-f", "qcow2", "-B", "b0",
                  "-B", "b1", tmpdir=tmp_path) as theirs, \
            serving(str(bitmap_image), "qcow2", read_only=not snapshot, snapshot=snapshot,
                    bitmaps=["b0", "b1"], allocation_depth=False,
                    unix_socket=str(tmp_path / "c")) as server:
        ours = server.address
        assert contexts(ours) == contexts(theirs) == [  # the last -B first, as qemu-nbd
            "base:allocation", BITMAP + "b1", BITMAP + "b0"]
        for name, dirty in (("b0", [(0, 64), (1024, 128), (2048, 64), (3072, 64)]),
                            ("b1", [(8, 4), (1024, 72)])):
            mine = nbd_map(ours, BITMAP + name).stdout
            assert mine == nbd_map(theirs, BITMAP + name).stdout
            assert [(int(start) // 1024, int(size) // 1024)
                    for start, size, flag, *_ in map(str.split, mine.splitlines())
                    if flag == "1"] == dirty


def test_bitmap_block_status_of_an_unaligned_range(bitmap_image):
    """A range that starts inside a dirty granule and ends inside a clean one
    (b1: 4k granules, 8k..12k dirty), whole and with REQ_ONE."""
    with serving(str(bitmap_image), "qcow2", read_only=True, bitmaps=["b1"]) as server, \
            Client(("127.0.0.1", server.port)) as client:
        client.go(contexts=(BITMAP + "b1",))
        for flags, expected in ((0, [(2048, p.NBD_STATE_DIRTY), (3072, 0)]),
                                (p.CommandFlags.NBD_CMD_FLAG_REQ_ONE,
                                 [(2048, p.NBD_STATE_DIRTY)])):
            client.request(p.Command.NBD_CMD_BLOCK_STATUS, 10 * 1024, 5 * 1024, flags)
            _, error, [(kind, body)] = client.any_reply()
            assert not error and kind == p.ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS
            assert [p.BLOCK_DESCRIPTOR.unpack_from(body, offset)
                    for offset in range(4, len(body), p.BLOCK_DESCRIPTOR.size)] == expected


def test_writes_through_the_export_mark_an_enabled_bitmap(bitmap_image, tmp_path):
    reference = tmp_path / "reference.qcow2"
    shutil.copy(bitmap_image, reference)
    with qemu_nbd(reference, tmp_path / "q", "-f", "qcow2", "-B", "b0", "-B", "b1") as theirs, \
            serving(str(bitmap_image), "qcow2", bitmaps=("b0", "b1"),
                    unix_socket=str(tmp_path / "c")) as server:
        for uri in (server.address, theirs):
            qemu_io(uri, "write -P 9 2500k 4k", "write -z 200k 1k")
        for name in ("b0", "b1"):  # b1 is disabled: unchanged
            assert nbd_map(server.address, BITMAP + name).stdout == nbd_map(
                theirs, BITMAP + name).stdout
        assert "2555904       65536    1" in nbd_map(server.address, BITMAP + "b0").stdout
    with open_chain(str(bitmap_image), "qcow2", read_only=True) as node:
        assert (2555904, 65536) in node.layer().image.bitmap_dirty_ranges("b0")


def test_bitmap_refusals_are_qemu_nbds(bitmap_image, raw_image, tmp_path):
    sock = str(tmp_path / "s")
    broken = tmp_path / "broken.qcow2"  # a writer killed: its bitmaps left in use
    shutil.copy(bitmap_image, broken)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "sigraise 9",
                    str(broken)], capture_output=True, timeout=TIMEOUT)
    cases = (("-r", "-f", "qcow2", "-B", "nope", str(bitmap_image)),
             ("-r", "-f", "raw", "-B", "b0", str(raw_image)),
             ("-r", "-f", "qcow2", "-B", "b0", str(broken)))
    messages = []
    for case in cases:
        ours = corefmt_refusal("-k", sock, *case)
        assert ours == refusal(["qemu-nbd", "-k", sock, *case])
        messages.append(ours)
    assert messages == [(1, "Bitmap 'nope' is not found"), (1, "Bitmap 'b0' is not found"),
                        (1, "Bitmap 'b0' is inconsistent and cannot be used")]
    with pytest.raises(CorefmtError, match="Bitmap 'nope' is not found"), \
            serving(str(bitmap_image), "qcow2", bitmaps=["nope"]):
        pass


# -- --cache, -n, --aio ----------------------------------------------------------------------
@pytest.mark.parametrize("cache,direct,fua,no_flush", [
    ("writeback", False, False, False), ("writethrough", False, True, False),
    ("none", True, False, False), ("directsync", True, True, False),
    ("unsafe", False, False, True)])
def test_cache_modes_map_onto_corefmts(cache, direct, fua, no_flush, qcow2_image,
                                       monkeypatch):
    with serving(str(qcow2_image), "qcow2", cache=cache) as server:
        node = server.export.node
        assert node.layer().children["file"].direct is direct
        assert node.no_flush is no_flush
        seen: list[RequestFlags] = []
        original = type(node).write
        monkeypatch.setattr(type(node), "write", lambda self, offset, data, flags=
                            RequestFlags.NONE: seen.append(flags) or original(self, offset,
                                                                              data, flags))
        qemu_io(server.address, "write -P 0x41 512 4k", "read -P 0x41 512 4k")
        assert seen and all(bool(flags & RequestFlags.FUA) is fua for flags in seen)
    with open_chain(str(qcow2_image), "qcow2", read_only=True) as node:
        assert bytes(node.read(512, 4096)) == b"\x41" * 4096


def test_cache_and_aio_refusals_are_qemu_nbds(raw_image, tmp_path):
    sock = str(tmp_path / "s")
    for case in (("--cache=bogus",), ("--aio=bogus",), ("-n", "--cache=none"),
                 ("--aio=native",)):
        args = ("-k", sock, "-f", "raw", *case, str(raw_image))
        ours = corefmt_refusal(*args)
        assert ours == refusal(["qemu-nbd", *args])
        assert ours[0] == 1
    serving_sock = tmp_path / "serving"  # qemu-nbd left a stale socket at sock
    process = corefmt_nbd("-t", "-n", "--aio=native", "-f", "raw", "-k", str(serving_sock),
                          str(raw_image))
    try:
        wait_for(serving_sock)
        assert "read 4096/4096" in qemu_io(unix_uri(serving_sock), "read -P 0xaa 0 4k")
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()

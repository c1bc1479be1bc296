"""corefmt's NBD server against the real clients (nbdinfo, nbdcopy, qemu-img,
qemu-io) and next to qemu-nbd serving the same image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corefmt
from corefmt.block.chain import open_chain
from tests.nbd.conftest import IMAGE_SIZE, MiB, expected_bytes, served

TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd")
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                       reason="needs nbdinfo/nbdcopy (libnbd-bin) and qemu-img/qemu-io/qemu-nbd"),
]
TIMEOUT = 30


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)}: {result.stdout}{result.stderr}")
    return result


def unix_uri(path: Path) -> str:
    return f"nbd+unix:///?socket={path}"


def wait_for(path: Path, process: subprocess.Popen | None = None) -> None:
    """Until ``path`` (a server's socket) exists; a ``process`` that exits
    first fails at once, with its stderr when that is a pipe."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if process is not None and process.poll() is not None:
            said = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"the server exited: {said}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path, *options: str, tmpdir: Path | None = None
             ) -> Iterator[str]:
    """qemu-nbd -t with ``options`` on a Unix socket: its URI while it runs."""
    env = dict(os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {}))
    process = subprocess.Popen(["qemu-nbd", "-t", *options, "-k", str(sock), str(image)],
                               env=env)
    try:
        wait_for(sock)
        yield unix_uri(sock)
    finally:
        process.terminate()
        process.wait(TIMEOUT)


@pytest.fixture
def qcow2_chain(tmp_path: Path) -> Path:
    """base.qcow2 (data, a zero cluster, holes) under top.qcow2 (more data)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(IMAGE_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", "-c", "write -z 1M 64k",
        "-c", "write -P 0x11 2M 4k", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 3M 4k", "-c", "write -P 0x33 32k 4k",
        str(top))
    return top


def test_nbdinfo_json_shows_size_flags_and_block_sizes(raw_image, tmp_path):
    sock = tmp_path / "s"
    with served(raw_image, read_only=True, unix_socket=str(sock)):
        info = json.loads(run("nbdinfo", "--json", unix_uri(sock)).stdout)
    export = info["exports"][0]
    assert info["structured"] is True
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is True and export["can_flush"] and export["can_fua"]
    assert export["can_cache"] and export["can_df"]
    assert not export["can_trim"] and not export["can_zero"] and not export["can_multi_conn"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 32 * MiB)
    assert export["contexts"] == ["base:allocation"]  # depth only with -A, as qemu-nbd
    with served(raw_image, unix_socket=str(sock), shared=2):
        export = json.loads(run("nbdinfo", "--json", unix_uri(sock)).stdout)["exports"][0]
    assert export["is_read_only"] is False and export["can_trim"] and export["can_zero"]
    assert export["can_fast_zero"] and export["can_multi_conn"]


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_nbdinfo_map_equals_qemu_nbd(kind, raw_image, qcow2_chain, tmp_path):
    image, format = (raw_image, "raw") if kind == "raw" else (qcow2_chain, "qcow2")
    with qemu_nbd(image, tmp_path / "q", "-r", "-f", format) as uri:
        reference = run("nbdinfo", "--map", uri).stdout
    sock = tmp_path / "c"
    with served(image, format, read_only=True, unix_socket=str(sock), allocation_depth=True):
        ours = run("nbdinfo", "--map", unix_uri(sock)).stdout
        depth = run("nbdinfo", "--map=qemu:allocation-depth", unix_uri(sock)).stdout
    assert ours == reference
    assert "hole,zero" in ours and "data" in ours
    if kind == "qcow2":  # top's own clusters at depth 1, the base's at 2, the rest absent
        assert [line.split()[2] for line in depth.splitlines()] == [
            "1", "0", "2", "0", "2", "0", "1", "0"]


def test_nbdcopy_out_of_and_into_an_export(raw_image, tmp_path):
    sock = tmp_path / "s"
    copy = tmp_path / "copy.raw"
    with served(raw_image, read_only=True, unix_socket=str(sock)):
        run("nbdcopy", unix_uri(sock), str(copy))
    assert copy.read_bytes() == expected_bytes()
    target = tmp_path / "target.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(target), str(IMAGE_SIZE))
    with served(target, "qcow2", unix_socket=str(sock)):
        run("nbdcopy", str(raw_image), unix_uri(sock))
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                              str(raw_image), str(target)).stdout


def test_qemu_img_convert_and_map_over_nbd(qcow2_chain, tmp_path):
    sock = tmp_path / "s"
    converted = tmp_path / "converted.raw"
    with served(qcow2_chain, "qcow2", read_only=True, unix_socket=str(sock)):
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", unix_uri(sock), str(converted))
        over_nbd = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json",
                                  unix_uri(sock)).stdout)
    assert "identical" in run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                              str(qcow2_chain), str(converted)).stdout
    direct = json.loads(run("qemu-img", "map", "--output=json", str(qcow2_chain)).stdout)
    assert runs(over_nbd) == runs(direct)


def runs(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """A map as (start, length, zero, data), adjacent equal runs merged."""
    merged: list[tuple[int, int, bool, bool]] = []
    for entry in entries:
        kind = (entry["zero"], entry["data"])
        if merged and merged[-1][2:] == kind:
            merged[-1] = (merged[-1][0], merged[-1][1] + entry["length"], *kind)
        else:
            merged.append((entry["start"], entry["length"], *kind))
    return merged


def test_fvd_image_read_by_qemu_img(tmp_path):
    image = tmp_path / "disk.fvd"
    corefmt.create(str(image), "fvd", IMAGE_SIZE)
    content = bytearray(IMAGE_SIZE)
    with open_chain(str(image), "fvd") as node:
        for offset, value in ((0, 0x42), (2 * MiB + 512, 0x99)):
            node.write(offset, bytes([value]) * 8192)
            content[offset:offset + 8192] = bytes([value]) * 8192
    sock, converted = tmp_path / "s", tmp_path / "out.raw"
    with served(image, "fvd", read_only=True, unix_socket=str(sock)):
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", unix_uri(sock), str(converted))
    assert converted.read_bytes() == bytes(content)


def test_qemu_io_cannot_write_a_read_only_export(raw_image):
    with served(raw_image, read_only=True) as server:
        result = run("qemu-io", "-f", "raw", server.address, "-c", "write 0 512", check=False)
        assert result.returncode != 0 and "Permission denied" in result.stderr
        read = run("qemu-io", "-f", "raw", "-r", server.address, "-c", "read -P 0xaa 0 512")
        assert "read 512/512" in read.stdout
    assert raw_image.read_bytes()[:512] == b"\xaa" * 512


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-m", "corefmt.cli.main", "nbd", *args],
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_serves_one_client_then_exits(raw_image, tmp_path):
    sock, pid_file = tmp_path / "s", tmp_path / "pid"
    process = cli("-r", "-f", "raw", "-k", str(sock), "--pid-file", str(pid_file),
                  str(raw_image))
    try:
        wait_for(pid_file)
        assert int(pid_file.read_text()) == process.pid
        assert run("nbdinfo", "--size", unix_uri(sock)).stdout.strip() == str(IMAGE_SIZE)
        assert process.wait(TIMEOUT) == 0  # without -t: done after the last client
        assert not pid_file.exists()
    finally:
        process.kill()


def test_cli_persistent_until_sigterm_and_refusals(raw_image, tmp_path):
    sock, pid_file = tmp_path / "s", tmp_path / "pid"
    process = cli("-t", "-x", "disk", "-k", str(sock), "--pid-file", str(pid_file),
                  str(raw_image))
    try:
        wait_for(pid_file)
        uri = f"nbd+unix:///disk?socket={sock}"
        for _ in range(2):
            assert run("nbdinfo", "--size", uri).stdout.strip() == str(IMAGE_SIZE)
        assert run("nbdinfo", "--size", unix_uri(sock), check=False).returncode != 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
    refused = subprocess.run([sys.executable, "-m", "corefmt.cli.main", "nbd",
                              "--detect-zeroes=unmap", str(raw_image)],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 1
    assert refused.stderr == ("corefmt: --detect-zeroes=unmap can only be used if "
                              "--discard=unmap\n")

"""corefmt's nbdkit python plugin (corefmt/nbd/nbdkit_plugin.py) served by
the real nbdkit, against the real clients: qemu-img, qemu-io, nbdinfo.

nbdkit embeds the system python3, which knows nothing of the environment
running these tests: each server gets a PYTHONPATH naming where corefmt, its
format plugins and their dependencies are (as docs/verbs/nbd.md tells users),
except the test of the plugin finding its own install tree; and a PATH
without this interpreter's folders, whose python3 the embedded one would
take its standard library from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corefmt
import corefmt.nbd.nbdkit_plugin as plugin_module
from tests.conftest import run_cli
from tests.nbd.conftest import IMAGE_SIZE, MiB, expected_bytes
from tests.nbd.test_nbd_interop import run

TOOLS = ("nbdkit", "nbdinfo", "qemu-img", "qemu-io")
TIMEOUT = 30
#: By absolute path: the servers' PATH may lack the folder they are in.
NBDKIT, TRUE = shutil.which("nbdkit") or "nbdkit", shutil.which("true") or "true"
PLUGIN = plugin_module.__file__
#: Packages the embedded interpreter must import (the formats come by entry points).
PACKAGES = ("corefmt", "corefmt_raw", "corefmt_qcow2", "corefmt_fvd")
#: nbdkit's base:allocation extent type bits.
EXTENT_HOLE, EXTENT_ZERO = 1, 2
CLUSTER = 64 * 1024
#: How long nbdkit may take to notice a client is gone and close its handle.
CLOSE_WAIT = 3.0
#: qemu-io prints it when it is ready for the next command.
PROMPT = b"qemu-io> "
READ_CHUNK = 4096


def _python_plugin_present() -> bool:
    if any(shutil.which(tool) is None for tool in TOOLS):
        return False
    probe = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True,
                           timeout=TIMEOUT)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not _python_plugin_present(),
                       reason="needs nbdkit with its python plugin (nbdkit-plugin-python), "
                              "nbdinfo (libnbd-bin) and qemu-img/qemu-io"),
]


def package_parent(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def embedded_pythonpath() -> str:
    """Where this interpreter finds corefmt, its plugins and dependencies
    (site-packages also holds the plugins' entry points)."""
    entries = [package_parent(name) for name in PACKAGES] + site.getsitepackages()
    return os.pathsep.join(dict.fromkeys(entries))


def of_this_python(folder: str) -> bool:
    """Whether ``folder`` belongs to this interpreter's installation or venv."""
    here = Path(folder).resolve()
    return any(here.is_relative_to(Path(prefix).resolve())
               for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix})


def plugin_env(pythonpath: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join(folder for folder in env.get("PATH", "").split(os.pathsep)
                                  if folder and not of_this_python(folder))
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


@contextlib.contextmanager
def nbdkit(image: Path, *params: str, plugin: str = PLUGIN,
           pythonpath: str | None = "") -> Iterator[str]:
    """nbdkit serving ``image`` through the plugin on a Unix socket; the
    NBD URI. ``pythonpath`` "" means embedded_pythonpath(), None none."""
    if pythonpath == "":
        pythonpath = embedded_pythonpath()
    with tempfile.TemporaryDirectory(prefix="cf-nbdkit-") as folder:
        sock, log = Path(folder) / "sock", Path(folder) / "stderr"
        with open(log, "w") as stderr:
            process = subprocess.Popen(
                [NBDKIT, "-f", "--exit-with-parent", "-U", str(sock), "python", plugin,
                 f"file={image}", *params],
                env=plugin_env(pythonpath), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not sock.exists():
                if process.poll() is not None:
                    raise AssertionError(f"nbdkit exited: {log.read_text()}")
                assert time.monotonic() < deadline, "nbdkit never listened"
                time.sleep(0.02)
            yield f"nbd+unix:///?socket={sock}"
        finally:
            process.terminate()
            process.wait(TIMEOUT)


class QemuIo:
    """An interactive qemu-io on an NBD URI: the connection stays open
    between commands, so nothing is flushed unless a command says so (a
    qemu-io run with -c flushes when it exits). Writeback: interactive
    qemu-io otherwise sends every write with FUA. One command at a time: its
    prompt says it is ready for the next."""

    def __init__(self, uri: str) -> None:
        self.process = subprocess.Popen(["qemu-io", "-f", "raw", "-t", "writeback", uri],
                                        stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.until_prompt()

    def until_prompt(self) -> str:
        assert self.process.stdout is not None
        output = b""
        while not output.endswith(PROMPT):
            chunk = os.read(self.process.stdout.fileno(), READ_CHUNK)
            assert chunk, f"qemu-io ended: {output.decode(errors='replace')}"
            output += chunk
        return output[:-len(PROMPT)].decode(errors="replace")

    def __call__(self, command: str) -> str:
        """The command's output, once it is done."""
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return self.until_prompt()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(TIMEOUT)


def on_disk(path: Path, offset: int, length: int) -> bytes:
    """What another opener of the image sees now (what is durable in it)."""
    with corefmt.open(str(path), read_only=True, force_share=True) as node:
        return node.read(offset, length)


def runs(extents: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) with neighbours of one kind merged."""
    merged: list[tuple[int, int, bool, bool]] = []
    for start, length, data, zero in extents:
        if merged and merged[-1][2:] == (data, zero):
            merged[-1] = (merged[-1][0], merged[-1][1] + length, data, zero)
        else:
            merged.append((start, length, data, zero))
    return merged


def corefmt_map(path: Path) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run_cli("map", "--output=json", str(path), check=True).stdout)
    return runs([(e["start"], e["length"], e["data"], e["zero"]) for e in entries])


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    return runs([(e["offset"], e["length"], not e["type"] & EXTENT_HOLE,
                  bool(e["type"] & EXTENT_ZERO)) for e in entries])


def qemu_img_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    return runs([(e["start"], e["length"], e["data"], e["zero"]) for e in entries])


# -- images -----------------------------------------------------------------------------
@pytest.fixture
def qcow2_image(tmp_path: Path) -> Path:
    """Data, a zero cluster and unallocated clusters."""
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(IMAGE_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", "-c", "write -z 1M 64k",
        "-c", "write -P 0x11 2M 4k", str(path))
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """top.qcow2 over base.raw: data in each, and base data the top covers."""
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "raw", str(base), str(IMAGE_SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 128k", "-c", "write -P 0x66 3M 64k",
        str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 4k", "-c", "write -P 0x33 1M 64k",
        str(top))
    return top


# -- tests ------------------------------------------------------------------------------
def test_info_and_compare_with_the_image(raw_image):
    with nbdkit(raw_image, "format=raw") as uri:
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == IMAGE_SIZE
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(raw_image))
        export = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert export["is_read_only"] is False
    assert all(export[key] for key in ("can_flush", "can_fua", "can_trim", "can_zero",
                                       "can_fast_zero", "can_multi_conn"))
    assert raw_image.read_bytes() == expected_bytes()


def test_extents_match_corefmt_map(qcow2_image):
    expected = corefmt_map(qcow2_image)
    assert any(not data for _, _, data, _ in expected)  # holes to get wrong
    with nbdkit(qcow2_image, "format=qcow2", "readonly=true") as uri:
        assert nbdinfo_map(uri) == expected
        assert qemu_img_map(uri) == expected


def test_fua_write_is_on_disk_before_any_flush(qcow2_image):
    with nbdkit(qcow2_image, "format=qcow2") as uri:
        qemu_io = QemuIo(uri)
        try:
            assert "wrote" in qemu_io(f"write -f -P 0x43 {4 * CLUSTER} 4k")
            assert on_disk(qcow2_image, 4 * CLUSTER, 4096) == b"\x43" * 4096
            # without FUA the new cluster's mapping waits in the cache: the
            # check above means something
            assert "wrote" in qemu_io(f"write -P 0x44 {6 * CLUSTER} 4k")
            assert on_disk(qcow2_image, 6 * CLUSTER, 4096) == bytes(4096)
            qemu_io("flush")
            assert on_disk(qcow2_image, 6 * CLUSTER, 4096) == b"\x44" * 4096
            output = qemu_io(f"read -P 0x43 {4 * CLUSTER} 4k")
            assert "read 4096/4096" in output and "mismatch" not in output
        finally:
            qemu_io.close()


def test_flush_on_one_connection_covers_another(qcow2_image):
    with nbdkit(qcow2_image, "format=qcow2") as uri:
        writer = QemuIo(uri)
        try:
            assert "wrote" in writer(f"write -P 0x45 {8 * CLUSTER} 4k")
            flusher = QemuIo(uri)
            try:
                flusher("flush")
            finally:
                flusher.close()
            assert on_disk(qcow2_image, 8 * CLUSTER, 4096) == b"\x45" * 4096
        finally:
            writer.close()


def test_a_connection_that_wrote_is_flushed_when_it_goes(qcow2_image):
    with nbdkit(qcow2_image, "format=qcow2") as uri:
        qemu_io = QemuIo(uri)
        assert "wrote" in qemu_io(f"write -P 0x46 {10 * CLUSTER} 4k")
        qemu_io.process.kill()  # gone without a flush
        qemu_io.process.wait(TIMEOUT)
        deadline = time.monotonic() + CLOSE_WAIT
        while on_disk(qcow2_image, 10 * CLUSTER, 4096) != b"\x46" * 4096:
            assert time.monotonic() < deadline, "the write never reached the disk"
            time.sleep(0.05)


def test_zero_trim_and_fast_zero(tmp_path, chain):
    # qcow2 v2 over a backing file cannot zero a cluster without writing it
    v2 = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b",
        str(tmp_path / "base.raw"), "-F", "raw", str(v2))
    with nbdkit(v2, "format=qcow2") as uri:
        assert "Operation not supported" in run(
            "qemu-io", "-f", "raw", "-c", "write -z -n 0 64k", uri, check=False).stdout
        out = run("qemu-io", "-f", "raw", "-c", "write -z 0 64k", "-c", "read -P 0 0 64k",
                  "-c", "read -P 0x5c 64k 64k", uri).stdout
        assert "mismatch" not in out
    with nbdkit(chain, "format=qcow2") as uri:
        out = run("qemu-io", "-f", "raw", "-c", "write -z -u 1M 64k",
                  "-c", "read -P 0 1M 64k", "-c", "discard 64k 64k", uri).stdout
        assert "mismatch" not in out
    assert on_disk(chain, MiB, CLUSTER) == bytes(CLUSTER)
    # the discarded cluster holds no data any more (qcow2 v3 over a backing
    # file makes it a zero cluster)
    assert not any(data for start, length, data, _ in corefmt_map(chain)
                   if start <= CLUSTER < start + length)


def test_chain_reads_through_to_the_base(chain):
    with nbdkit(chain, "format=qcow2", "readonly=true") as uri:
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, str(chain))
        out = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x66 3M 64k",
                  "-c", "read -P 0x5c 0 64k", "-c", "read -P 0x22 64k 4k", uri).stdout
        assert "mismatch" not in out
        assert nbdinfo_map(uri) == corefmt_map(chain)


def test_readonly_refuses_writes(raw_image):
    with nbdkit(raw_image, "format=raw", "readonly=true") as uri:
        export = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert export["is_read_only"] is True
        result = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", uri, check=False)
        assert result.returncode or "failed" in result.stdout + result.stderr
    assert raw_image.read_bytes() == expected_bytes()


def test_bad_parameters_stop_nbdkit(raw_image):
    for params in (("bogus=1",), ("format=qcow2",), ("readonly=maybe",)):
        result = subprocess.run(
            [NBDKIT, "-f", "python", PLUGIN, f"file={raw_image}", *params, "--run", TRUE],
            capture_output=True, text=True, timeout=TIMEOUT,
            env=plugin_env(embedded_pythonpath()))
        assert result.returncode != 0, params
    result = subprocess.run([NBDKIT, "-f", "python", PLUGIN, "--run", TRUE],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env=plugin_env(embedded_pythonpath()))
    assert result.returncode != 0 and "file=IMAGE is required" in result.stderr


def test_plugin_finds_the_tree_it_is_installed_in(tmp_path, raw_image):
    """Installed in a site-packages, the plugin needs no PYTHONPATH: a copy
    of corefmt in a fresh site directory whose .pth names the rest."""
    tree = tmp_path / "site"
    shutil.copytree(package_parent("corefmt") + "/corefmt", tree / "corefmt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    others = [package_parent(name) for name in PACKAGES[1:]] + site.getsitepackages()
    (tree / "rest.pth").write_text("\n".join(dict.fromkeys(others)) + "\n")
    copy = tree / "corefmt" / "nbd" / "nbdkit_plugin.py"
    with nbdkit(raw_image, "format=raw", "readonly=true", plugin=str(copy),
                pythonpath=None) as uri:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(raw_image))

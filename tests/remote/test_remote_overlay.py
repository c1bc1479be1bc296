"""Local overlays over a base on a web server: FVD's scenario, where a VM's
copy-on-write image is local and its base image is published by nginx.

Everything goes through the CLI a user runs: overlays are made with the
base's URL as backing, written, compared with a local reference made the
same way over the local copy of the base, filled by copy-on-read and by
prefetch, and read again once the server is gone. Private nginx
instances are stopped after a prefetch, in the middle of one, and
restarted in the middle of one (on the same port, so the URL inside the
overlay stays valid); the module's ``served`` nginx is never stopped.
Credentials in a base's URL must stay out of images, output and errors;
later opens take them from ~/.netrc.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corefmt.storage.http import ENV_BACKOFF, ENV_RETRIES
from tests.conftest import run_cli
from tests.remote.conftest import DATA_RUNS, IMAGE_SIZE, MiB, Served
from tests.remote.servers import LOOPBACK, Nginx, _free_port, nginx_binary

KiB = 1024
#: Names inside an image are followed to a server only when the user says so.
ALLOW = ("--allow-protocol", "http")
#: (base on the server, its format): one of each format corefmt reads over HTTP.
BASES = [("disk.raw", "raw"), ("disk.qcow2", "qcow2"), ("disk.fvd", "fvd")]
#: Guest writes into the overlay: over a hole of the base, inside its data
#: (unaligned), and over the end of its last run.
WRITES = (("0x5a", 4 * MiB, 128 * KiB), ("0xa5", DATA_RUNS[1][0] + 4096, 8192),
          ("0x3c", IMAGE_SIZE - 64 * KiB, 64 * KiB))
#: Ranges read with copy-on-read, inside the base's data.
COR_READS = ((0, 256 * KiB), (DATA_RUNS[1][0], DATA_RUNS[1][1]))
#: The base a prefetch takes long enough to interrupt: random data
#: everywhere, more than one prefetch checkpoint of it, served slowly.
BIG_SIZE = 96 * MiB
#: About 16 MiB/s through corefmt: 6 s for the whole base. (Here nginx 1.22's
#: limit_rate of 32m and more did not throttle at all.)
LIMIT_RATE = "24m"
#: Stop the server once the prefetch reports this much (past its first
#: 64 MiB checkpoint), or restart it at this point.
STOP_AT_PERCENT = 75.0
RESTART_AT_PERCENT = 30.0
PREFETCH_DEADLINE = 60.0
#: A prefetch makes its fills durable at least this often (docs/verbs/prefetch.md).
CHECKPOINT = 64 * MiB
#: What a resumed prefetch may receive besides the data it was missing: the
#: headers of its requests' answers.
HEADERS_ALLOWANCE = 64 * KiB
#: Fail fast once the server is gone; or ride through a restart.
FAIL_FAST = {ENV_RETRIES: "1", ENV_BACKOFF: "0.01"}
RIDE_THROUGH = {ENV_RETRIES: "6", ENV_BACKOFF: "0.2"}
SECRET = "s3cret-Pa55"


def _env(values: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **values}


def _ok(*args: str, env: dict | None = None) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def _one_line(result: subprocess.CompletedProcess) -> str:
    """The single line of a failed command's stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    return lines[0]


def _overlay(path: Path, fmt: str, backing: str, backing_fmt: str,
             writes: tuple = WRITES, allow: tuple = ()) -> Path:
    """An overlay made and written as a user would: create -b, then io."""
    _ok("create", "-q", "-f", fmt, "-b", backing, "-F", backing_fmt, str(path))
    commands = [word for pattern, offset, length in writes
                for word in ("-c", f"write -P {pattern} {offset} {length}")]
    if commands:
        _ok("io", *allow, *commands, str(path))
    return path


def _map(*args: str) -> list[dict]:
    return json.loads(_ok("map", "--output=json", *args))


def _own(path: Path, fmt: str) -> list[tuple[int, int]]:
    """The ranges the overlay itself holds, read without its backing file
    (qemu's ``backing=`` option: no base opened, no server needed)."""
    return [(entry["start"], entry["length"])
            for entry in _map("--image-opts", f"driver={fmt},file.filename={path},backing=")
            if entry["present"]]


def _layers(entries: list[dict]) -> list[tuple[int, int, int]]:
    """(start, end, depth): which layer every range is read from."""
    runs: list[tuple[int, int, int]] = []
    for entry in entries:
        start, end, depth = entry["start"], entry["start"] + entry["length"], entry["depth"]
        if runs and runs[-1][2] == depth and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end, depth)
        else:
            runs.append((start, end, depth))
    return runs


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identical(first: str, second: str, *options: str, env: dict | None = None) -> None:
    compared = run_cli("compare", *options, first, second, env=env)
    assert compared.returncode == 0 and "Images are identical." in compared.stdout, \
        (compared.stdout, compared.stderr)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """A private nginx over a root of its own (the module's server is left
    alone), which a test may stop and start again on the same port."""
    if nginx_binary() is None:
        pytest.skip("nginx not installed (Debian: apt-get install nginx-light)")
    servers: list[Nginx] = []

    def start(files: dict[str, Path], limit_rate: str | None = None) -> Nginx:
        base = tmp_path / f"server{len(servers)}"
        prefix, root = base / "nginx", base / "root"
        prefix.mkdir(parents=True)
        root.mkdir()
        for name, source in files.items():
            _link(source, root / name)
        server = Nginx(prefix, root, limit_rate=limit_rate)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def big_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.raw"
    with open(path, "wb") as stream:
        for _ in range(BIG_SIZE // (16 * MiB)):
            stream.write(os.urandom(16 * MiB))  # no sector of zeros, in practice
    return path


class Relay:
    """A TCP relay from a loopback port to nginx's, counting the bytes the
    server sends (how much of the base a client really fetched) and keeping
    the first of what clients send (their requests' headers)."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.received = 0
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((LOOPBACK, port))  # SO_REUSEADDR
        self._listener.settimeout(0.05)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{name}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection((LOOPBACK, self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for source, sink, counted in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, counted),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                with self._lock:
                    if counted:
                        self.received += len(data)
                    elif len(self.sent) < MiB:
                        self.sent += data
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Refuse new connections and cut the open ones, as a server that stopped."""
        self._stopping = True
        self._thread.join()
        self._listener.close()
        with self._lock:
            for end in self._sockets:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


class Prefetch:
    """``corefmt prefetch -p`` running in the background, watched through
    its progress line (qemu-img's ``    (NN.NN/100%)``) on stdout."""

    def __init__(self, overlay: Path, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corefmt.cli.main", "prefetch", "-p", *ALLOW, str(overlay)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env))
        self.out = b""

    def reach(self, percent: float) -> float:
        """Wait until the progress reaches ``percent``; the percent shown."""
        deadline = time.monotonic() + PREFETCH_DEADLINE
        stream = self.process.stdout
        assert stream is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stream], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            self.out += chunk
            shown = re.findall(rb"\((\d+\.\d+)/100%\)", self.out)
            if shown and float(shown[-1]) >= percent:
                if float(shown[-1]) >= 100.0:
                    break
                return float(shown[-1])
        self.process.kill()
        self.finish()
        raise AssertionError(f"prefetch did not stop at {percent}% on its way: "
                             f"{self.out[-200:]!r}")

    def finish(self) -> tuple[int, str]:
        out, err = self.process.communicate(timeout=PREFETCH_DEADLINE)
        self.out += out
        return self.process.returncode, err.decode(errors="replace")


# -- 1. overlays over each remote base read as the same overlay over the local base --------
@pytest.mark.parametrize("fmt", ["fvd", "qcow2"])
@pytest.mark.parametrize(("name", "base_fmt"), BASES, ids=[fmt for _, fmt in BASES])
def test_an_overlay_over_a_remote_base_is_the_overlay_over_the_local_base(
        served: Served, tmp_path: Path, fmt: str, name: str, base_fmt: str):
    overlay = _overlay(tmp_path / f"vm.{fmt}", fmt, served.url(name), base_fmt, allow=ALLOW)
    reference = _overlay(tmp_path / f"reference.{fmt}", fmt, str(served.local(name)), base_fmt)
    _identical(str(overlay), str(reference), *ALLOW)
    mapped, expected = _map(*ALLOW, str(overlay)), _map(str(reference))
    own = [entry for entry in mapped if entry["depth"] == 0]
    assert own == [entry for entry in expected if entry["depth"] == 0]
    assert {(entry["start"], entry["length"]) for entry in own} >= {
        (offset, length) for _, offset, length in WRITES if offset != DATA_RUNS[1][0] + 4096}
    if name == "disk.fvd":
        # A plain FVD maps its holes from the file system, which HTTP cannot
        # tell (test_http_storage): over HTTP they are data of the base.
        assert _layers(mapped) == _layers(expected)
    else:
        assert mapped == expected
    checked = run_cli("check", str(overlay))
    assert checked.returncode == 0 and "No errors were found" in checked.stdout, \
        checked.stdout + checked.stderr


def _qemu_reads(url: str) -> bool:
    """Whether qemu-img opens ``url``: its curl driver is a module
    (Debian: block-curl.so in qemu-utils) that may be missing."""
    if shutil.which("qemu-io") is None:
        return False
    probe = subprocess.run(["qemu-img", "info", "-f", "raw", url], capture_output=True)
    return probe.returncode == 0


@pytest.mark.interop
@pytest.mark.parametrize(("name", "base_fmt"), BASES[:2], ids=[fmt for _, fmt in BASES[:2]])
def test_qemu_reads_a_corefmt_qcow2_overlay_over_http(
        served: Served, tmp_path: Path, name: str, base_fmt: str):
    if not _qemu_reads(served.url(name)):
        pytest.skip("qemu-img cannot read over http here (no block-curl module?)")
    overlay = _overlay(tmp_path / "vm.qcow2", "qcow2", served.url(name), base_fmt, allow=ALLOW)
    reference = tmp_path / "reference.qcow2"  # qemu's own, over the local base
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(served.local(name)),
                    "-F", base_fmt, str(reference)], check=True, capture_output=True)
    for pattern, offset, length in WRITES:
        subprocess.run(["qemu-io", "-c", f"write -P {pattern} {offset} {length}",
                        str(reference)], check=True, capture_output=True)
    for command in (["compare", str(overlay), str(reference)], ["check", str(overlay)]):
        done = subprocess.run(["qemu-img", *command], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stdout, done.stderr)


# -- 2. copy-on-read fills the overlay; read-only opens never write --------------------------
def test_copy_on_read_fills_the_overlay_and_read_only_opens_never_write(
        served: Served, tmp_path: Path):
    overlay = _overlay(tmp_path / "vm.fvd", "fvd", served.url("disk.qcow2"), "qcow2",
                       writes=())
    reads = [word for offset, length in COR_READS for word in ("-c", f"read {offset} {length}")]
    digest = _digest(overlay)
    for verb in (["io", "-r", "-C", *ALLOW, *reads], ["io", "-r", *ALLOW, *reads],
                 ["info", "--backing-chain", *ALLOW], ["map", *ALLOW]):
        _ok(*verb, str(overlay))
        assert _digest(overlay) == digest, verb
    assert _own(overlay, "fvd") == []
    _ok("io", "-C", *ALLOW, *reads, str(overlay))
    mapped = _map(*ALLOW, str(overlay))
    filled = [(entry["start"], entry["length"]) for entry in mapped if entry["depth"] == 0]
    assert filled == list(COR_READS)
    assert all(entry["data"] for entry in mapped if entry["depth"] == 0)
    _identical(str(overlay), str(served.local("disk.raw")), *ALLOW)


# -- 3. a finished prefetch: the server is no longer needed ----------------------------------
def test_a_prefetched_overlay_reads_without_the_server(
        served: Served, serve: Callable[..., Nginx], tmp_path: Path):
    server = serve({"disk.qcow2": served.local("disk.qcow2")})
    overlay = _overlay(tmp_path / "vm.fvd", "fvd", server.url("disk.qcow2"), "qcow2",
                       allow=ALLOW)
    reference = _overlay(tmp_path / "reference.fvd", "fvd", str(served.local("disk.qcow2")),
                         "qcow2")
    summary = _ok("prefetch", *ALLOW, str(overlay))
    assert "no longer needs its backing file" in summary, summary
    server.stop()
    gone = _env(FAIL_FAST)
    # Even allowed to, it never opens the base: the server is gone.
    _identical(str(overlay), str(reference), *ALLOW, env=gone)
    copy = tmp_path / "copy.raw"
    _ok("convert", "-O", "raw", str(overlay), str(copy), env=gone)  # not even allowed to
    _identical(str(copy), str(reference), "-f", "raw", "-F", "fvd")
    chain = json.loads(_ok("info", "--backing-chain", "--output=json", str(overlay)))
    # As documented (docs/formats/fvd.md): a finished FVD shows no backing file.
    assert len(chain) == 1 and "backing-filename" not in chain[0], chain
    assert chain[0]["format-specific"]["data"]["all-data-in-fvd-img"] is True, chain
    checked = run_cli("check", str(overlay))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- 4. the server goes away in the middle of a prefetch -------------------------------------
def test_a_prefetch_that_loses_its_server_fails_in_one_line_and_resumes(
        big_base: Path, serve: Callable[..., Nginx], tmp_path: Path):
    """The base's URL names a relay in front of nginx, which counts what a
    client fetches; "the server" is both, stopped and started again on
    their ports."""
    server = serve({"big.raw": big_base}, limit_rate=LIMIT_RATE)
    relay = Relay(_free_port(), server.port)
    url = relay.url("big.raw")
    try:
        overlay = _overlay(tmp_path / "vm.fvd", "fvd", url, "raw", writes=())
        running = Prefetch(overlay, FAIL_FAST)
        reported = int(BIG_SIZE * running.reach(STOP_AT_PERCENT) / 100)
        relay.close()
        server.stop()
        status, err = running.finish()
    finally:
        relay.close()
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"corefmt: {url}: "), lines[0]

    checked = run_cli("check", str(overlay))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    own = _own(overlay, "fvd")
    kept = sum(length for _, length in own)
    # What it reported done was stored and made durable (at least up to the
    # last 64 MiB checkpoint), and it is the base's data.
    assert reported - kept <= CHECKPOINT and kept >= CHECKPOINT, (reported, kept)
    assert kept < BIG_SIZE
    copy = tmp_path / "own.raw"
    _ok("convert", "--image-opts", "-O", "raw", f"driver=fvd,file.filename={overlay},backing=",
        str(copy))
    with open(copy, "rb") as stored, open(big_base, "rb") as base:
        for start, length in own:
            stored.seek(start)
            base.seek(start)
            assert stored.read(length) == base.read(length), (start, length)

    server.start(port=server.port)
    relay = Relay(relay.port, server.port)  # the URL in the overlay names this port
    try:
        rerun = run_cli("prefetch", "--output", "json", "--progress=json", *ALLOW,
                        str(overlay), env=_env(FAIL_FAST))
    finally:
        relay.close()
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["state"] == "finished" and result["self-contained"], result
    # It resumes where the first run stopped, fetches and copies only what
    # was missing:
    progress = [json.loads(line) for line in rerun.stderr.splitlines()]
    assert progress[0]["done"] == kept and progress[-1]["done"] == BIG_SIZE, progress
    assert result["copied"] == BIG_SIZE - kept, (result, kept)
    assert result["copied"] - (BIG_SIZE - reported) <= CHECKPOINT
    assert BIG_SIZE - kept <= relay.received <= BIG_SIZE - kept + HEADERS_ALLOWANCE, \
        (relay.received, kept)
    server.stop()
    _identical(str(overlay), str(big_base), "-F", "raw")


# -- 5. the server restarts in the middle of a prefetch --------------------------------------
def test_a_prefetch_rides_through_a_server_restart(
        big_base: Path, serve: Callable[..., Nginx], tmp_path: Path):
    server = serve({"big.raw": big_base}, limit_rate=LIMIT_RATE)
    overlay = _overlay(tmp_path / "vm.fvd", "fvd", server.url("big.raw"), "raw", writes=())
    running = Prefetch(overlay, RIDE_THROUGH)
    running.reach(RESTART_AT_PERCENT)
    server.stop()  # the transfer in flight is cut off, new connections refused
    server.start(port=server.port)
    assert running.process.poll() is None  # it was in the middle of it
    status, err = running.finish()
    assert status == 0 and err == "", err
    assert b"(100.00/100%)" in running.out
    server.stop()
    _identical(str(overlay), str(big_base), "-F", "raw")


# -- 6. credentials in the base's URL ----------------------------------------------------------
def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


def _leaks(shown: dict[str, str]) -> list[str]:
    return [where for where, text in shown.items() if SECRET in text]


@pytest.mark.parametrize("fmt", ["fvd", "qcow2"])
def test_credentials_never_enter_the_overlay_or_its_info(
        served: Served, tmp_path: Path, fmt: str):
    overlay = tmp_path / f"vm.{fmt}"
    created = run_cli("create", "-f", fmt, "-b", _with_credentials(served.url("disk.qcow2")),
                      "-F", "qcow2", str(overlay))
    shown = {"create": created.stdout + created.stderr}
    if created.returncode == 0:  # (refusing to record them keeps them out too)
        shown["image file"] = overlay.read_bytes().decode("latin-1")
        for info in (["info"], ["info", "--output=json"], ["info", "--backing-chain", *ALLOW],
                     ["info", "--backing-chain", "--output=json", *ALLOW]):
            result = run_cli(*info, str(overlay))
            shown[" ".join(info)] = result.stdout + result.stderr
    assert not _leaks(shown), f"the password is in: {_leaks(shown)}"
    if created.returncode == 0:
        _identical(str(overlay), str(served.local("disk.raw")), *ALLOW)


def test_credentials_never_enter_the_errors_about_an_overlays_base(
        served: Served, serve: Callable[..., Nginx], tmp_path: Path):
    server = serve({"disk.qcow2": served.local("disk.qcow2")})
    overlay = tmp_path / "vm.fvd"
    _ok("create", "-q", "-f", "fvd", "-b", _with_credentials(server.url("disk.qcow2")),
        "-F", "qcow2", str(overlay))
    server.stop()
    base = str(served.local("disk.raw"))
    shown = {}
    for verb in (["map", str(overlay)],  # refused: http is not allowed
                 ["compare", *ALLOW, str(overlay), base], ["prefetch", *ALLOW, str(overlay)],
                 ["io", *ALLOW, "-c", "read 0 4k", str(overlay)],
                 ["info", "--backing-chain", *ALLOW, str(overlay)]):
        shown[verb[0]] = _one_line(run_cli(*verb, env=_env(FAIL_FAST)))
    assert not _leaks(shown), f"the password is in: {_leaks(shown)}"


def test_credentials_never_enter_the_error_of_a_create_over_an_unreachable_base(
        served: Served, serve: Callable[..., Nginx], tmp_path: Path):
    server = serve({"disk.qcow2": served.local("disk.qcow2")})
    url = _with_credentials(server.url("disk.qcow2"))
    server.stop()
    line = _one_line(run_cli("create", "-f", "fvd", "-b", url, "-F", "qcow2",
                             str(tmp_path / "vm.fvd"), env=_env(FAIL_FAST)))
    assert server.url("disk.qcow2") in line and SECRET not in line, line


def test_credentials_in_a_url_on_the_command_line_are_sent_and_never_shown_in_errors(
        served: Served, serve: Callable[..., Nginx]):
    """The top image's own URL: the http driver sends Basic authentication
    and keeps the password out of its messages."""
    server = serve({"disk.qcow2": served.local("disk.qcow2")})
    relay = Relay(_free_port(), server.port)
    try:
        url = _with_credentials(relay.url("disk.qcow2"))
        _identical(url, str(served.local("disk.raw")))
    finally:
        relay.close()
    token = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert f"\r\nAuthorization: Basic {token}\r\n".encode() in relay.sent
    line = _one_line(run_cli("compare", url, str(served.local("disk.raw")),
                             env=_env(FAIL_FAST)))
    assert relay.url("disk.qcow2") in line and SECRET not in line, line


def test_a_base_recorded_without_credentials_logs_in_from_netrc(
        served: Served, serve: Callable[..., Nginx], tmp_path: Path):
    """The overlay records the URL without the password; a later open finds
    the login in $NETRC (as curl --netrc and wget), or sends none."""
    server = serve({"disk.qcow2": served.local("disk.qcow2")})
    relay = Relay(_free_port(), server.port)
    try:
        overlay = tmp_path / "vm.qcow2"
        _ok("create", "-q", "-f", "qcow2", "-b", _with_credentials(relay.url("disk.qcow2")),
            "-F", "qcow2", str(overlay))
        token = base64.b64encode(f"alice:{SECRET}".encode()).decode()
        authorization = f"\r\nAuthorization: Basic {token}\r\n".encode()
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login alice password {SECRET}\n")
        netrc.chmod(0o600)
        default_only = tmp_path / "netrc-default"  # a default login goes to no server
        default_only.write_text(f"default login alice password {SECRET}\n")
        for env, sent in (({"NETRC": str(tmp_path / "none")}, False),
                          ({"NETRC": str(default_only)}, False),
                          ({"NETRC": str(netrc)}, True)):
            relay.sent = bytearray()
            _identical(str(overlay), str(served.local("disk.raw")), *ALLOW, env=_env(env))
            assert (authorization in relay.sent) == sent
    finally:
        relay.close()


def test_a_login_typed_for_an_image_reaches_its_siblings_on_the_same_server(
        served: Served, serve: Callable[..., Nginx], tmp_path: Path):
    """The top's URL carries the login; its base is a relative name on the
    same server: the base is read with the same login (this run only), not
    with netrc's or none."""
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
                    "-u", str(top), str(IMAGE_SIZE)], check=True, capture_output=True)
    server = serve({"disk.qcow2": served.local("disk.qcow2"), "top.qcow2": top})
    relay = Relay(_free_port(), server.port)
    try:
        url = _with_credentials(relay.url("top.qcow2"))
        _identical(url, str(served.local("disk.raw")), env=_env({"NETRC": str(tmp_path / "none")}))
    finally:
        relay.close()
    token = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    requests = [block for block in bytes(relay.sent).split(b"\r\n\r\n") if block.strip()]
    of_base = [block for block in requests if b" /disk.qcow2 HTTP/" in block]
    assert of_base and all(f"\r\nAuthorization: Basic {token}".encode() in block
                           for block in of_base), of_base[:2]

"""A one-node Ceph cluster serving S3 (the RADOS Gateway) on loopback.

RGW is a real S3 implementation that runs offline, so the s3 driver meets the
ranged GETs, ETags, errors and multipart objects of a server it is meant for.
Everything lives under the test's directory: one monitor, one OSD keeping its
objects in memory (memstore), radosgw with the beast frontend, auth off.
Nothing is read from or written to /etc/ceph, /var/lib/ceph, /var/log/ceph or
/var/run/ceph. It starts in about a second.

Each daemon runs in a process group of its own, killed on the way out, and
with a parent-death signal, so that a run that ends abruptly (pytest-timeout
calls os._exit) leaves no daemons behind either.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import botocore.session
from botocore.client import BaseClient
from botocore.config import Config

from tests.remote.servers import LOOPBACK, _free_port

MiB = 1024 * 1024
GiB = 1024 * MiB
#: A cold CI machine; it takes about a second here.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: RGW answers SigV4 for any region name; this is the one clients default to.
REGION = "us-east-1"
USER = "test"
ACCESS_KEY = "corefmt-test-access-key"
SECRET_KEY = "corefmt-test-secret-key"
#: memstore's default of 1 GiB is too small for the big objects. It is a cap,
#: not an allocation: the OSD takes about twice the bytes stored, as they are
#: written. Past 95 % the OSD takes no writes, and a replaced or deleted
#: object's data goes only after RGW's garbage collection (seconds): 8 GiB
#: holds a 2 GiB object and its replacement, where 4 GiB did not.
MEMSTORE_BYTES = 8 * GiB
#: Files above this go up as a multipart upload, a part at a time from disk.
MULTIPART_THRESHOLD = 64 * MiB
PART_SIZE = 64 * MiB
#: What the fixture runs; Debian installs them in /usr/bin.
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "ceph", "radosgw-admin", "monmaptool")
SEARCH_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"
INSTALL_HINT = "(Debian: apt-get install radosgw ceph-mon ceph-osd ceph-common)"
MON_ID, OSD_ID, RGW_NAME = "a", "0", "client.rgw"
#: Environment variables of the caller's that would point the tools elsewhere.
CEPH_ENV_DROPPED = ("CEPH_ARGS", "CEPH_KEYRING")

#: Measured on 16.2.15, each left out in turn: without ms mon client mode =
#: crc RGW never comes up (a monitor's clients default to secure mode, which
#: needs cephx); without the paxos propose interval every map change waits a
#: second (11 s to start, not 0.7); without both pool size settings (3 and 2 on
#: one OSD) the placement groups never activate and RGW cannot make its pools.
#: The rest keeps the cluster small and quiet. mon data avail crit = 0: a
#: nearly full /tmp must not make the monitor shut itself down. The osd mon
#: shutdown timeout keeps an OSD whose monitor is gone from waiting 5 s.
CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = v2:{host}:{mon_port}
run dir = {base}/run
crash dir = {base}/crash
log file = {base}/log/$cluster-$name.log
mon cluster log file = {base}/log/$cluster.$channel.log
keyring = {base}/keyring
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr1 = false
ms mon client mode = crc
ms client mode = crc
ms cluster mode = crc
ms service mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 0
paxos propose interval = 0.01

[mon]
mon data = {base}/mon
admin socket = {base}/run/$cluster-$name.asok

[osd]
osd data = {base}/osd
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd mon shutdown timeout = 1
admin socket = {base}/run/$cluster-$name.asok

[{rgw_name}]
rgw frontends = beast endpoint={host}:{rgw_port} tcp_nodelay=1
rgw data = {base}/rgw
admin socket = {base}/run/$cluster-$name.asok
# A deleted object's data goes within seconds, not after two hours: the
# memstore fills up otherwise in tests that replace big objects.
rgw gc obj min wait = 0
rgw gc processor period = 5
rgw dynamic resharding = false
# A full OSD holds writes until there is room: without a timeout an upload
# then hangs for good; with one RGW answers 408 RequestTimeout.
rados osd op timeout = 10
"""

#: botocore 1.36+ adds a CRC32 to every upload by default: one more pass over
#: each part (RGW 16.2 takes the header over http; over https it would be an
#: aws-chunked trailer, which older RGWs refuse). Only where botocore has it.
CHECKSUMS_WHEN_REQUIRED = {
    option: "when_required"
    for option in ("request_checksum_calculation", "response_checksum_validation")
    if option in Config.OPTION_DEFAULTS
}


def _binary(name: str) -> str | None:
    """The daemons may live in sbin, which a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=SEARCH_PATH)


def ceph_available() -> str | None:
    """None when the cluster can be started, else why a test must skip."""
    missing = [name for name in BINARIES if _binary(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed {INSTALL_HINT}"
    return None


def _pdeathsig() -> list[str]:
    """A prefix that kills the command when the thread that started it ends
    (util-linux's setpriv, in every Debian); nothing without it."""
    setpriv = _binary("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Window(io.RawIOBase):
    """``length`` bytes of a file from ``offset``: botocore hashes a part for
    SigV4, seeks back and sends it, without the part ever held in memory."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._position = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        start = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, start + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = min(len(buffer), self._length - self._position)
        if count <= 0:
            return 0
        done = os.preadv(self._fd, [memoryview(buffer)[:count]], self._offset + self._position)
        self._position += done
        return done


class _Cluster:
    """The daemons of one cluster under ``base``, and its command-line tools."""

    def __init__(self, base: Path, memstore_bytes: int) -> None:
        self.base = base
        self.conf = base / "ceph.conf"
        self.logs = base / "log"
        self.memstore_bytes = memstore_bytes
        self.rgw_port = 0
        #: Started order: stopped in reverse (an OSD says goodbye to its monitor).
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {name: value for name, value in os.environ.items()
                    if name not in CEPH_ENV_DROPPED} | {"CEPH_CONF": str(self.conf)}
        # The parent-death signal follows the thread that forked: daemons are
        # forked from this one, which lives as long as the cluster, so a test
        # may restart radosgw from a thread of its own that then ends.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="ceph-spawner")

    def start(self) -> None:
        for directory in ("mon", "osd", "rgw", "run", "log", "crash"):
            (self.base / directory).mkdir(parents=True, exist_ok=True)
        mon_port = _free_port()
        self.rgw_port = _free_port()
        while self.rgw_port == mon_port:
            self.rgw_port = _free_port()
        fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
        self.conf.write_text(CEPH_CONF.format(
            fsid=fsid, host=LOOPBACK, mon_port=mon_port, rgw_port=self.rgw_port,
            base=self.base, memstore_bytes=self.memstore_bytes, rgw_name=RGW_NAME))
        monmap = self.base / "monmap"
        self.tool("monmaptool", "--create", "--fsid", fsid, "--addv", MON_ID,
                  f"[v2:{LOOPBACK}:{mon_port}]", str(monmap))
        self.tool("ceph-mon", "--mkfs", "-i", MON_ID, "--monmap", str(monmap))
        self.spawn("mon", "ceph-mon", "-i", MON_ID)
        self._wait("mon", lambda: _listening(mon_port))
        self.tool("ceph", "osd", "new", osd_uuid, OSD_ID)
        self.tool("ceph-osd", "--mkfs", "-i", OSD_ID, "--osd-uuid", osd_uuid)
        self.spawn("osd", "ceph-osd", "-i", OSD_ID)
        self.start_rgw()
        self.tool("radosgw-admin", "user", "create", f"--uid={USER}", f"--display-name={USER}",
                  f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}")

    def start_rgw(self) -> None:
        """radosgw on the port it had; it is up once it answers HTTP. A no-op
        while it runs, so a test's ``finally`` may start it unconditionally."""
        running = self.processes.get("rgw")
        if running is not None and running.poll() is None:
            return
        self.stop("rgw")  # reaps one that died
        self.spawn("rgw", "radosgw", "-n", RGW_NAME)
        self._wait("rgw", lambda: _answers_http(self.rgw_port))

    def tool(self, name: str, *args: str) -> str:
        binary = _binary(name)
        assert binary is not None, name
        try:
            result = subprocess.run(
                [*_pdeathsig(), binary, "-c", str(self.conf), *args], stdin=subprocess.DEVNULL,
                capture_output=True, text=True, env=self.env, timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} {' '.join(args)} timed out{self._exited()}") from None
        if result.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}{self._exited()}")
        return result.stdout

    def spawn(self, name: str, binary: str, *args: str) -> None:
        """Runs a daemon in the foreground (-f), in a process group of its own."""
        path = _binary(binary)
        assert path is not None, binary
        with open(self.logs / f"{name}.out", "ab") as output:
            self.processes[name] = self._spawner.submit(
                subprocess.Popen, [*_pdeathsig(), path, "-f", "-c", str(self.conf), *args],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True).result()

    def stop(self, name: str) -> None:
        """SIGTERM to the daemon's group, SIGKILL if it lingers; reaped either way."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        try:
            for name in reversed(list(self.processes)):
                self.stop(name)
        finally:
            self._spawner.shutdown()

    def _exited(self) -> str:
        """What a daemon that died said last, to explain a failure."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = self.logs / f"{name}.out"
                return f"\n{name} exited ({process.returncode}):\n{_tail(log)}"
        return ""

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            exited = self._exited()
            if exited:
                raise RuntimeError(f"ceph {name} did not start:{exited}")
            if ready():
                return
            time.sleep(0.02)
        raise RuntimeError(f"ceph {name} did not start in {START_TIMEOUT:.0f} s: see {self.logs}")


def _listening(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), 1).close()
    except OSError:
        return False
    return True


def _answers_http(port: int) -> bool:
    """Any answer will do: RGW listens only once it can reach its pools."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return True


@dataclass
class Rgw:
    """The gateway of a running cluster, and an S3 user's keys for it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    _cluster: _Cluster = field(repr=False)

    @cached_property
    def client(self) -> BaseClient:
        """botocore's S3 client for the user: SigV4, path-style addressing."""
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                        retries={"mode": "standard", "max_attempts": 3},
                        **CHECKSUMS_WHEN_REQUIRED)
        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=config)

    def env(self) -> dict[str, str]:
        """What a CLI subprocess needs to reach the gateway as the user."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region}

    def create_bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, source: Path | bytes) -> None:
        """Uploads bytes or a file; a file above MULTIPART_THRESHOLD goes up
        in parts streamed from disk (objects of GiBs never sit in memory)."""
        if isinstance(source, bytes | bytearray | memoryview):
            self.client.put_object(Bucket=bucket, Key=key, Body=bytes(source))
            return
        size = Path(source).stat().st_size
        with open(source, "rb") as stream:
            if size <= MULTIPART_THRESHOLD:
                self.client.put_object(Bucket=bucket, Key=key, Body=stream, ContentLength=size)
            else:
                self._put_parts(bucket, key, stream, size)

    def _put_parts(self, bucket: str, key: str, stream: BinaryIO, size: int) -> None:
        upload = self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                length = min(PART_SIZE, size - offset)
                answer = self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                    Body=_Window(stream.fileno(), offset, length), ContentLength=length)
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            # No orphaned parts filling the memstore.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
            raise

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def stop_rgw(self) -> None:
        """The server goes away (connections refused); the objects stay in the OSD."""
        self._cluster.stop("rgw")

    def start_rgw(self) -> None:
        self._cluster.start_rgw()

    def restart_rgw(self) -> None:
        self.stop_rgw()
        self.start_rgw()


@contextlib.contextmanager
def ceph_rgw(base: Path, memstore_bytes: int = MEMSTORE_BYTES) -> Iterator[Rgw]:
    """A cluster under ``base`` (a pytest tmp dir) until the block ends; its
    daemons are killed and reaped even if the block or the start-up fails."""
    cluster = _Cluster(base, memstore_bytes)
    try:
        cluster.start()
        yield Rgw(f"http://{LOOPBACK}:{cluster.rgw_port}", ACCESS_KEY, SECRET_KEY, REGION,
                  cluster)
    finally:
        cluster.stop_all()

"""Loopback HTTP servers for the remote storage tests.

``Nginx`` is the real server the drivers are meant for, run as the current
user under a prefix of its own. ``ScriptedServer`` is a small http.server
whose misbehaviour the test chooses (errors before success, no ranges, an
object swapped without honouring If-Range, a body cut short), which nginx
cannot be told to do.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


def nginx_binary() -> str | None:
    """nginx lives in sbin, which a user's PATH may lack."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError("nginx did not start listening")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
{redirects}{limit}    }}
{tls}}}
"""
#: A second server block for https, when the fixture made a certificate.
NGINX_TLS_SERVER = """\
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        root {root};
        location /insecure/ {{ rewrite ^/insecure/(.*)$ http://{host}:{http_port}/$1 redirect; }}
    }}
"""
#: Redirecting places on the http port: /moved/NAME (301) and /found/NAME
#: (302) lead to NAME, /loop/NAME to itself, /to-tls/NAME to the https port.
NGINX_REDIRECTS = """\
        location /moved/ {{ rewrite ^/moved/(.*)$ /$1 permanent; }}
        location /found/ {{ rewrite ^/found/(.*)$ /$1 redirect; }}
        location /loop/ {{ return 302 $uri; }}
        location /to-tls/ {{ rewrite ^/to-tls/(.*)$ https://{host}:{tls_port}/$1 permanent; }}
"""
#: A self-signed certificate for 127.0.0.1 (an EC key: made in milliseconds).
OPENSSL_SELF_SIGNED = ("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                       "-nodes", "-days", "1", "-subj", f"/CN={LOOPBACK}",
                       "-addext", f"subjectAltName=IP:{LOOPBACK}")


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """(certificate, key) made by openssl, or None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    certificate, key = directory / "server.crt", directory / "server.key"
    subprocess.run([openssl, *OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out",
                    str(certificate)], check=True, capture_output=True)
    return certificate, key


@dataclass
class Nginx:
    """nginx serving ``root`` on a loopback port until stopped."""

    prefix: Path
    root: Path
    port: int = 0
    #: The https port, when ``certificate`` (certificate, key) is given.
    certificate: tuple[Path, Path] | None = None
    tls_port: int = 0
    #: nginx's ``limit_rate`` for each answer on the http port (``"32m"``: bytes
    #: per second), so that a long transfer can be caught in the middle.
    limit_rate: str | None = None
    process: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{name}"

    def tls_url(self, name: str) -> str:
        return f"https://{LOOPBACK}:{self.tls_port}/{name}"

    def start(self, port: int | None = None) -> None:
        """Listen on ``port`` (a restart passes the one it had, so URLs
        recorded in images stay valid), else on a free one."""
        binary = nginx_binary()
        assert binary is not None
        # As root, workers would switch to "nobody", who cannot enter pytest's
        # private temp dirs: they run as the current user instead.
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
                if os.geteuid() == 0 else "")
        self.port = port or _free_port()
        tls = ""
        if self.certificate is not None:
            self.tls_port = _free_port()
            tls = NGINX_TLS_SERVER.format(host=LOOPBACK, port=self.tls_port, root=self.root,
                                          certificate=self.certificate[0],
                                          key=self.certificate[1], http_port=self.port)
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, prefix=self.prefix, host=LOOPBACK,
                                          port=self.port, root=self.root, tls=tls,
                                          redirects=NGINX_REDIRECTS.format(
                                              host=LOOPBACK, tls_port=self.tls_port),
                                          limit=(f"        limit_rate {self.limit_rate};\n"
                                                 if self.limit_rate else "")))
        log = self.prefix / "error.log"
        self.process = subprocess.Popen(
            [binary, "-p", str(self.prefix), "-e", str(log), "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.port, self.process, log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def nginx_serving(base: Path) -> Iterator[Nginx]:
    prefix, root = base / "nginx", base / "root"
    prefix.mkdir()
    root.mkdir(exist_ok=True)
    server = Nginx(prefix, root, certificate=make_certificate(prefix))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Script:
    """What the scripted server does; tests change it while it runs."""

    content: bytes = b""
    etag: str = '"v1"'
    #: Answer this many requests (of any kind) with ``error_status`` first.
    fail_first: int = 0
    error_status: int = 503
    fail_always: bool = False
    ranges: bool = True
    #: Cut this many GET bodies off halfway (then close the connection).
    truncate_bodies: int = 0
    requests: list[str] = field(default_factory=list)
    #: The If-Range header of each request (None where there was none).
    if_ranges: list[str | None] = field(default_factory=list)
    #: The Authorization header of each request (None where there was none).
    authorizations: list[str | None] = field(default_factory=list)
    #: Answer every request with a redirect to this URL instead.
    redirect: str | None = None
    redirect_status: int = 302
    #: The status of every HEAD, where it is not the usual 200.
    head_status: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def replace(self, content: bytes, etag: str) -> None:
        with self.lock:
            self.content, self.etag = content, etag


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest shows what matters

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            with script.lock:
                script.requests.append(f"{self.command} {self.headers.get('Range', '')}")
                script.if_ranges.append(self.headers.get("If-Range"))
                script.authorizations.append(self.headers.get("Authorization"))
                redirect, head_status = script.redirect, script.head_status
                failing = script.fail_always or script.fail_first > 0
                if script.fail_first > 0:
                    script.fail_first -= 1
                content, etag = script.content, script.etag
                cut = body and script.truncate_bodies > 0
                if cut:
                    script.truncate_bodies -= 1
            if redirect is not None or (head_status is not None and not body):
                self.send_response(script.redirect_status if redirect is not None
                                   else head_status)
                if redirect:
                    self.send_header("Location", redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if failing:
                self.send_response(script.error_status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            # If-Range is ignored on purpose: a replaced object then arrives
            # as a 206 that only the ETag tells apart.
            wanted = RANGE.match(self.headers.get("Range", "")) if script.ranges else None
            if wanted:
                start, end = int(wanted.group(1)), min(int(wanted.group(2)), len(content) - 1)
                payload = content[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            else:
                payload = content
                self.send_response(200)
            if script.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not body:
                return
            if cut:
                self.wfile.write(payload[:len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def scripted_server(script: Script) -> Iterator[str]:
    """Serves ``script`` on a loopback port; yields the URL of its object."""
    server = ThreadingHTTPServer((LOOPBACK, 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}/disk"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

"""TLS on the NBD export (--object tls-creds-x509 / --tls-creds): the spec's
FORCEDTLS negotiation through the raw client, real TLS clients (qemu-io,
qemu-img, nbdinfo) and, where it shows parity, real qemu-nbd next to ours.

The certificates are made at test time with the openssl CLI."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corefmt.nbd
from corefmt.cli.main import main
from corefmt.nbd import protocol as p
from corefmt.nbd.protocol import Command, Info, Option, Reply
from corefmt.nbd.tls import server_context
from tests.nbd.conftest import IMAGE_SIZE, MiB, expected_bytes
from tests.nbd.nbd_client import Client, info_data

TOOLS = ("openssl", "nbdinfo", "qemu-img", "qemu-io", "qemu-nbd")
pytestmark = pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                                reason="needs openssl, nbdinfo (libnbd-bin), qemu-utils")
TIMEOUT = 30
HOST = "127.0.0.1"
TLS_REQD_GO = "server reported: Option 0x7 not permitted before TLS"


# -- certificates -----------------------------------------------------------------
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                   timeout=TIMEOUT)


def make_ca(where: Path, name: str) -> tuple[Path, Path]:
    key, cert = where / f"{name}-key.pem", where / f"{name}-cert.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(key), cwd=where)
    openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    return key, cert


def make_leaf(where: Path, ca: tuple[Path, Path], role: str, out: Path) -> None:
    """``out``/ROLE-cert.pem and ROLE-key.pem, signed by ``ca``, with the key
    usages qemu's sanity check (GnuTLS) wants of a server or a client."""
    usage, names = (("serverAuth", "DNS:localhost,IP:127.0.0.1") if role == "server"
                    else ("clientAuth", "DNS:client"))
    key, csr, ext = out / f"{role}-key.pem", where / f"{role}.csr", where / f"{role}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName={names}\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(key), cwd=where)
    openssl("req", "-new", "-key", str(key), "-subj", f"/O=corefmt/CN={role}", "-out",
            str(csr), cwd=where)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
            "-set_serial", str(time.time_ns()), "-days", "2", "-extfile", str(ext),
            "-out", str(out / f"{role}-cert.pem"), cwd=where)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Directories in qemu's layout: good (CA, server and client pairs), nocert
    (only the CA), rogue (the CA, a client pair from another CA), wrongca
    (another CA, the good client pair: the server is not trusted), crl (the
    server's files and a ca-crl.pem revoking good's client), second (the
    CA and another client pair, not revoked)."""
    root = tmp_path_factory.mktemp("pki")
    dirs = {name: root / name for name in ("good", "nocert", "rogue", "wrongca", "crl",
                                           "second")}
    for path in dirs.values():
        path.mkdir()
    ca, other = make_ca(root, "ca"), make_ca(root, "other-ca")
    make_leaf(root, ca, "server", dirs["good"])
    make_leaf(root, ca, "client", dirs["good"])
    make_leaf(root, other, "client", dirs["rogue"])
    make_leaf(root, ca, "client", dirs["second"])
    for name in ("good", "nocert", "rogue", "second", "crl"):
        shutil.copy(ca[1], dirs[name] / "ca-cert.pem")
    shutil.copy(other[1], dirs["wrongca"] / "ca-cert.pem")
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(dirs["good"] / name, dirs["wrongca"] / name)
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(dirs["good"] / name, dirs["crl"] / name)
    (root / "index.txt").touch()
    (root / "ca.cnf").write_text("[ca]\ndefault_ca = ca\ndatabase = index.txt\n"
                                 "default_md = sha256\ndefault_crl_days = 2\n")
    signing = ("-config", "ca.cnf", "-keyfile", str(ca[0]), "-cert", str(ca[1]))
    openssl("ca", *signing, "-revoke", str(dirs["good"] / "client-cert.pem"), cwd=root)
    openssl("ca", *signing, "-gencrl", "-out", str(dirs["crl"] / "ca-crl.pem"), cwd=root)
    return dirs


def client_context(directory: Path, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(directory / "ca-cert.pem"))
    if certificate:
        context.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return context


# -- helpers ------------------------------------------------------------------------------
def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)}: {result.stderr}")
    return result


def creds(directory: Path, endpoint: str = "client", extra: str = "") -> str:
    return f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint}{extra}"


def qemu_client(tool: str, directory: Path | None, port: int, *args: str,
                check: bool = True) -> subprocess.CompletedProcess:
    """qemu-img/qemu-io on the export at HOST:port, with TLS if ``directory``."""
    spec = f"driver=nbd,server.type=inet,server.host={HOST},server.port={port}"
    objects: tuple[str, ...] = ()
    if directory is not None:
        objects, spec = ("--object", creds(directory)), spec + ",tls-creds=tls0"
    if tool == "qemu-img":
        return run(tool, args[0], *objects, "--image-opts", spec, *args[1:], check=check)
    return run(tool, *objects, "--image-opts", spec, *args, check=check)


def nbdinfo_tls(port: int, directory: Path, *args: str, check: bool = True):
    return run("nbdinfo", *args, f"nbds://{HOST}:{port}/?tls-certificates={directory}",
               check=check)


@contextlib.contextmanager
def ours(image: Path, directory: Path, **options) -> Iterator[int]:
    options.setdefault("tls", server_context(str(directory)))
    with corefmt.nbd.serving(str(image), "raw", **options) as server:
        yield server.port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def qemu_nbd(image: Path, directory: Path, extra: str = "") -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-b", HOST, "-p", str(port),
                                "--object", creds(directory, "server", extra),
                                "--tls-creds", "tls0", str(image)],
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            with socket.socket() as probe:
                if probe.connect_ex((HOST, port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def tls_client(port: int, directory: Path, certificate: bool = True) -> Client:
    """A raw client that has negotiated STARTTLS and finished the handshake."""
    client = Client((HOST, port))
    client.greeting()
    client.option(Option.NBD_OPT_STARTTLS)
    assert client.replies() == [(Reply.NBD_REP_ACK, b"")]
    client.sock = client_context(directory, certificate).wrap_socket(
        client.sock, server_hostname=HOST)
    return client


# -- negotiation through the raw client ----------------------------------------------
def test_options_before_starttls_are_answered_tls_reqd(raw_image, pki):
    with ours(raw_image, pki["good"]) as port:
        with Client((HOST, port)) as client:
            client.greeting()
            for option, data in ((Option.NBD_OPT_LIST, b""),
                                 (Option.NBD_OPT_STRUCTURED_REPLY, b""),
                                 (Option.NBD_OPT_INFO, info_data("", [])),
                                 (Option.NBD_OPT_GO, info_data("", [Info.NBD_INFO_NAME])),
                                 (99, b"x")):
                client.option(option, data)
                assert client.replies() == [(
                    Reply.NBD_REP_ERR_TLS_REQD,
                    f"Option {int(option):#x} not permitted before TLS".encode())]
            client.option(Option.NBD_OPT_STARTTLS, b"junk")
            assert client.replies()[0][0] == Reply.NBD_REP_ERR_INVALID
            client.option(Option.NBD_OPT_ABORT)  # the spec: ACK, even before TLS
            assert client.replies() == [(Reply.NBD_REP_ACK, b"")]
            assert client.closed_by_server()
        with Client((HOST, port)) as client:  # EXPORT_NAME cannot be refused: hard close
            client.greeting()
            client.option(Option.NBD_OPT_EXPORT_NAME, b"")
            assert client.closed_by_server()
        with Client((HOST, port)) as client:  # TLS needs fixed newstyle
            client.greeting(client_flags=0)
            assert client.closed_by_server()
        with tls_client(port, pki["good"]) as client:  # and the server goes on serving
            client.option(Option.NBD_OPT_LIST)
            assert client.replies()[-1][0] == Reply.NBD_REP_ACK


def test_starttls_twice_is_refused_and_options_then_work(raw_image, pki):
    with ours(raw_image, pki["good"]) as port, tls_client(port, pki["good"]) as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.option(Option.NBD_OPT_STARTTLS)
        assert client.replies() == [(Reply.NBD_REP_ERR_INVALID, b"TLS already enabled")]
        client.option(Option.NBD_OPT_LIST)
        (server_reply, name), ack = client.replies()
        assert server_reply == Reply.NBD_REP_SERVER and ack[0] == Reply.NBD_REP_ACK
        assert name == p.string_with_length("")
        client.option(Option.NBD_OPT_STRUCTURED_REPLY)
        assert client.replies() == [(Reply.NBD_REP_ACK, b"")]
        client.option(Option.NBD_OPT_GO, info_data("", []))
        assert client.replies()[-1][0] == Reply.NBD_REP_ACK
        # requests in flight at once: replies are sent by several worker threads
        payload = bytes(range(256)) * 256
        handles = [client.request(Command.NBD_CMD_WRITE, 2 * MiB + i * len(payload),
                                  len(payload), data=payload) for i in range(8)]
        assert sorted(client.any_reply()[:2] for _ in handles) == [(h, 0) for h in handles]
        for offset in range(0, IMAGE_SIZE, MiB):
            client.request(Command.NBD_CMD_READ, offset, MiB)
        data = bytearray(IMAGE_SIZE)
        for _ in range(IMAGE_SIZE // MiB):
            _, error, chunks = client.any_reply()
            assert not error
            for kind, body in chunks:
                if kind == p.ReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
                    start = p.OFFSET.unpack(body[:8])[0]
                    data[start:start + len(body) - 8] = body[8:]
        expected = bytearray(expected_bytes())
        expected[2 * MiB:2 * MiB + 8 * len(payload)] = payload * 8
        assert data == expected
        client.disconnect()


def test_without_tls_configured_starttls_is_policy(raw_image):
    with corefmt.nbd.serving(str(raw_image), "raw") as server, \
            Client((HOST, server.port)) as client:
        client.greeting()
        client.option(Option.NBD_OPT_STARTTLS)
        assert client.replies()[0][0] == Reply.NBD_REP_ERR_POLICY
        client.option(Option.NBD_OPT_LIST)  # and no TLS_REQD for anything
        assert client.replies()[-1][0] == Reply.NBD_REP_ACK


def test_stalled_tls_handshake_is_dropped_at_the_handshake_limit(raw_image, pki):
    with ours(raw_image, pki["good"], handshake_limit=0.5) as port, \
            Client((HOST, port)) as client:
        client.greeting()
        client.option(Option.NBD_OPT_STARTTLS)
        assert client.replies() == [(Reply.NBD_REP_ACK, b"")]
        # a ClientHello record header, then a byte at a time: the limit still holds
        client.sock.sendall(b"\x16\x03\x01\x02\x00")
        client.sock.settimeout(0.1)
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 5:
            try:
                client.sock.sendall(b"\x00")
                closed = client.sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:  # reset, broken pipe
                closed = True
        assert closed and time.monotonic() - start < 3


def test_client_certificates_with_verify_peer(raw_image, pki):
    with ours(raw_image, pki["good"]) as port:
        for directory, certificate in ((pki["nocert"], False), (pki["rogue"], True)):
            with pytest.raises((ssl.SSLError, OSError, EOFError)), \
                    tls_client(port, directory, certificate) as client:
                client.option(Option.NBD_OPT_LIST)
                client.replies()
        with tls_client(port, pki["good"]) as client:
            client.option(Option.NBD_OPT_LIST)
            assert client.replies()[-1][0] == Reply.NBD_REP_ACK
    relaxed = server_context(str(pki["good"]), verify_peer=False)
    with ours(raw_image, pki["good"], tls=relaxed) as port, \
            tls_client(port, pki["nocert"], certificate=False) as client:
        client.option(Option.NBD_OPT_LIST)
        assert client.replies()[-1][0] == Reply.NBD_REP_ACK


# -- real clients -------------------------------------------------------------------------
@pytest.mark.interop
def test_qemu_io_and_qemu_img_round_trip_over_tls(raw_image, pki, tmp_path):
    good = pki["good"]
    with ours(raw_image, good) as port:
        written = qemu_client("qemu-io", good, port, "-c", "write -P 0x5a 512k 64k",
                              "-c", "read -P 0x5a 512k 64k", "-c", "read -P 0xaa 0 64k")
        assert "read 65536/65536" in written.stdout and "Pattern" not in written.stdout
        info = qemu_client("qemu-img", good, port, "info")
        assert f"({IMAGE_SIZE} bytes)" in info.stdout
        copy = tmp_path / "copy.raw"
        qemu_client("qemu-img", good, port, "convert", "-O", "raw", str(copy))
        assert nbdinfo_tls(port, good, "--size").stdout.strip() == str(IMAGE_SIZE)
    expected = bytearray(expected_bytes())
    expected[512 * 1024:576 * 1024] = b"\x5a" * 65536
    assert copy.read_bytes() == expected
    assert raw_image.read_bytes() == expected


@pytest.mark.interop
def test_nbdinfo_over_a_tls_unix_socket(raw_image, pki, tmp_path):
    sock = tmp_path / "s"
    tls = server_context(str(pki["good"]))
    with corefmt.nbd.serving(str(raw_image), "raw", read_only=True, unix_socket=str(sock),
                             tls=tls) as server:
        assert server.address == f"nbds+unix:///?socket={sock}"
        info = run("nbdinfo", f"{server.address}&tls-certificates={pki['good']}").stdout
    assert "with TLS" in info and f"export-size: {IMAGE_SIZE}" in info


@pytest.mark.interop
def test_plain_clients_are_refused_like_qemu_nbd_refuses_them(raw_image, pki):
    results = []
    for server in (qemu_nbd, ours):
        with server(raw_image, pki["good"]) as port:
            plain = qemu_client("qemu-img", None, port, "info", check=False)
            listing = run("nbdinfo", "--list", f"nbd://{HOST}:{port}/", check=False)
            go = run("nbdinfo", f"nbd://{HOST}:{port}/", check=False)
            still = qemu_client("qemu-img", pki["good"], port, "info")  # serving goes on
            results.append((plain.returncode, plain.stderr.splitlines()[-1],
                            listing.returncode != 0, go.returncode != 0,
                            f"({IMAGE_SIZE} bytes)" in still.stdout))
    assert results[0] == results[1] == (1, TLS_REQD_GO, True, True, True)


@pytest.mark.interop
def test_certificate_refusals_like_qemu_nbd(raw_image, pki):
    results = []
    for server in (qemu_nbd, ours):
        with server(raw_image, pki["good"]) as port:
            outcome = [qemu_client("qemu-img", pki[name], port, "info", check=False).returncode
                       for name in ("nocert", "rogue", "wrongca", "good")]
            outcome += [nbdinfo_tls(port, pki[name], "--size", check=False).returncode
                        for name in ("nocert", "rogue", "wrongca", "good")]
            results.append(outcome)
    assert results[0] == results[1] == [1, 1, 1, 0, 1, 1, 1, 0]
    # verify-peer=off: a client without a certificate is let in, by both
    for server in (qemu_nbd, ours):
        options = ({"extra": ",verify-peer=off"} if server is qemu_nbd else
                   {"tls": server_context(str(pki["good"]), verify_peer=False)})
        with server(raw_image, pki["good"], **options) as port:
            assert qemu_client("qemu-img", pki["nocert"], port, "info").returncode == 0


@pytest.mark.interop
def test_revoked_client_certificate_refused_like_qemu_nbd(raw_image, pki):
    results = []
    for server in (qemu_nbd, ours):
        with server(raw_image, pki["crl"]) as port:
            results.append([qemu_client("qemu-img", pki[name], port, "info",
                                        check=False).returncode
                            for name in ("good", "second")])
    assert results[0] == results[1] == [1, 0]


# -- the command line ---------------------------------------------------------------------
@pytest.mark.interop
def test_cli_serves_tls_clients(raw_image, pki, tmp_path):
    sock = tmp_path / "s"
    process = subprocess.Popen([sys.executable, "-m", "corefmt.cli.main", "nbd", "-r", "-t",
                                "-f", "raw", "-k", str(sock), "--object",
                                creds(pki["good"], "server"), "--tls-creds", "tls0",
                                str(raw_image)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.02)
        plain = run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}", check=False)
        assert plain.returncode != 0
        size = run("nbdinfo", "--size",
                   f"nbds+unix:///?socket={sock}&tls-certificates={pki['good']}")
        assert size.stdout.strip() == str(IMAGE_SIZE)
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def cli_error(capsys, *args: str) -> tuple[int, str]:
    code = main(["nbd", *args])
    return code, capsys.readouterr().err


def qemu_nbd_error(*args: str) -> tuple[int, str]:
    result = run("qemu-nbd", *args, check=False)
    return result.returncode, result.stderr.replace("qemu-nbd: ", "corefmt: ")


@pytest.mark.interop
@pytest.mark.parametrize("case", ["no-dir", "no-ca", "no-key", "unknown-id", "client",
                                  "verify-peer", "no-id", "unknown-key", "duplicate"])
def test_cli_credential_errors_match_qemu_nbd(case, raw_image, pki, tmp_path, capsys):
    good = pki["good"]
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        shutil.copy(good / name, keyless / name)
    one = creds(good, "server")
    args = {
        "no-dir": ["--object", creds(tmp_path / "missing", "server"), "--tls-creds", "tls0"],
        "no-ca": ["--object", creds(tmp_path, "server"), "--tls-creds", "tls0"],
        "no-key": ["--object", creds(keyless, "server"), "--tls-creds", "tls0"],
        "unknown-id": ["--object", one, "--tls-creds", "tls1"],
        "client": ["--object", creds(good), "--tls-creds", "tls0"],
        "verify-peer": ["--object", one + ",verify-peer=maybe", "--tls-creds", "tls0"],
        "no-id": ["--object", f"tls-creds-x509,dir={good}", "--tls-creds", "tls0"],
        "unknown-key": ["--object", one + ",colour=red", "--tls-creds", "tls0"],
        "duplicate": ["--object", one, "--object", one, "--tls-creds", "tls0"],
    }[case]
    args += ["-f", "raw", "-k", str(tmp_path / "never"), str(raw_image)]
    code, message = cli_error(capsys, *args)
    assert (code, message) == qemu_nbd_error(*args)
    assert code == 1 and message.count("\n") == 1

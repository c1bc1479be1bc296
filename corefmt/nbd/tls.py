"""TLS for the NBD server: qemu's x509 credentials and a thread-safe channel.

Credentials come the way qemu-nbd takes them (``--object
tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]``): DIR
holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``; with
verify-peer (qemu's default) a client must present a certificate that the
CA signed (and that ``ca-crl.pem``, if there is one, does not revoke).

The channel runs OpenSSL over memory buffers instead of wrapping the socket:
a connection reads requests on one thread while workers send replies, and
one OpenSSL connection must not be used by two threads at once. Every
OpenSSL call is made under one lock, and the ciphertext it produced is sent
in the order it was produced.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time

import attrs

from corefmt.errors import CorefmtError

#: The object type and the file names qemu's tls-creds-x509 looks for in dir.
X509_TYPE = "tls-creds-x509"
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
#: Optional, as in qemu: certificates the CA revoked.
CA_CRL = "ca-crl.pem"
ENDPOINT_SERVER, ENDPOINT_CLIENT = "server", "client"
#: qemu's boolean spellings.
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")
_X509_KEYS = ("qom-type", "id", "dir", "endpoint", "verify-peer")
#: Plaintext is encrypted in pieces of this size, so a 32 MiB read reply does
#: not sit in memory twice; and ciphertext is read from the socket in these.
CHUNK = 256 * 1024
RECV_SIZE = 64 * 1024


@attrs.frozen
class X509Credentials:
    """One ``tls-creds-x509`` object (qemu's defaults: client endpoint, verify-peer on)."""

    id: str
    directory: str
    endpoint: str = ENDPOINT_CLIENT
    verify_peer: bool = True

    @classmethod
    def parse(cls, text: str) -> X509Credentials:
        """From an ``--object`` argument, with qemu's messages for what is wrong."""
        fields = _split_options(text)
        if fields.get("qom-type") != X509_TYPE:
            raise CorefmtError(f"Parameter 'qom-type' does not accept value "
                               f"'{fields.get('qom-type', '')}'")
        for key in fields:
            if key not in _X509_KEYS:
                raise CorefmtError(f"Parameter '{key}' is unexpected")
        if "id" not in fields:
            raise CorefmtError("Parameter 'id' is missing")
        endpoint = fields.get("endpoint", ENDPOINT_CLIENT)
        if endpoint not in (ENDPOINT_SERVER, ENDPOINT_CLIENT):
            raise CorefmtError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        verify = fields.get("verify-peer", "on")
        if verify not in _TRUE + _FALSE:
            raise CorefmtError("Parameter 'verify-peer' expects 'on' or 'off'")
        if not fields.get("dir"):
            raise CorefmtError("Missing 'dir' property value")
        return cls(fields["id"], fields["dir"], endpoint, verify in _TRUE)

    def check_files(self) -> None:
        """Fail as qemu does when the object is created: a required file is missing."""
        names = [CA_CERT] + ([SERVER_CERT, SERVER_KEY] if self.endpoint == ENDPOINT_SERVER
                             else [])
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                os.stat(path)
            except OSError as error:
                raise CorefmtError(f"Unable to access credentials {path}: "
                                   f"{error.strerror}") from None

    def server_context(self) -> ssl.SSLContext:
        if self.endpoint != ENDPOINT_SERVER:
            raise CorefmtError("Failed to get TLS creds: Expected TLS credentials for a "
                               "server endpoint")
        return server_context(self.directory, verify_peer=self.verify_peer)


def _split_options(text: str) -> dict[str, str]:
    """qemu's ``type,key=value,...`` with ``,,`` for a comma inside a value."""
    parts, current, index = [], "", 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1:index + 2] == ",":
                current += ","
                index += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[index]
        index += 1
    parts.append(current)
    fields = {"qom-type": parts[0]}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        fields[key] = value
    return fields


def server_context(directory: str, *, verify_peer: bool = True) -> ssl.SSLContext:
    """A server context from qemu's file names in ``directory``: TLS 1.2 or
    later, no renegotiation; with ``verify_peer`` clients need a certificate
    signed by ``ca-cert.pem`` and not revoked by ``ca-crl.pem`` if present."""
    X509Credentials("", directory, ENDPOINT_SERVER).check_files()
    ca, cert, key = (os.path.join(directory, name) for name in (CA_CERT, SERVER_CERT,
                                                                SERVER_KEY))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the protocol's floor
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as error:
        raise CorefmtError(f"Unable to import CA certificate {ca}: {_reason(error)}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise CorefmtError(f"Cannot load certificate '{cert}' & key '{key}': "
                           f"{_reason(error)}") from None
    crl = os.path.join(directory, CA_CRL)
    if os.path.exists(crl):
        try:
            context.load_verify_locations(cafile=crl)
        except (ssl.SSLError, ValueError) as error:
            raise CorefmtError(f"Unable to import CRL {crl}: {_reason(error)}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return context


def _reason(error: Exception) -> str:
    return getattr(error, "reason", None) or str(error)


def credentials(objects: list[str], creds_id: str | None) -> ssl.SSLContext | None:
    """The server context for ``--tls-creds ID`` among the ``--object``s
    (every x509 object is checked, as qemu creates each one)."""
    found: dict[str, X509Credentials] = {}
    for text in objects:
        creds = X509Credentials.parse(text)
        if creds.id in found:
            raise CorefmtError(f"attempt to add duplicate property '{creds.id}' to object "
                               "(type 'container')")
        creds.check_files()
        found[creds.id] = creds
    if creds_id is None:
        return None
    if creds_id not in found:
        raise CorefmtError(f"Failed to get TLS creds: No TLS credentials with id "
                           f"'{creds_id}'")
    return found[creds_id].server_context()


class TlsChannel:
    """A server-side TLS session over a connected socket, with the socket
    methods the NBD connection uses. One thread may read while others send."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self.sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._tls_lock = threading.Lock()   # every call into OpenSSL
        self._wire_lock = threading.Lock()  # ciphertext onto the socket, in order

    def _flush_and_release(self) -> None:
        """Send what OpenSSL produced; called holding the TLS lock, which it
        hands over to the wire lock so records leave in the order made. With
        nothing to send (a read, as a rule) it does not wait for the wire: a
        reply blocked on a client that is not reading must not stop reading."""
        pending = self._outgoing.read()
        if not pending:
            self._tls_lock.release()
            return
        self._wire_lock.acquire()
        self._tls_lock.release()
        try:
            self.sock.sendall(pending)
        finally:
            self._wire_lock.release()

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def handshake(self, deadline: float | None = None) -> None:
        """Complete the TLS handshake (ssl.SSLError if it fails), by ``deadline``
        (monotonic) if given."""
        while True:
            self._tls_lock.acquire()
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except BaseException:
                self._flush_and_release()  # the alert tells the client why
                raise
            self._flush_and_release()
            if done:
                return
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the TLS handshake took too long")
                self.sock.settimeout(left)
            self._fill()

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def recv_into(self, buffer: memoryview) -> int:
        while True:
            self._tls_lock.acquire()
            try:
                count: int | None = self._tls.read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                count = None
            except ssl.SSLZeroReturnError:  # the client's close_notify
                count = 0
            except BaseException:
                self._tls_lock.release()
                raise
            self._flush_and_release()
            if count is not None:
                return count
            self._fill()

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._tls_lock.acquire()
            try:
                written = self._tls.write(view[:CHUNK])
            except BaseException:
                self._tls_lock.release()
                raise
            self._flush_and_release()
            view = view[written:]

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify if the socket still takes it, then close."""
        try:
            self.sock.settimeout(0)
            with self._tls_lock:
                with contextlib.suppress(ssl.SSLError):  # the reply is not awaited
                    self._tls.unwrap()
                pending = self._outgoing.read()
            if pending:
                with self._wire_lock:
                    self.sock.sendall(pending)
        except OSError:
            pass
        finally:
            self.sock.close()

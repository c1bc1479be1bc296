"""The ``http`` and ``https`` storage drivers: read-only images on a web server.

Every read is a ranged GET on a shared urllib3 connection pool (keep-alive,
thread-safe, so the core's worker threads read in parallel). The object's
identity (ETag, else Last-Modified, and its size) is taken when it is opened
and checked on every response: a base replaced on the server is refused, never
mixed with the bytes read before. Transient failures (5xx, 429, timeouts,
dropped connections) are retried a bounded number of times with exponential
backoff; anything else ends in one line naming the URL without credentials.

urllib3 is imported on first use: a run on local files never pays for it.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

from corefmt import sync
from corefmt.credentials import Logins, without_credentials
from corefmt.errors import CorefmtError, ReadOnlyError
from corefmt.storage.base import Storage, StorageDriver
from corefmt.storage.readahead import ReadAhead

if TYPE_CHECKING:
    import urllib3

SCHEMES = ("http", "https")
T = TypeVar("T")
#: Environment variables that tune every http(s) storage of a process.
ENV_RETRIES = "COREFMT_HTTP_RETRIES"
ENV_BACKOFF = "COREFMT_HTTP_BACKOFF"
ENV_TIMEOUT = "COREFMT_HTTP_TIMEOUT"
ENV_CA_FILE = "COREFMT_HTTP_CA_FILE"
#: Logins for hosts, where a URL names none (curl's and wget's file).
ENV_NETRC = "NETRC"
DEFAULT_NETRC = "~/.netrc"
DEFAULT_RETRIES = 4
#: Seconds before the first retry; doubled for each further one, up to the cap.
DEFAULT_BACKOFF = 0.1
BACKOFF_CAP = 5.0
#: Seconds to connect, and to wait for each chunk of an answer.
DEFAULT_TIMEOUT = 30.0
#: Connections per server: as many as convert's most worker threads (-m 16);
#: a thread beyond them waits for one rather than opening yet another.
POOL_CONNECTIONS = 16
#: Servers whose connections are kept (a chain rarely spans more).
POOL_SERVERS = 8
#: One GET reads at most this much (a huge request would restart from its
#: beginning on a retry, and keep a connection busy for long).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: A body is read in pieces this big: a connection dropped mid-way loses at
#: most one piece (urllib3 drops the data of a read that fails).
READ_CHUNK_BYTES = 64 * 1024
HTTP_OK, HTTP_PARTIAL = 200, 206
HTTP_FORBIDDEN, HTTP_NOT_FOUND, HTTP_GONE = 403, 404, 410
HTTP_RANGE_NOT_SATISFIABLE = 416
HTTP_TOO_MANY_REQUESTS = 429
HTTP_SERVER_ERRORS = range(500, 600)
#: Answers that send the client elsewhere (the Location header says where).
HTTP_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Redirects followed for one request before giving up (wget's limit).
MAX_REDIRECTS = 20
#: Answers from a place an earlier redirect led to after which the request
#: starts again from the URL itself: a signed location that expired, a
#: mirror that lost the file.
HTTP_STALE_LOCATION = frozenset({401, 403, 404, 410})
IDENTITY_ENCODING = {"Accept-Encoding": "identity"}
CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


@dataclass(frozen=True)
class HttpSettings:
    """How persistent the drivers are and whom they trust."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT
    #: A PEM file of CA certificates to trust instead of the system's store.
    ca_file: str | None = None

    @classmethod
    def from_environment(cls) -> HttpSettings:
        try:
            return cls(retries=max(0, int(os.environ.get(ENV_RETRIES, DEFAULT_RETRIES))),
                       backoff=max(0.0, float(os.environ.get(ENV_BACKOFF, DEFAULT_BACKOFF))),
                       timeout=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)),
                       ca_file=os.environ.get(ENV_CA_FILE) or None)
        except ValueError as error:
            raise CorefmtError(f"invalid {ENV_RETRIES}/{ENV_BACKOFF}/{ENV_TIMEOUT}: "
                               f"{error}") from None

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(BACKOFF_CAP, self.backoff * 2 ** (attempt - 1))


class _Transient(Exception):
    """A failure worth another try (server error, timeout, dropped link)."""


def _describe(error: Exception) -> str:
    """urllib3's message without its "HTTPConnectionPool(host=..., port=...): "."""
    text = str(error)
    if text.startswith("HTTP") and "): " in text:
        text = text.split("): ", 1)[1]
    return " ".join(text.split())


class _Client:
    """One connection pool and the request loop with its retries."""

    def __init__(self, settings: HttpSettings):
        import urllib3  # deferred: costs tens of milliseconds

        self._urllib3 = urllib3
        self.settings = settings
        self.pool = urllib3.PoolManager(
            num_pools=POOL_SERVERS, maxsize=POOL_CONNECTIONS, block=True,
            timeout=urllib3.Timeout(connect=settings.timeout, read=settings.timeout),
            ca_certs=settings.ca_file, retries=False)

    def request(self, method: str, target: Target, headers: dict[str, str], what: str
                ) -> urllib3.BaseHTTPResponse:
        """The first answer that is not transient: a 5xx, 429 or a network
        failure is retried, the rest is the caller's to judge. The body is
        left unread (the caller reads it into its own buffer)."""
        return self.retrying(lambda: self._once(method, target, headers), target.shown, what)

    def retrying(self, attempt: Callable[[], T], shown: str, what: str) -> T:
        """Run ``attempt`` until it stops raising _Transient, at most
        1 + retries times, sleeping with backoff in between."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Transient as problem:
                failures += 1
                if failures > self.settings.retries:
                    tries = "1 attempt" if failures == 1 else f"{failures} attempts"
                    raise CorefmtError(f"{shown}: {what} failed after {tries}: "
                                       f"{problem}") from None
                time.sleep(self.settings.delay(failures))

    def _once(self, method: str, target: Target, headers: dict[str, str]
              ) -> urllib3.BaseHTTPResponse:
        remembered = target.location
        if remembered is not None:
            response = self._following(method, target, remembered, headers)
            if response.status not in HTTP_STALE_LOCATION:
                return response
            _discard(response)  # where the redirect led no longer serves it: ask again
            if target.location == remembered:  # (not a fresher one another thread found)
                target.location = None
        return self._following(method, target, target.wire(method), headers)

    def _following(self, method: str, target: Target, url: str, headers: dict[str, str]
                   ) -> urllib3.BaseHTTPResponse:
        """One request, and the redirects it gets, as curl follows them
        (qemu's curl driver does): credentials go only to the URL's own
        server, https never leads to plain http. Where the chain ends is
        remembered for the next request."""
        hops = 0
        while True:
            response = self._send(method, target, url, _for_place(headers, url, target.url))
            if response.status not in HTTP_REDIRECTS or not target.follows_redirects:
                break
            location = response.headers.get("Location")
            _discard(response)
            status = _status(response)
            if not location:
                raise CorefmtError(f"{target.shown}: {status} without a Location to go to")
            hops += 1
            if hops > MAX_REDIRECTS:
                raise CorefmtError(f"{target.shown}: more than {MAX_REDIRECTS} redirects")
            try:
                following = urljoin(url, location)
                parts = urlsplit(following)
                scheme, _ = parts.scheme, parts.port  # a malformed or impossible port raises
            except ValueError:
                raise CorefmtError(f"{target.shown}: {status} to a malformed Location"
                                   ) from None
            if scheme not in SCHEMES:
                raise CorefmtError(f"{target.shown}: redirected to '{_place(following)}', "
                                   "which is not http(s)")
            if target.confined and _origin(following) != _origin(target.url):
                raise CorefmtError(f"{target.shown}: redirected to another server "
                                   f"({_place(following)}); a name read from an image may "
                                   f"only lead to its own server (allow it with "
                                   f"--allow-protocol {urlsplit(target.url).scheme})")
            if urlsplit(url).scheme == "https" and scheme == "http":
                raise CorefmtError(f"{target.shown}: redirected from https to plain http "
                                   f"({_place(following)}); refusing to leave TLS")
            url = following
        if hops and response.status not in HTTP_SERVER_ERRORS:
            target.location = url
        return response

    def _send(self, method: str, target: Target, url: str, headers: dict[str, str]
              ) -> urllib3.BaseHTTPResponse:
        errors = self._urllib3.exceptions
        try:
            # identity: a compressed answer would not be the bytes of the range
            response = self.pool.request(method, url,
                                         headers={**headers, **IDENTITY_ENCODING},
                                         preload_content=False, redirect=False, retries=False)
        except errors.SSLError as error:  # a certificate problem stays one
            raise CorefmtError(f"{target.shown}: TLS failed: {_describe(error)}") from None
        except errors.LocationValueError:  # its text is the whole URL: never shown
            raise CorefmtError(f"{target.shown}: cannot request '{_place(url)}': "
                               "malformed URL") from None
        except errors.HTTPError as error:
            raise _Transient(_describe(error)) from None
        if response.status in HTTP_SERVER_ERRORS or response.status == HTTP_TOO_MANY_REQUESTS:
            status = _status(response)
            _discard(response)
            raise _Transient(status)
        return response

    def read_body(self, response: urllib3.BaseHTTPResponse, view: memoryview
                  ) -> tuple[int, str]:
        """Read the body into ``view``: how many bytes came, and why it ended
        early if it did (a dropped connection; the caller asks for the rest)."""
        done = 0
        try:
            while done < len(view):
                got = response.readinto(view[done:done + READ_CHUNK_BYTES])
                if not got:
                    return done, "the answer ended early"
                done += got
        except (self._urllib3.exceptions.HTTPError, OSError) as error:
            return done, _describe(error)
        return done, ""

    def close(self) -> None:
        self.pool.clear()


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a malformed port is nobody's origin
        port = -1
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _for_place(headers: dict[str, str], url: str, own: str) -> dict[str, str]:
    """``headers`` without the login where ``url`` is not on ``own``'s server
    (curl drops it on a redirect to another host the same way)."""
    if "Authorization" not in headers or _origin(url) == _origin(own):
        return headers
    return {key: value for key, value in headers.items() if key != "Authorization"}


def _place(url: str) -> str:
    """A redirect's location as messages show it: no login, no query (a
    signed location carries its signature there)."""
    try:
        parts = urlsplit(without_credentials(url))
        return parts._replace(query="", fragment="").geturl() + ("?…" if parts.query else "")
    except ValueError:
        return "a malformed URL"


def _status(response: urllib3.BaseHTTPResponse) -> str:
    return f"HTTP {response.status} {response.reason or ''}".rstrip()


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Drop an answer whose body is not wanted: its connection is closed
    rather than drained (the body may be the whole image)."""
    response.close()
    response.release_conn()


@dataclass(frozen=True)
class Identity:
    """What names one version of the object on the server."""

    size: int
    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, response: urllib3.BaseHTTPResponse, size: int) -> Identity:
        return cls(size, response.headers.get("ETag"), response.headers.get("Last-Modified"))

    def validator(self) -> str | None:
        """For If-Range: a strong ETag, else the modification date."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def to_text(self) -> str:
        """The form overlays record (``Storage.version_token``)."""
        fields = {"size": self.size, "etag": self.etag, "last-modified": self.last_modified}
        return json.dumps({key: value for key, value in fields.items() if value is not None},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> Identity | None:
        """A recorded identity, or None if it is not one (a record another
        tool left is then no evidence either way)."""
        try:
            fields = json.loads(text)
            size = fields["size"]
        except (ValueError, TypeError, KeyError):
            return None
        etag, modified = fields.get("etag"), fields.get("last-modified")
        if not isinstance(size, int) or not all(isinstance(value, str | None)
                                                for value in (etag, modified)):
            return None
        return cls(size, etag, modified)

    def differs_from(self, older: Identity) -> str | None:
        """How this version differs from ``older``, by the validator ``older``
        had (ETag, else Last-Modified) and the size; None if it is the same."""
        if older.etag is not None and older.etag != self.etag:
            return f"ETag {older.etag} became {self.etag}"
        if older.etag is None and older.last_modified is not None \
                and older.last_modified != self.last_modified:
            return f"Last-Modified {older.last_modified} became {self.last_modified}"
        if older.size != self.size:
            return f"its size {older.size} became {self.size}"
        return None

    def mismatch(self, response: urllib3.BaseHTTPResponse) -> str | None:
        """How ``response`` shows another version of the object, or None."""
        if self.etag is not None:
            theirs = response.headers.get("ETag")
            if theirs != self.etag:
                return f"ETag {self.etag} became {theirs}"
        elif self.last_modified is not None:
            theirs = response.headers.get("Last-Modified")
            if theirs != self.last_modified:
                return f"Last-Modified {self.last_modified} became {theirs}"
        return None


@dataclass
class Target:
    """A URL split into what goes on the wire and what may be printed: only
    ``shown`` ever enters a message."""

    url: str
    shown: str
    headers: dict[str, str] = field(default_factory=dict)
    #: Where the last redirects led: later requests go there directly.
    location: str | None = None
    #: Redirects may not lead to another server (a name read from an image).
    confined: bool = False
    #: A signed target's URL is valid for its own server only: no redirects.
    follows_redirects: ClassVar[bool] = True

    def wire(self, method: str) -> str:
        """The URL a ``method`` request goes to (a signed store makes one
        per method and renews it before it expires)."""
        return self.url

    @classmethod
    def parse(cls, url: str, login: Callable[[str], str | None] | None = None) -> Target:
        """``login(host)`` gives "user:password" for a URL that has none
        (a backing name, recorded without them)."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise CorefmtError(f"'{without_credentials(url)}' is not an http(s) URL with a host")
        headers: dict[str, str] = {}
        credentials = typed_login(url)
        if credentials is None and login is not None:
            credentials = login(parts.hostname)
        if credentials is not None:
            token = base64.b64encode(credentials.encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        return cls(without_credentials(url), without_credentials(url), headers)


def typed_login(url: str) -> str | None:
    """The "user:password" a URL carries (a user without a password gets an
    empty one), or None."""
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return None
    login = unquote(netloc.rsplit("@", 1)[0])
    return login if ":" in login else login + ":"


class HttpStorage(Storage):
    """One object on a server, read with ranged GETs; never written."""

    def __init__(self, target: Target, client: _Client, identity: Identity):
        super().__init__(target.shown, read_only=True)
        self._target = target
        self._client = client
        self.version = identity
        #: Set once the object is seen to have changed: every later read fails too.
        self._changed: str | None = None
        self._lock = sync.Lock()
        self._reader = ReadAhead(self._fetch_span, identity.size)

    def size(self) -> int:
        return self.version.size

    def version_token(self) -> str | None:
        return self.version.to_text()

    def changed_since(self, recorded: str) -> str | None:
        older = Identity.from_text(recorded)
        return None if older is None else self.version.differs_from(older)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        have = max(0, min(len(view), self.version.size - offset))
        if have < len(view):
            view[have:] = bytes(len(view) - have)  # past the end: zeros, as a file's tail
        self._check_unchanged()  # cached bytes of a version seen replaced are not served
        if have:
            self._reader.readinto(offset, view[:have])

    def _fetch_span(self, offset: int, view: memoryview) -> None:
        position = 0
        while position < len(view):
            step = min(MAX_REQUEST_BYTES, len(view) - position)
            self._fetch(offset + position, view[position:position + step])
            position += step

    # Never reached through write()/truncate() (read_only is always set),
    # but a caller of the private methods is refused all the same.
    def _write(self, offset: int, data: bytes | memoryview) -> None:
        raise ReadOnlyError(f"{self.path}: opened read-only")

    def _truncate(self, size: int) -> None:
        raise ReadOnlyError(f"{self.path}: opened read-only")

    def _fetch(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; a transfer cut short goes on from
        where it stopped, on a new connection, after the same checks."""
        what = f"read of {len(view)} bytes at offset {offset}"
        done = 0

        def attempt() -> None:
            nonlocal done
            self._check_unchanged()
            start, end = offset + done, offset + len(view) - 1
            headers = {**self._target.headers, "Range": f"bytes={start}-{end}"}
            validator = self.version.validator()
            if validator:
                headers["If-Range"] = validator
            response = self._client.request("GET", self._target, headers, what)
            try:
                self._check_answer(response, start, end, what)
                got, problem = self._client.read_body(response, view[done:])
            except BaseException:
                _discard(response)
                raise
            done += got
            if done < len(view):
                _discard(response)
                raise _Transient(f"{problem} after {got} of {end - start + 1} bytes")
            response.release_conn()

        self._client.retrying(attempt, self._target.shown, what)

    def _check_answer(self, response: urllib3.BaseHTTPResponse, start: int, end: int,
                      what: str) -> None:
        """A 206 of exactly the range asked, from the version opened (an
        error status describes no version: it is reported as it is)."""
        changed = None
        if response.status in (HTTP_OK, HTTP_PARTIAL):
            changed = self.version.mismatch(response)
            if response.status == HTTP_OK and changed is None and self.version.validator():
                changed = "the server sent the whole object for a conditional range"
        elif response.status == HTTP_RANGE_NOT_SATISFIABLE:
            changed = "the object became shorter"
        if changed is not None:
            self._refuse(changed)
        if response.status != HTTP_PARTIAL:
            detail = ("the server ignored the range request" if response.status == HTTP_OK
                      else _status(response))
            raise CorefmtError(f"{self.path}: {what} failed: {detail}")
        answered = _content_range(response)
        if answered is None or answered[:2] != (start, end):
            raise CorefmtError(f"{self.path}: {what} failed: the server answered the range "
                               f"{response.headers.get('Content-Range')!r}")
        if answered[2] not in (None, self.version.size):
            self._refuse(f"its size {self.version.size} became {answered[2]}")

    def _refuse(self, change: str) -> None:
        with self._lock:
            self._changed = self._changed or change
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        if self._changed is not None:
            raise CorefmtError(f"{self.path}: the object changed on the server since it was "
                               f"opened ({self._changed}); refusing to mix its versions")

    def drop_connections(self) -> None:
        """Close the idle connections (the next read reconnects): for tests
        and for a caller that knows the server restarted."""
        self._client.pool.clear()


def _content_range(response: urllib3.BaseHTTPResponse) -> tuple[int, int, int | None] | None:
    match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


class RangedStorageDriver(StorageDriver):
    """What every driver of objects read with ranged GETs shares: one
    connection pool per driver, the object identified on open, read-only.
    A subclass says how a path becomes a ``Target``."""

    def __init__(self, settings: HttpSettings | None = None):
        self._settings = settings
        self._client: _Client | None = None
        self._client_lock = sync.Lock()

    @abc.abstractmethod
    def target(self, path: str) -> Target:
        """How ``path`` is reached and shown (its credentials kept out of the
        name); a malformed path is refused here."""

    def target_with(self, path: str, logins: Logins) -> Target:
        """``target``, sharing logins with the other stores of one open
        (a driver whose credentials come from elsewhere ignores them)."""
        return self.target(path)

    def client(self) -> _Client:
        with self._client_lock:
            if self._client is None:
                self._client = _Client(self._settings or HttpSettings.from_environment())
            return self._client

    def open(self, path: str, *, read_only: bool, direct: bool = False,
             logins: Logins | None = None, confined: bool = False) -> HttpStorage:
        """``logins``: the logins of one open of a graph (see Logins);
        ``confined``: a name read from an image, whose redirects may not
        lead to another server."""
        target = self.target(path) if logins is None else self.target_with(path, logins)
        target.confined = confined
        if not read_only:
            raise CorefmtError(f"Could not open '{target.shown}': {self.name} storage is "
                               "read-only (open the image read-only)")
        client = self.client()
        return HttpStorage(target, client, _identify(target, client))

    def create(self, path: str) -> Storage:
        raise CorefmtError(f"Could not create '{self.target(path).shown}': {self.name} "
                           "storage is read-only")

    def exists(self, path: str, logins: Logins | None = None) -> bool:
        """False only when the server says so (404, 410): any other problem
        is left to ``open``, which reports it properly."""
        target = self.target(path) if logins is None else self.target_with(path, logins)
        try:
            response = self.client().request("HEAD", target, target.headers, "open")
        except CorefmtError:
            return True
        _discard(response)
        return response.status not in (HTTP_NOT_FOUND, HTTP_GONE)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _identify(target: Target, client: _Client) -> Identity:
    """Size and version from a HEAD; a server whose HEAD says nothing of
    ranges is asked for the first byte, and one without ranges refused."""
    what = "open"
    head = client.request("HEAD", target, target.headers, what)
    _discard(head)
    length = head.headers.get("Content-Length")
    if (head.status == HTTP_OK and length is not None and length.isdigit()
            and head.headers.get("Accept-Ranges", "").lower() == "bytes"):
        return Identity.of(head, int(length))
    # 405/501: no HEAD; 403 where a redirect led: a location signed for GET only
    if head.status != HTTP_OK and head.status not in (405, 501) and \
            not (head.status == HTTP_FORBIDDEN and target.location is not None):
        raise CorefmtError(f"Could not open '{target.shown}': {_status(head)}")
    probe = client.request("GET", target, {**target.headers, "Range": "bytes=0-0"}, what)
    _discard(probe)
    answered = _content_range(probe)
    if probe.status == HTTP_PARTIAL and answered is not None and answered[2] is not None:
        return Identity.of(probe, answered[2])
    if probe.status == HTTP_RANGE_NOT_SATISFIABLE and length == "0":
        return Identity.of(head, 0)  # an empty object has no first byte
    if probe.status == HTTP_OK:
        raise CorefmtError(f"Could not open '{target.shown}': the server does not "
                           "support range requests")
    raise CorefmtError(f"Could not open '{target.shown}': {_status(probe)}")


def _read_netrc() -> dict[str, tuple[str, str | None, str | None]]:
    """The hosts' entries of the netrc file (none without one)."""
    import netrc  # deferred: only a URL without credentials needs it

    path = os.environ.get(ENV_NETRC) or os.path.expanduser(DEFAULT_NETRC)
    if not os.path.exists(path):
        return {}
    try:
        return netrc.netrc(path).hosts
    except netrc.NetrcParseError as error:
        raise CorefmtError(f"{path}: {error.msg} (line {error.lineno})") from None
    except OSError as error:
        raise CorefmtError(f"{path}: {error.strerror}") from None


class HttpStorageDriver(RangedStorageDriver):
    """``http://`` or ``https://`` (one driver each: an image on one may
    name siblings on the same protocol, never silently on the other)."""

    def __init__(self, scheme: str, settings: HttpSettings | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"not an http scheme: {scheme}")
        super().__init__(settings)
        self.name = scheme
        self.prefix = f"{scheme}://"
        #: The netrc file's host entries, read on first need.
        self._netrc_hosts: dict[str, tuple[str, str | None, str | None]] | None = None

    def target(self, path: str) -> Target:
        return Target.parse(path, self._netrc_login)

    def target_with(self, path: str, logins: Logins) -> Target:
        """A login in ``path`` serves the other images of the same open on
        its server (an image's relative siblings); a URL without one takes
        that login, else netrc's."""
        typed = typed_login(path)
        if typed is not None:
            logins.remember(_origin(path), typed)
        return Target.parse(path, lambda host: logins.get(_origin(path))
                            or self._netrc_login(host))

    def _netrc_login(self, host: str) -> str | None:
        """The login ``~/.netrc`` (or ``$NETRC``) has for ``host``, read once,
        as curl --netrc and wget do."""
        with self._client_lock:
            if self._netrc_hosts is None:
                self._netrc_hosts = _read_netrc()
            hosts = self._netrc_hosts
        # the host's own entry only: a "default" login would go to any server
        entry = hosts.get(host)
        return f"{entry[0]}:{entry[2] or ''}" if entry else None

    def is_sibling(self, path: str, holder: str) -> bool:
        """The same server (scheme, host and port)."""
        def place(url: str) -> tuple[str, str | None, int | None]:
            parts = urlsplit(url)
            return parts.scheme, parts.hostname, parts.port

        try:
            return place(path) == place(holder)
        except ValueError:  # a malformed port
            return False

    def resolve(self, path: str, relative_to: str | None) -> str:
        """A relative name in a remote image is its sibling on the server."""
        if urlsplit(path).scheme or not relative_to:
            return path
        return urljoin(relative_to, path)

"""Credentials in names: ``scheme://user:password@host/...``.

A user may put credentials in a URL on the command line; they are used for
that run (``Logins``: also for the other images of the same open on that
server) and go nowhere else: not into a backing name recorded in an image
(later opens take them from ``~/.netrc``, see storage-http.md), not into a
node's name, ``info``, a message or a log line.
"""

from __future__ import annotations

import re

from corefmt import sync

#: A URL's scheme and its userinfo part (up to the last "@" before the path).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
#: The same inside a ``json:{...}`` name, where URLs are JSON strings.
_QUOTED_USERINFO = re.compile(r'("[A-Za-z][A-Za-z0-9+.-]*://)[^/?#"]*@')
JSON_PREFIX = "json:"


def without_credentials(name: str) -> str:
    """``name`` with a URL's ``user:password@`` left out, also the URLs in a
    ``json:`` name (other names as they are)."""
    if name.startswith(JSON_PREFIX):
        return _QUOTED_USERINFO.sub(r"\1", name)
    return _USERINFO.sub(r"\1", name, count=1)


class Logins:
    """The logins typed in the URLs of one open of a graph, by server
    (scheme, host, port), in memory only. The first one for a server stays:
    a name read from an image cannot replace the user's."""

    def __init__(self) -> None:
        self._by_server: dict[tuple[str, str | None, int | None], str] = {}
        self._lock = sync.Lock()

    def remember(self, server: tuple[str, str | None, int | None], login: str) -> None:
        with self._lock:
            self._by_server.setdefault(server, login)

    def get(self, server: tuple[str, str | None, int | None]) -> str | None:
        with self._lock:
            return self._by_server.get(server)

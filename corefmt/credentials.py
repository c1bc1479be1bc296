"""Credentials in names: ``scheme://user:password@host/...``.

A user may put credentials in a URL on the command line; they are used for
that run and go nowhere else: not into a backing name recorded in an image
(later opens take them from ``~/.netrc``, see storage-http.md), not into a
node's name, ``info``, a message or a log line.
"""

from __future__ import annotations

import re

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

"""An nbdkit python plugin serving one image or backing chain through corefmt,
so nbdkit's engine (filters, TLS, its many transports) can export what
corefmt opens::

    nbdkit python "$(python -c 'import corefmt.nbd.nbdkit_plugin as m; print(m.__file__)')" \\
        file=disk.qcow2 [format=qcow2] [readonly=true]

nbdkit embeds its own Python (Debian's: the system python3), which must be
able to import corefmt: see docs/verbs/nbd.md, "Serving through nbdkit".
The image is opened once, before nbdkit starts serving, and every
connection shares that node, so a flush on one connection covers the
writes of all of them (multi-conn) and the image's lock is taken once.

Uses nbdkit's python plugin API version 2 (nbdkit >= 1.28 for ``cleanup``).
"""

from __future__ import annotations

import errno
import functools
import site
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

try:
    import nbdkit  # only inside nbdkit's embedded interpreter
except ImportError:  # imported to find this file's path, or by tools
    nbdkit = None

API_VERSION = 2

#: Where this file sits below the directory that holds the corefmt package.
PACKAGE_DEPTH = 2


def _use_install_site() -> None:
    """Make the tree this file was installed in importable: nbdkit's
    interpreter does not know the environment corefmt was installed into.
    Added as a site directory, so its .pth files work too, and ahead of the
    system's site-packages, so its newer dependencies win."""
    root = str(Path(__file__).resolve().parents[PACKAGE_DEPTH])
    if root in sys.path:
        return
    before = list(sys.path)
    site.addsitedir(root)
    added = [entry for entry in sys.path if entry not in before]
    system = set(site.getsitepackages())
    at = next((index for index, entry in enumerate(before) if entry in system), len(before))
    sys.path[:] = before[:at] + added + before[at:]


if __name__ == "__main__":  # nbdkit runs the plugin as __main__
    if nbdkit is None:
        sys.exit(f"run this file through nbdkit: nbdkit python {__file__} file=IMAGE")
    _use_install_site()

import corefmt  # noqa: E402  (after the site set-up above)
from corefmt.block.node import BlockNode  # noqa: E402
from corefmt.flags import RequestFlags  # noqa: E402
from corefmt.nbd.export import error_code  # noqa: E402
from corefmt.nbd.protocol import Error  # noqa: E402
from corefmt.options import to_bool  # noqa: E402

#: NBD's error values are Linux's errno values; named here for other hosts.
ERRNO = {Error.NBD_EPERM: errno.EPERM, Error.NBD_EIO: errno.EIO,
         Error.NBD_ENOMEM: errno.ENOMEM, Error.NBD_EINVAL: errno.EINVAL,
         Error.NBD_ENOSPC: errno.ENOSPC, Error.NBD_EOVERFLOW: errno.EOVERFLOW,
         Error.NBD_ENOTSUP: errno.EOPNOTSUPP, Error.NBD_ESHUTDOWN: errno.ESHUTDOWN}

KEY_FILE, KEY_FORMAT, KEY_READONLY = "file", "format", "readonly"


class Settings:
    """What the command line asked for, and the node opened from it."""

    file: str | None = None
    format: str | None = None
    readonly: bool = False
    node: BlockNode | None = None


settings = Settings()


class Handle:
    """One client connection: whether it may write and whether it did
    (a connection that wrote is flushed when it closes)."""

    def __init__(self, node: BlockNode, readonly: bool) -> None:
        self.node = node
        self.readonly = readonly or node.read_only
        self.wrote = False


Result = TypeVar("Result")


def _reported(call: Callable[..., Result]) -> Callable[..., Result]:
    """Tell nbdkit the errno a corefmt failure means before it is raised
    (without it every failure reaches the client as EIO)."""

    @functools.wraps(call)
    def wrapper(*args: Any) -> Result:
        try:
            return call(*args)
        except Exception as error:
            nbdkit.set_error(ERRNO.get(error_code(error), errno.EIO))
            raise

    return wrapper


# -- start-up ---------------------------------------------------------------------------
def config(key: str, value: str) -> None:
    if key == KEY_FILE:
        settings.file = value
    elif key == KEY_FORMAT:
        settings.format = value or None
    elif key == KEY_READONLY:
        settings.readonly = to_bool(value)
    else:
        raise ValueError(f"unknown parameter '{key}' (file=IMAGE [format=FMT] "
                         "[readonly=true|false])")


def config_complete() -> None:
    if not settings.file:
        raise ValueError("file=IMAGE is required")


def thread_model() -> int:
    """Parallel: corefmt nodes serialise what they must themselves."""
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    """Open the image before nbdkit serves (and forks), so a bad image or
    a lock held elsewhere stops nbdkit at start-up, on the terminal."""
    settings.node = corefmt.open(settings.file, settings.format, read_only=settings.readonly)


def cleanup() -> None:
    if settings.node is not None:
        settings.node.close()
        settings.node = None


# -- connections ------------------------------------------------------------------------
def open(readonly: bool) -> Handle:  # the name nbdkit calls (shadows the builtin)
    return Handle(settings.node, readonly)


@_reported
def close(h: Handle) -> None:
    if h.wrote:
        h.node.flush()


def get_size(h: Handle) -> int:
    return h.node.virtual_size


def can_write(h: Handle) -> bool:
    return not h.readonly


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return not h.readonly


def can_zero(h: Handle) -> bool:
    return not h.readonly


def can_fast_zero(h: Handle) -> bool:
    """Yes: a fast zero the format cannot do fails at once (ENOTSUP)."""
    return not h.readonly


def can_fua(h: Handle) -> int:
    """Native: the block layer makes a FUA write durable itself."""
    return nbdkit.FUA_NATIVE


def can_multi_conn(h: Handle) -> bool:
    """Every connection shares one node, so one flush covers them all."""
    return True


def can_extents(h: Handle) -> bool:
    return True


# -- requests ---------------------------------------------------------------------------
def _request_flags(flags: int) -> RequestFlags:
    return RequestFlags.FUA if flags & nbdkit.FLAG_FUA else RequestFlags.NONE


@_reported
def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    h.node.readinto(offset, buf)


@_reported
def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    h.wrote = True
    h.node.write(offset, buf, _request_flags(flags))


@_reported
def flush(h: Handle, flags: int) -> None:
    h.node.flush()


@_reported
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    """A hint: formats that cannot deallocate ignore it."""
    h.wrote = True
    h.node.discard(offset, count)
    if flags & nbdkit.FLAG_FUA:
        h.node.flush()


@_reported
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    h.wrote = True
    request = _request_flags(flags)
    if flags & nbdkit.FLAG_FAST_ZERO:
        request |= RequestFlags.NO_FALLBACK
    h.node.write_zeroes(offset, count, unmap=bool(flags & nbdkit.FLAG_MAY_TRIM),
                        flags=request)


@_reported
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """base:allocation from the chain's merged status, as corefmt's own
    server reports it: HOLE where no layer holds data, ZERO where the chain
    reads as zeros."""
    end = offset + count
    found: list[tuple[int, int, int]] = []
    for extent in h.node.block_status(offset, count):
        start, stop = max(extent.offset, offset), min(extent.end, end)
        if stop <= start:
            continue
        kind = ((0 if extent.data and extent.node is not None else nbdkit.EXTENT_HOLE)
                | (nbdkit.EXTENT_ZERO if extent.zero or extent.node is None else 0))
        if found and found[-1][2] == kind:
            start = found.pop()[0]
        found.append((start, stop - start, kind))
    if flags & nbdkit.FLAG_REQ_ONE:
        return found[:1]
    return found

"""Exception types. Every error corefmt raises on purpose is a CorefmtError,
so callers (and the CLI) can tell a clear refusal from a bug."""

from __future__ import annotations

import os


class CorefmtError(Exception):
    """Base class: the message is meant to be shown to a user as one line."""


class UnknownFormatError(CorefmtError):
    """A format or storage driver name that no installed plugin provides."""


class OptionError(CorefmtError):
    """A create/open option that is unknown, malformed or out of range."""


class ImageError(CorefmtError):
    """An image whose on-disk structures are impossible or unsupported."""

    def __init__(self, path: str | None, structure: str, offset: int | None, problem: str):
        where = f" at offset {offset:#x}" if offset is not None else ""
        name = path or "<image>"
        super().__init__(f"{name}: {structure}{where}: {problem}")
        self.path = path
        self.structure = structure
        self.offset = offset


class BackingChainError(CorefmtError):
    """A backing chain that cannot be opened: missing file, loop, too deep."""


class ReadOnlyError(CorefmtError):
    """A write was attempted on something opened read-only."""


class NotSupported(CorefmtError):
    """A driver declines a request for this image (QEMU's -ENOTSUP): the
    block layer emulates it where it can, else reports this message."""


class RangeError(CorefmtError):
    """A request that reaches outside the image."""


class InvalidRequest(CorefmtError):
    """A request the driver cannot take in this shape (QEMU's -EINVAL): a
    compressed write that does not cover whole clusters, say."""


class StorageError(CorefmtError):
    """An I/O error from the storage below, with the file it happened on."""

    def __init__(self, path: str | None, operation: str, error: OSError):
        self.errno = error.errno
        self.os_error = error
        reason = error.strerror or str(error)
        super().__init__(f"{path or '<storage>'}: {operation} failed: {reason}")


def error_reason(error: CorefmtError) -> str:
    """What qemu's tools print after "failed: ": the strerror() of an I/O
    error where there is one, else the message."""
    if isinstance(error, StorageError) and error.errno:
        return os.strerror(error.errno)
    return str(error)

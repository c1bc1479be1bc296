"""What the FVD tests share: bases of random content (never a sector of
zeros, so "zeros instead of the base's data" always shows) and the CLI run
in-process."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

from corefmt.cli.main import main

SECTOR = 512


def random_base(path: Path, size: int, seed: int) -> bytes:
    """Random bytes, no sector of them all zero."""
    data = bytearray(random.Random(seed).randbytes(size))
    for at in range(0, size, SECTOR):
        if not any(data[at:at + SECTOR]):
            data[at] = 1
    path.write_bytes(data)
    return bytes(data)


def cli(*args: str | Path) -> tuple[int, str, str]:
    """corefmt's exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in args])
    return status, out.getvalue(), err.getvalue()

"""corefmt's CLI run inside the test process: the same main() a user's
command runs, without a Python start-up per call, for tests that compare
many cases with qemu-img (subprocesses there would cost seconds)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

from corefmt.cli.main import main


def run_corefmt(cwd: Path, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """``corefmt *args`` in ``cwd``, as a CompletedProcess (one at a time:
    the working directory and sys.stdout/stderr are the process's)."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(arg) for arg in args])
            except SystemExit as done:  # --help, --version
                status = done.code if isinstance(done.code, int) else 0
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["corefmt", *map(str, args)], status,
                                       out.getvalue(), err.getvalue())

"""Helpers for the command-line tests (used by conftest.py and the test modules)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TIMEOUT = 120

#: qemu-io's (and corefmt io's) rate line, which holds timings.
RATE_LINE = re.compile(r" ops; ")
#: -C's machine-readable report: bytes,ops,time,bytes/sec,ops/sec.
MACHINE_LINE = re.compile(r"^(\d+,\d+),\d+:\d\d:\d\d\.\d\d,[^,]+,[^,]+$")

#: Subprocesses run at once where a test module runs many independent commands
#: (they are all separate processes: this keeps the suite fast on few cores).
PARALLEL_RUNS = 4

Runner = Callable[..., subprocess.CompletedProcess]
Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")

#: Where the corefmt subprocesses keep their bytecode (set by conftest.py).
_pycache: list[Path] = []


def use_pycache(directory: Path) -> None:
    """Let every corefmt subprocess reuse compiled bytecode from ``directory``
    (outside the source tree), even where PYTHONDONTWRITEBYTECODE is set:
    each run would otherwise compile corefmt again."""
    _pycache[:] = [directory]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"  # qemu's messages (strerror) in English, as corefmt's
    env.pop("PYTHONWARNINGS", None)
    if _pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(_pycache[0])
    return env


def runner(program: list[str], default_cwd: Path) -> Runner:
    """run(*args, cwd=default_cwd) -> CompletedProcess with text stdout/stderr."""

    def run(*args: str | os.PathLike, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*program, *map(str, args)],
                              cwd=default_cwd if cwd is None else cwd, capture_output=True,
                              text=True, env=_environment(), timeout=TIMEOUT, check=False)

    return run


def run_parallel(jobs: dict[Key, Callable[[], Result]]) -> dict[Key, Result]:
    """Run independent jobs (each starting subprocesses) a few at a time."""
    with ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def commands(*lines: str) -> list[str]:
    """['-c', line, '-c', line, ...] for corefmt io and qemu-io."""
    result: list[str] = []
    for line in lines:
        result += ["-c", line]
    return result


def io_stdout(text: str) -> str:
    """qemu-io / corefmt io output without what depends on timing."""
    kept = []
    for line in text.splitlines():
        if RATE_LINE.search(line):
            continue
        kept.append(MACHINE_LINE.sub(r"\1,<time>", line))
    return "\n".join(kept)


def io_stderr(text: str) -> str:
    """Messages on stderr with the program's own name taken out."""
    return "\n".join(re.sub(r"^(qemu-io|corefmt): ", "<prog>: ", line)
                     for line in text.splitlines())


def directory_state(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``directory``: (size, mtime_ns, sha256 of the content)."""
    state = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


def assert_one_error_line(result: subprocess.CompletedProcess, exit_code: int | None = None,
                          contains: str | None = None) -> str:
    """A refusal: non-zero exit, nothing on stdout, one 'corefmt: ' line on stderr."""
    assert result.returncode != 0, result
    if exit_code is not None:
        assert result.returncode == exit_code, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("corefmt: "), lines[0]
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]

"""What the locking tests share: who holds which lock bytes (/proc/locks),
qemu-io holders and tries, and the corefmt holder process (holder.py)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from corefmt.registry import Registry
from corefmt.storage.locking import ImageLockError
from tests.locking.holder import LOCKMETA, open_image
from tests.locking.holder import MODES as OPEN_MODES

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QEMU_NBD = shutil.which("qemu-nbd")
HOLDER = Path(__file__).with_name("holder.py")
#: How long a holder may take to open its image (they take milliseconds).
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.005
#: qemu-io's flags for the tests' open modes.
QEMU_MODE_ARGS = {"ro": ["-r"], "rw": [], "U": ["-r", "-U"]}
#: The refusal inside qemu's and corefmt's messages.
REFUSAL = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')
ENV = {**os.environ, "LC_ALL": "C"}
#: corefmt's format for each kind of format of the tests.
KINDS = {"raw": "raw", "meta": LOCKMETA}
MODES = tuple(OPEN_MODES)


def lock_entries(path: str | Path) -> list[tuple[int, int]]:
    """(start, end) of every OFD lock on the file, one entry per lock per
    open file description, from /proc/locks."""
    info = os.stat(path)
    file_id = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    entries = []
    with open("/proc/locks", encoding="ascii") as table:
        for line in table:
            fields = line.split()  # id: OFDLCK ADVISORY READ pid maj:min:inode start end
            if fields[1] != "OFDLCK":  # other kinds, and "->" waiters
                continue
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == file_id:
                entries.append((int(fields[6]), int(fields[7])))
    return entries


def locked_bytes(path: str | Path) -> set[int]:
    """Every byte of the file some open file description holds a lock on."""
    return {byte for start, end in lock_entries(path) for byte in range(start, end + 1)}


def in_use(path: Path, what: str, opening: bool = True) -> str:
    where = f"Could not open '{path}': " if opening else f"{path}: "
    return f"{where}{what}. Is another process using the image [{path}]?"


def try_open(path: Path, kind: str, mode: str, registry: Registry) -> str | None:
    """None if corefmt opens the image, else its message."""
    try:
        node = open_image(str(path), KINDS[kind], mode, registry)
    except ImageLockError as error:
        return str(error)
    node.close()
    return None


def refusal(text: str | None) -> str | None:
    match = REFUSAL.search(text or "")
    return match.group(0) if match else None


def qemu_try(path: str | Path, format: str, mode: str) -> tuple[int, str]:
    """qemu-io opening (and reading) the image: (exit status, stderr)."""
    assert QEMU_IO is not None
    result = subprocess.run([QEMU_IO, "-c", "read 0 512", *qemu_args(path, format, mode)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=ENV,
                            timeout=START_TIMEOUT)
    return result.returncode, result.stderr


def _wait_for_new_lock(path: str | Path, before: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while len(lock_entries(path)) <= before:
        if process.poll() is not None:
            raise AssertionError(f"holder exited: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"holder did not lock {path}")
        time.sleep(POLL_INTERVAL)


def _wait_until_open(path: str | Path, before: int, process: subprocess.Popen) -> None:
    """qemu-io answers a command only after its open is done, every lock
    taken (its first lock alone is no sign: it takes them one by one, and a
    snapshot between two missed one of them under load)."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("length\n")
    process.stdin.flush()
    answered, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    if not answered:
        raise AssertionError(f"holder did not open {path}")
    if not process.stdout.readline():
        raise AssertionError(f"holder exited: {process.communicate()[1]}")
    if len(lock_entries(path)) <= before:
        raise AssertionError(f"holder did not lock {path}")


def _stop(process: subprocess.Popen) -> None:
    """End a holder of ours: EOF on its stdin, then a kill if it lingers."""
    with contextlib.suppress(OSError):
        if process.stdin:
            process.stdin.close()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def qemu_args(path: str | Path, format: str, mode: str) -> list[str]:
    """qemu-io's arguments to open a file in one of the tests' modes."""
    return [*QEMU_MODE_ARGS[mode], "-f", format, str(path)]


@contextlib.contextmanager
def qemu_holding(path: str | Path, args: list[str]) -> Iterator[subprocess.Popen]:
    """A qemu-io process with ``path`` open (until its stdin closes): it
    reads commands from a pipe, so it waits there holding its locks."""
    assert QEMU_IO is not None
    before = len(lock_entries(path))
    process = subprocess.Popen([QEMU_IO, *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV)
    try:
        _wait_until_open(path, before, process)
        yield process
    finally:
        _stop(process)


@contextlib.contextmanager
def nbd_holding(path: str | Path, socket: Path) -> Iterator[None]:
    """qemu-nbd serving a raw image read-write (a VM-like writer)."""
    assert QEMU_NBD is not None
    before = len(lock_entries(path))
    process = subprocess.Popen([QEMU_NBD, "-f", "raw", "-k", str(socket), str(path)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_new_lock(path, before, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class CorefmtHolder:
    """The holder.py process: opens, reopens and closes images on request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(HOLDER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=ENV)

    def ask(self, request: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        if not ready:
            raise AssertionError(f"corefmt holder did not answer {request!r}")
        answer = self.process.stdout.readline().strip()
        if not answer:
            raise AssertionError(f"corefmt holder exited on {request!r}")
        return answer

    @contextlib.contextmanager
    def holding(self, path: str | Path, format: str, mode: str) -> Iterator[None]:
        answer = self.ask(f"open {path} {format} {mode}")
        assert answer == "ok", answer
        try:
            yield
        finally:
            self.ask("close")

    def stop(self) -> None:
        _stop(self.process)

"""Shared helpers of the qcow2 benchmarks (qcow2_random_io.py,
qcow2_long_chain.py, qcow2_convert_rss.py): child processes measured with
``os.wait4``, medians and ranges, ratio lines, deterministic images.

Not a benchmark itself: ``python benchmarks/qcow2_*.py`` imports it from
the script's own folder.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

COREFMT = "corefmt"
QEMU = "qemu"
#: corefmt's CLI, run by this interpreter (the one corefmt is installed in).
COREFMT_CLI = (sys.executable, "-m", "corefmt.cli.main")
#: Random bytes reused for image data (generating a GiB of random bytes
#: would dominate the build time; the tools do not care).
POOL_SIZE = 1 * MiB
WARMUP_CHUNK = 8 * MiB


@dataclass
class Child:
    """One finished child process."""

    seconds: float
    cpu_seconds: float
    peak_rss: int
    exit_code: int
    stdout: str
    stderr: str


#: GNU time, if installed: it forks the measured command from its own small
#: process and reports that child's peak RSS (see run_child).
GNU_TIME = "/usr/bin/time"


def _gnu_time_works() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    result = subprocess.run([GNU_TIME, "-f", "%M", "true"], capture_output=True, text=True,
                            check=False)
    words = result.stderr.split()
    return result.returncode == 0 and bool(words) and words[-1].isdigit()


USE_GNU_TIME = _gnu_time_works()


#: Children run as a user's would: with their bytecode cached (a set
#: PYTHONDONTWRITEBYTECODE makes every corefmt start compile its imports,
#: some 0.3 s that no user pays).
_CHILD_ENV = {key: value for key, value in os.environ.items()
              if key != "PYTHONDONTWRITEBYTECODE"}


def run_child(argv: Sequence[str], *, stdin_text: str | None = None,
              env: dict[str, str] | None = None) -> Child:
    """Run ``argv``; wall time, CPU time (user + system), peak RSS (bytes)
    and output of that child alone.

    ``os.wait4`` gives the child's own rusage (RUSAGE_CHILDREN would give
    the maximum over every child reaped so far). But Linux starts a child's
    ru_maxrss at the RSS of the process that spawned it (fork or vfork
    then exec keeps the old address space's high-water mark), so a child
    spawned from this Python process never shows less than this process's
    RSS, some 15-30 MiB: qemu-io's 8 MiB would read as 28. So the command
    runs under GNU time (``/usr/bin/time -f %M``) when it is installed:
    time forks it from its own 1 MiB process and reports its peak. Without
    GNU time the figure is wait4's, and rss_method() prints its floor.
    ``env`` adds to (or overrides) the environment the child inherits.

    Output goes to temporary files, not pipes, so a chatty child never
    blocks on a full pipe while this process waits in wait4.
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryFile("w+") as inp, \
            tempfile.NamedTemporaryFile("w+", suffix=".rss") as rss:
        if stdin_text is not None:
            inp.write(stdin_text)
            inp.flush()
            inp.seek(0)
        wrapped = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name, *argv] if USE_GNU_TIME \
            else list(argv)
        started = time.perf_counter()
        process = subprocess.Popen(wrapped, stdin=inp, stdout=out, stderr=err,
                                   env={**_CHILD_ENV, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss * KiB
        if USE_GNU_TIME:
            lines = rss.read().split()
            peak = int(lines[-1]) * KiB if lines and lines[-1].isdigit() else peak
        # time's CPU figures include its reaped child (RUSAGE_BOTH)
        return Child(seconds, usage.ru_utime + usage.ru_stime, peak,
                     process.returncode, out.read(), err.read())


def rss_method() -> str:
    """How peak RSS is measured, for the report's header."""
    floor = run_child(["true"]).peak_rss / MiB
    if USE_GNU_TIME:
        return f"peak RSS: GNU time's %M (a child doing nothing shows {floor:.1f} MiB)"
    return (f"peak RSS: os.wait4 (no GNU time): no figure reads below this process's "
            f"{floor:.1f} MiB; install 'time' for exact figures")


def check_tools(*names: str) -> bool:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}: nothing to compare with", file=sys.stderr)
    return not missing


def load_line() -> str:
    """The machine's load, printed with the figures (they mean less under load)."""
    try:
        with open("/proc/loadavg") as handle:
            one, five, fifteen = handle.read().split()[:3]
    except OSError:
        return "load: unknown"
    return f"load average {one}, {five}, {fifteen} on {os.cpu_count()} CPUs"


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    met = ratio >= target if higher_is_better else ratio <= target
    return f"{'meets' if met else 'misses'} target {'>=' if higher_is_better else '<='} {target}"


def ratio_line(name: str, ours: Sequence[float], theirs: Sequence[float], target: float,
               higher_is_better: bool, against: str = "qemu") -> str:
    """'name: ratio corefmt/qemu R (per repetition lo - hi; meets target ...)'.

    ``ours`` and ``theirs`` are paired by repetition (same index, run next
    to each other), so the per-repetition range shows how much of the
    ratio is the machine's noise.
    """
    ratio = statistics.median(ours) / statistics.median(theirs)
    pairs = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return (f"{name}: ratio corefmt/{against} {ratio:.2f} (per repetition "
            f"{pairs[0]:.2f} - {pairs[-1]:.2f}; {verdict(ratio, target, higher_is_better)})")


def row(label: str, values: Sequence[float], unit: str, fmt: str = ".1f") -> str:
    median, low, high = spread(values)
    return f"  {label:<40}{median:>12{fmt}} {unit:<6} ({low:{fmt}} - {high:{fmt}})"


def data_pool(seed: int) -> memoryview:
    """2 * POOL_SIZE random bytes with no zero byte: no 4 KiB block taken
    from it is ever all zero, so converters allocate every block of it."""
    rng = random.Random(seed)
    return memoryview(rng.randbytes(2 * POOL_SIZE).replace(b"\0", b"\x01"))


def pool_slice(pool: memoryview, offset: int, length: int) -> memoryview:
    """Pool bytes for ``offset`` (a moving start: neighbouring blocks differ)."""
    assert length <= POOL_SIZE
    start = (offset // 4096 * 7919) % POOL_SIZE
    return pool[start:start + length]


def write_extents(path: str, size: int, extents: Sequence[tuple[int, int]], seed: int) -> None:
    """A sparse raw file of ``size`` bytes with pool data at ``extents``
    ((offset, length) pairs); built under a temporary name and renamed,
    so a kept file is never half built."""
    pool = data_pool(seed)
    partial = path + ".partial"
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, length in extents:
            position = offset
            while position < offset + length:
                step = min(POOL_SIZE, offset + length - position)
                if os.pwrite(fd, pool_slice(pool, position, step), position) != step:
                    raise OSError(f"short write at {position}")
                position += step
        os.fsync(fd)  # no writeback of the input during timed runs
    finally:
        os.close(fd)
    os.rename(partial, path)


def random_base(workdir: str, size: int, seed: int, layout_version: int) -> str:
    """A raw base of pool data in every block, reused when the work folder
    kept it (the layout version in its name retires old ones)."""
    path = os.path.join(workdir, f"base-{size}-{seed}-v{layout_version}.raw")
    if not os.path.exists(path):
        write_extents(path, size, [(0, size)], seed)
        print(f"built {path}")
    return path


def warm_page_cache(*paths: str) -> None:
    """Read files once so every timed run finds them in memory."""
    buffer = bytearray(WARMUP_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def qemu_compare(first: str, first_format: str, second: str, second_format: str) -> bool:
    """qemu-img compare: True when the guest-visible contents are identical."""
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", first_format,
                             "-F", second_format, first, second],
                            check=False, stdin=subprocess.DEVNULL)
    return result.returncode == 0


def remove(path: str) -> None:
    """Delete an output, its writeback done first (untimed), so the next
    timed run starts from the same state whichever tool wrote it."""
    if os.path.exists(path):
        os.sync()
        os.unlink(path)

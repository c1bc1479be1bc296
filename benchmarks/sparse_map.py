#!/usr/bin/env python3
"""Benchmark: ``corefmt map`` and ``corefmt convert`` of a huge sparse raw
image against ``qemu-img map`` and ``qemu-img convert``.

The source is a 1 PiB (``--size``) sparse raw file with 100 (``--extents``)
data extents of 64 KiB scattered over it, on tmpfs (``--dir``, default
/dev/shm: ext4 refuses files over 16 TiB). Block status answers whole runs
(SEEK_DATA/SEEK_HOLE), so both tools should take time per extent, not per
byte of virtual size: this measures that corefmt does.

Both tools run as child processes in the same run, interleaved (the order
alternates between repetitions), and the medians and ranges of their wall
times are printed with the ratio corefmt/qemu-img. Outputs are checked:
map's JSON must equal qemu-img's, and each converted image must be
identical to the source (``qemu-img compare``).

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when an output is wrong (or a tool fails).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
PiB = 1024**5

DEFAULT_DIR = "/dev/shm"
DEFAULT_SIZE = PiB
DEFAULT_EXTENTS = 100
DEFAULT_REPEAT = 5
DEFAULT_SEED = 1
EXTENT_LENGTH = 64 * KiB
#: Extents start on this boundary (the file system's block: no partial blocks).
ALIGNMENT = 64 * KiB
TARGET_RATIO = 2.0
EXIT_WRONG = 1
COMPARE_IDENTICAL = 0

COREFMT = "corefmt"
QEMU = "qemu-img"
TOOLS = (COREFMT, QEMU)
OPERATIONS = ("map", "convert")


@dataclass
class Run:
    operation: str
    tool: str
    seconds: float
    correct: bool


def build_source(path: str, size: int, extents: int, seed: int) -> None:
    """A sparse file of ``size`` bytes with ``extents`` extents of random data."""
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(size // ALIGNMENT), extents))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start in starts:
            os.pwrite(fd, rng.randbytes(EXTENT_LENGTH), start * ALIGNMENT)
    finally:
        os.close(fd)


def command(operation: str, tool: str, source: str, target: str) -> list[str]:
    program = [sys.executable, "-m", "corefmt.cli.main"] if tool == COREFMT else [QEMU]
    if operation == "map":
        return [*program, "map", "-f", "raw", "--output=json", source]
    return [*program, "convert", "-f", "raw", "-O", "raw", source, target]


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL)
    return time.perf_counter() - started, result


def identical(first: str, second: str) -> bool:
    result = subprocess.run([QEMU, "compare", "-q", "-f", "raw", "-F", "raw", first, second],
                            check=False)
    return result.returncode == COMPARE_IDENTICAL


def run_all(source: str, workdir: str, repeat: int) -> list[Run]:
    """Each operation by each tool ``repeat`` times, the order alternating."""
    reference = subprocess.run(command("map", QEMU, source, ""), capture_output=True,
                               text=True, check=True).stdout
    runs: list[Run] = []
    for repetition in range(repeat):
        order = TOOLS if repetition % 2 == 0 else TOOLS[::-1]
        for operation in OPERATIONS:
            for tool in order:
                target = os.path.join(workdir, f"out-{tool}.raw")
                seconds, result = timed(command(operation, tool, source, target))
                if operation == "map":
                    correct = result.returncode == 0 and result.stdout == reference
                else:
                    correct = result.returncode == 0 and identical(source, target)
                    if os.path.exists(target):
                        os.unlink(target)
                runs.append(Run(operation, tool, seconds, correct))
                status = "" if correct else f"  WRONG (exit {result.returncode}) " + \
                    result.stderr.strip()[:200]
                print(f"  {operation:<8}{tool:<9}#{repetition + 1}  {seconds * 1000:9.1f} ms"
                      f"{status}", flush=True)
    return runs


def report(runs: list[Run]) -> bool:
    print()
    print(f"{'operation':<10}{'tool':<10}{'median ms':>10}{'range ms':>22}")
    for operation in OPERATIONS:
        medians = {}
        for tool in TOOLS:
            times = [run.seconds * 1000 for run in runs
                     if run.operation == operation and run.tool == tool]
            medians[tool] = statistics.median(times)
            print(f"{operation:<10}{tool:<10}{medians[tool]:>10.1f}"
                  f"{f'{min(times):.1f} - {max(times):.1f}':>22}")
        ratio = medians[COREFMT] / medians[QEMU]
        ratios = sorted(c.seconds / q.seconds for c, q in zip(
            [r for r in runs if r.operation == operation and r.tool == COREFMT],
            [r for r in runs if r.operation == operation and r.tool == QEMU], strict=True))
        print(f"{operation}: ratio corefmt/qemu-img {ratio:.2f} (per repetition "
              f"{ratios[0]:.2f} - {ratios[-1]:.2f}; "
              f"{'meets' if ratio <= TARGET_RATIO else 'misses'} target <= {TARGET_RATIO})")
    correct = all(run.correct for run in runs)
    print("outputs: " + ("all correct" if correct else "SOME WRONG"))
    return correct


def startup_seconds(repeat: int) -> float:
    """Median time of ``corefmt --help``: the interpreter and plugin start-up
    that every corefmt command pays, printed so a ratio can be read with it."""
    times = [timed([sys.executable, "-m", "corefmt.cli.main", "--help"])[0]
             for _ in range(repeat)]
    return statistics.median(times)


def in_process_map_seconds(source: str, repeat: int) -> float | None:
    """Median time of the status walk alone (open, map_entries, close) in this
    process: what map costs without the interpreter's start-up."""
    try:
        import corefmt
        from corefmt.ops.map import map_entries
    except ImportError:
        return None
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        with corefmt.open(source, "raw", read_only=True) as disk:
            for _entry in map_entries(disk):
                pass
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help=f"where the sparse files go (default {DEFAULT_DIR}: tmpfs)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="virtual size in bytes (default 1 PiB)")
    parser.add_argument("--extents", type=int, default=DEFAULT_EXTENTS)
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.extents < 1:
        parser.error("--repeat and --extents must be at least 1")
    if shutil.which(QEMU) is None:
        print("qemu-img is not installed: nothing to compare with", file=sys.stderr)
        return 0
    workdir = tempfile.mkdtemp(prefix="corefmt-sparse-bench-", dir=args.dir)
    try:
        source = os.path.join(workdir, "source.raw")
        try:
            build_source(source, args.size, args.extents, args.seed)
        except OSError as error:
            print(f"cannot build a {args.size}-byte sparse file in {args.dir}: {error}",
                  file=sys.stderr)
            return 0
        print(f"source: {args.size} bytes virtual, {args.extents} extents of "
              f"{EXTENT_LENGTH // KiB} KiB, in {args.dir}")
        print(f"corefmt start-up (--help): {startup_seconds(args.repeat) * 1000:.1f} ms")
        walk = in_process_map_seconds(source, args.repeat)
        if walk is not None:
            print(f"corefmt map in process (open + status walk): {walk * 1000:.1f} ms")
        runs = run_all(source, workdir, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(runs) else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

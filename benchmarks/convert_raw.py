#!/usr/bin/env python3
"""Benchmark: ``corefmt convert`` against ``qemu-img convert``, raw to raw
(``--to qcow2``: raw to qcow2; ``--from qcow2``: the source first made a
qcow2 by qemu-img, untimed, then qcow2 to raw).

The source is a sparse raw image shaped like a used guest disk: scattered
data extents of varied sizes, extents of explicit (allocated) zeros, and
holes. Both tools run as child processes in the same run, alternating
order, on a page-cache-warm source, so the figures compare the tools and
not the disk or the machine's mood. Each output is checked against the
source with ``qemu-img compare`` and its allocated size is reported: a
converter that copies zero runs instead of skipping them is slower *and*
wasteful, and the allocated size shows it.

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when an output's content differs from the source (or a tool fails).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_SIZE = "4G"
DEFAULT_REPEAT = 3
#: Untimed conversions by the same tool right before each timed one. On the
#: VM this was written on, a run's time depends on what ran just before it:
#: the first run after a pause took 3-5x longer, and corefmt right after
#: qemu-img took 1.2-2x longer (in system time) than corefmt after corefmt,
#: while qemu-img was not affected. Settling makes every timed run follow a
#: run of its own tool, so alternating the order cannot favour either one.
DEFAULT_SETTLE = 1
DEFAULT_SEED = 1
#: Share of the virtual size written with non-zero data.
DATA_FRACTION = 0.40
#: Share written with real zero bytes (allocated on disk, content zero).
ZERO_FRACTION = 0.10
#: Extents start and end on this boundary: both tools detect zeros at 4 KiB
#: (``-S 4k``, their default), so every zero extent is skippable by both.
BLOCK_SIZE = 4 * KiB
#: Extent sizes are log-uniform in this range: many small ones, a few large.
MIN_EXTENT = 4 * KiB
MAX_EXTENT = 16 * MiB
#: Share of extents that start right where the previous one ends (no hole
#: between): data next to zeros makes chunks that are part data, part zeros.
ADJACENT_FRACTION = 0.25
#: Random bytes reused for all data (generating 1.6 GiB of random bytes
#: would dominate the build time; the converters do not care).
POOL_SIZE = 1 * MiB
#: Mixed into the seed for the data pool, so pool and layout differ.
POOL_SEED_SALT = 0x5EED
#: Reads that warm the page cache for the source.
WARMUP_CHUNK = 8 * MiB
#: Bump when the layout algorithm changes, so a kept source is rebuilt.
LAYOUT_VERSION = 2

TARGET_RATIO = 1.0
TARGET_PEAK_RSS_MIB = 150
#: corefmt's output counts as sparse if it allocates at most this much more
#: than the data extents (file-system metadata, partial blocks).
SPARSE_TOLERANCE = 0.05
EXIT_MISMATCH = 1
#: qemu-img compare: 0 identical, 1 different, 2 error.
COMPARE_IDENTICAL = 0

COREFMT = "corefmt"
QEMU = "qemu-img"
TOOLS = (COREFMT, QEMU)


@dataclass(frozen=True)
class Piece:
    """One allocated extent of the source: data, or explicit zeros."""

    offset: int
    length: int
    zero: bool


@dataclass
class Run:
    """One timed conversion."""

    tool: str
    repetition: int
    seconds: float
    cpu_seconds: float
    peak_rss: int
    allocated: int
    identical: bool
    exit_code: int


# -- building the source ----------------------------------------------------------
def parse_size(text: str) -> int:
    """'4G', '512M', '1.5G' -> bytes (binary suffixes, as qemu-img)."""
    suffixes = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1].isalpha() else ""
    if unit not in suffixes:
        raise argparse.ArgumentTypeError(f"unknown size suffix in {text!r}")
    try:
        value = float(text[:len(text) - len(unit)]) * suffixes[unit]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from error
    size = int(value) - int(value) % BLOCK_SIZE
    if size < 64 * BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small")
    return size


def _split_blocks(rng: random.Random, blocks: int, zero: bool) -> list[tuple[int, bool]]:
    """Cut ``blocks`` into log-uniformly sized extents (counted in blocks)."""
    low, high = math.log(MIN_EXTENT // BLOCK_SIZE), math.log(MAX_EXTENT // BLOCK_SIZE)
    pieces: list[tuple[int, bool]] = []
    while blocks > 0:
        count = min(blocks, max(1, int(math.exp(rng.uniform(low, high)))))
        pieces.append((count, zero))
        blocks -= count
    return pieces


def plan_layout(size: int, seed: int) -> list[Piece]:
    """Where data and zero extents go; the rest of the disk is holes.

    Extents are shuffled together and separated by random gaps, so data and
    zeros are scattered over the whole disk; a share of them touch the one
    before (ADJACENT_FRACTION), so some chunks hold both data and zeros and
    a converter must find the zero runs inside what the file system
    reports as one data extent.
    """
    rng = random.Random(seed)
    blocks = size // BLOCK_SIZE
    data_blocks = round(blocks * DATA_FRACTION)
    zero_blocks = round(blocks * ZERO_FRACTION)
    hole_blocks = blocks - data_blocks - zero_blocks
    kinds = _split_blocks(rng, data_blocks, False) + _split_blocks(rng, zero_blocks, True)
    rng.shuffle(kinds)
    adjacent = [rng.random() < ADJACENT_FRACTION for _ in kinds]
    cuts = iter(sorted(rng.randrange(hole_blocks + 1) for touch in adjacent if not touch))
    hole_ends = [0 if touch else next(cuts) for touch in adjacent]
    hole_ends = list(itertools.accumulate(hole_ends, max))  # adjacent: no new hole
    gaps = [after - before for before, after in itertools.pairwise([0, *hole_ends])]
    pieces: list[Piece] = []
    position = 0
    for gap, (count, zero) in zip(gaps, kinds, strict=True):
        position += gap
        pieces.append(Piece(position * BLOCK_SIZE, count * BLOCK_SIZE, zero))
        position += count
    return pieces


def _chunks(piece: Piece) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most POOL_SIZE, for os.pwrite."""
    position = piece.offset
    while position < piece.offset + piece.length:
        step = min(POOL_SIZE, piece.offset + piece.length - position)
        yield position, step
        position += step


def build_source(path: str, size: int, seed: int) -> list[Piece]:
    """Write the sparse source image; return its layout.

    One random pool (zero bytes replaced, so no 4 KiB block of data is ever
    all zero by chance) is reused at a moving offset: building 4 GiB takes
    seconds, not minutes.
    """
    pieces = plan_layout(size, seed)
    rng = random.Random(seed ^ POOL_SEED_SALT)
    pool = rng.randbytes(2 * POOL_SIZE).replace(b"\0", b"\x01")
    pool_view = memoryview(pool)
    zeros = memoryview(bytes(POOL_SIZE))
    partial = path + ".partial"  # renamed when complete: a kept source is never half built
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for piece in pieces:
            for offset, length in _chunks(piece):
                if piece.zero:
                    data = zeros[:length]
                else:
                    start = (offset // BLOCK_SIZE * 7) % POOL_SIZE
                    data = pool_view[start:start + length]
                written = os.pwrite(fd, data, offset)
                if written != length:
                    raise OSError(f"short write at {offset}: {written} of {length}")
        os.fsync(fd)  # no writeback of the source during the timed runs
    finally:
        os.close(fd)
    os.rename(partial, path)
    return pieces


def prepare_source(workdir: str, size: int, seed: int) -> tuple[str, list[Piece]]:
    """Build the source, or reuse one a previous run with ``--dir`` left behind."""
    path = os.path.join(workdir, f"source-{size}-{seed}-v{LAYOUT_VERSION}.raw")
    if os.path.exists(path) and os.path.getsize(path) == size:
        print(f"reusing {path}")
        return path, plan_layout(size, seed)
    started = time.perf_counter()
    pieces = build_source(path, size, seed)
    print(f"built {path} in {time.perf_counter() - started:.1f} s")
    return path, pieces


def warm_page_cache(path: str) -> None:
    """Read the whole source once so every run finds it in memory."""
    buffer = bytearray(WARMUP_CHUNK)
    with open(path, "rb", buffering=0) as source:
        while source.readinto(buffer):
            pass


# -- running the tools --------------------------------------------------------------
#: Formats of the source and the target (``--from`` / ``--to``).
FORMATS = {"source": "raw", "target": "raw"}


def command(tool: str, source: str, target: str, extra: Sequence[str]) -> list[str]:
    formats = ["-f", FORMATS["source"], "-O", FORMATS["target"]]
    if tool == COREFMT:
        return [sys.executable, "-m", "corefmt.cli.main", "convert",
                *formats, *extra, source, target]
    return ["qemu-img", "convert", *formats, *extra, source, target]


def timed_run(argv: list[str]) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS in bytes, exit code) of one child.

    CPU time (user + system) is reported next to wall time because it is
    what the tool costs, and it moves less than wall time when something
    else is using the machine.

    ``os.wait4`` gives the child's own rusage; RUSAGE_CHILDREN would give
    the maximum over every child reaped so far, useless after the first.
    """
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return seconds, cpu_seconds, usage.ru_maxrss * KiB, process.returncode


def identical(source: str, target: str) -> bool:
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", FORMATS["source"],
                             "-F", FORMATS["target"], source, target], check=False)
    return result.returncode == COMPARE_IDENTICAL


def allocated_size(path: str) -> int:
    return os.stat(path).st_blocks * 512


def remove_output(path: str) -> None:
    """Delete an output in the same state whichever tool wrote it.

    qemu-img leaves its output unflushed (cache mode 'unsafe'), corefmt
    flushes it. Writing it to disk first (untimed) means each timed run
    starts from the same state, whatever ran before it.
    """
    if os.path.exists(path):
        os.sync()
        os.unlink(path)
    os.sync()


def settle(argv: list[str], target: str, rounds: int) -> None:
    """Untimed conversions by the tool about to be timed (see DEFAULT_SETTLE)."""
    for _ in range(rounds):
        subprocess.run(argv, check=False, stdin=subprocess.DEVNULL)
        remove_output(target)


def run_all(source: str, workdir: str, repeat: int, settle_rounds: int,
            extra: dict[str, Sequence[str]]) -> list[Run]:
    """Every tool ``repeat`` times, the order alternating between repetitions."""
    runs: list[Run] = []
    for repetition in range(repeat):
        order = TOOLS if repetition % 2 == 0 else TOOLS[::-1]
        for tool in order:
            target = os.path.join(workdir, f"out-{tool}.{FORMATS['target']}")
            argv = command(tool, source, target, extra[tool])
            remove_output(target)
            settle(argv, target, settle_rounds)
            seconds, cpu, peak, code = timed_run(argv)
            same = code == 0 and identical(source, target)
            allocated = allocated_size(target) if os.path.exists(target) else 0
            runs.append(Run(tool, repetition + 1, seconds, cpu, peak, allocated, same, code))
            print(f"  {tool:<8} #{repetition + 1}  {seconds:7.2f} s"
                  f"{'' if same else '  OUTPUT DIFFERS' if code == 0 else f'  EXIT {code}'}",
                  flush=True)
            remove_output(target)
    return runs


# -- report -----------------------------------------------------------------------
def mib(size: int) -> float:
    return size / MiB


def report(runs: list[Run], size: int, pieces: list[Piece], qemu_args: Sequence[str]) -> bool:
    """Print the table and the verdicts; True if every output matched."""
    data = sum(piece.length for piece in pieces if not piece.zero)
    zeros = sum(piece.length for piece in pieces if piece.zero)
    print()
    print(f"source: {mib(size):.0f} MiB virtual, {mib(data):.0f} MiB data, "
          f"{mib(zeros):.0f} MiB explicit zeros, {len(pieces)} extents")
    print(f"{'tool':<9}{'run':>4}{'wall s':>9}{'CPU s':>8}{'MiB/s':>9}{'peak RSS MiB':>14}"
          f"{'alloc MiB':>11}  content")
    for run in runs:
        print(f"{run.tool:<9}{run.repetition:>4}{run.seconds:>9.2f}{run.cpu_seconds:>8.2f}"
              f"{mib(data + zeros) / run.seconds:>9.0f}{mib(run.peak_rss):>14.1f}"
              f"{mib(run.allocated):>11.0f}  {'same' if run.identical else 'DIFFERENT'}")
    medians = {tool: statistics.median(r.seconds for r in runs if r.tool == tool)
               for tool in TOOLS}
    cpu = {tool: statistics.median(r.cpu_seconds for r in runs if r.tool == tool)
           for tool in TOOLS}
    ratio = medians[COREFMT] / medians[QEMU]
    peak = max(r.peak_rss for r in runs if r.tool == COREFMT)
    allocated = {tool: max(r.allocated for r in runs if r.tool == tool) for tool in TOOLS}
    sparse = allocated[COREFMT] <= data * (1 + SPARSE_TOLERANCE)
    print()
    print(f"median wall time: corefmt {medians[COREFMT]:.2f} s, "
          f"qemu-img {medians[QEMU]:.2f} s  (median CPU: corefmt {cpu[COREFMT]:.2f} s, "
          f"qemu-img {cpu[QEMU]:.2f} s)")
    print(f"ratio corefmt/qemu-img: {ratio:.2f}  "
          f"({'meets' if ratio <= TARGET_RATIO else 'misses'} target <= {TARGET_RATIO})")
    print(f"corefmt peak RSS: {mib(peak):.1f} MiB  "
          f"({'meets' if mib(peak) < TARGET_PEAK_RSS_MIB else 'misses'} target "
          f"< {TARGET_PEAK_RSS_MIB} MiB)")
    print(f"allocated: corefmt {mib(allocated[COREFMT]):.0f} MiB, "
          f"qemu-img {mib(allocated[QEMU]):.0f} MiB, data {mib(data):.0f} MiB  "
          f"(corefmt output {'sparse' if sparse else 'NOT SPARSE: zero runs were written'})")
    if not any(arg.startswith("-t") for arg in qemu_args):
        print("note: qemu-img convert's default cache mode is 'unsafe' (it never flushes); "
              "corefmt convert fdatasyncs its output. --qemu-arg=-twriteback compares "
              "like with like.")
    matched = all(run.identical for run in runs)
    print("content: " + ("all outputs identical to the source" if matched
                         else "MISMATCH: some outputs differ from the source"))
    return matched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                        help=f"virtual size of the source (default {DEFAULT_SIZE})")
    parser.add_argument("--dir", help="work here and keep the source for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                        help=f"runs of each tool (default {DEFAULT_REPEAT})")
    parser.add_argument("--settle", type=int, default=DEFAULT_SETTLE,
                        help="untimed runs of the same tool before each timed run "
                             f"(default {DEFAULT_SETTLE})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--from", dest="source_format", choices=("raw", "qcow2"),
                        default="raw", help="source format (qcow2: made from the raw "
                                            "source by qemu-img, untimed)")
    parser.add_argument("--to", dest="target_format", choices=("raw", "qcow2"),
                        default="raw", help="target format")
    parser.add_argument("--corefmt-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for corefmt convert (e.g. --corefmt-arg=-m8)")
    parser.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for qemu-img convert (e.g. --qemu-arg=-twriteback)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.settle < 0:
        parser.error("--repeat must be at least 1 and --settle at least 0")
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed: nothing to compare with", file=sys.stderr)
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        source, pieces = prepare_source(workdir, args.size, args.seed)
        FORMATS.update(source=args.source_format, target=args.target_format)
        if args.source_format != "raw":
            made = f"{source}.{args.source_format}"
            if not os.path.exists(made):
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", args.source_format,
                                source, made], check=True)
            source = made
        warm_page_cache(source)
        extra = {COREFMT: args.corefmt_arg, QEMU: args.qemu_arg}
        print(f"converting {source} ({args.repeat} runs each, alternating order)")
        runs = run_all(source, workdir, args.repeat, args.settle, extra)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(runs, args.size, pieces, args.qemu_arg) else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: ``corefmt bench`` against ``qemu-img bench`` on the same images.

Both tools send the same requests (same offsets, sizes and depth: corefmt
bench follows qemu-img bench's algorithm), so the ratio of the times each
prints for its request loop ("Run completed in X seconds.") measures
corefmt's request path (open_chain's node, its request queue, the format
driver and the file storage) against qemu's block layer.

- **Images**: a raw image of random data (``--size``, default 1 GiB; kept
  in ``--dir``) and a fully allocated qcow2 (64 KiB clusters) converted
  from it by qemu-img. Writes go to scratch copies of each (made once and
  overwritten in place, so every write is an overwrite of allocated data:
  no cluster allocation).
- **Cases**: raw and qcow2 x read and write x 4 KiB and 64 KiB x depth 1
  and 16; ``--count`` requests each (default 20000), sequential from
  offset 0 (qemu-img bench's default step: the buffer size), cache mode
  writeback (qemu-img bench's default), page cache warm.
- **Runs**: ``--repeat`` repetitions (default 5); in each, both tools run
  every case, the order alternating between repetitions, each timed run
  right after an untimed one of the same tool (``--settle``).
- **Printed**: per case the median and range of each tool's time, and the
  ratio corefmt/qemu-img of the medians with its range over repetitions.
  Target: ratio <= 1.0 (informational; Python pays per request).
- **Checked**: both tools print the same first line and exit 0, and after
  the write runs the scratch images still match each other's format view
  (qemu-img compare raw vs qcow2 scratch, both written with the same
  requests).

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when a tool fails or the lines or contents differ.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from qcow2_benchlib import (
    COREFMT,
    COREFMT_CLI,
    GiB,
    KiB,
    check_tools,
    load_line,
    qemu_compare,
    random_base,
    ratio_line,
    row,
    run_child,
    warm_page_cache,
)

QEMU = "qemu-img"
DEFAULT_SIZE = 1 * GiB
DEFAULT_COUNT = 20_000
QUICK_COUNT = 4_000
DEFAULT_REPEAT = 5
QUICK_REPEAT = 3
DEFAULT_SETTLE = 1
DEFAULT_SEED = 1
LAYOUT_VERSION = 1
PATTERN = "0xab"
TARGET_RATIO = 1.0
EXIT_WRONG = 1
FORMATS = ("raw", "qcow2")
BUFFER_SIZES = (4 * KiB, 64 * KiB)
DEPTHS = (1, 16)
ELAPSED = re.compile(r"^Run completed in ([0-9.]+) seconds\.$", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    fmt: str
    write: bool
    buffer_size: int
    depth: int

    @property
    def name(self) -> str:
        kind = "write" if self.write else "read"
        return f"{self.fmt} {kind} {self.buffer_size // KiB}K d{self.depth}"

    def arguments(self, count: int) -> list[str]:
        extra = ["-w", f"--pattern={PATTERN}"] if self.write else []
        return ["-f", self.fmt, "-c", str(count), "-d", str(self.depth),
                "-s", str(self.buffer_size), *extra]


@dataclass
class Figures:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {COREFMT: [], QEMU: []})


def command(tool: str) -> list[str]:
    return [*COREFMT_CLI, "bench"] if tool == COREFMT else [QEMU, "bench"]


def run_case(tool: str, case: Case, path: str, count: int) -> tuple[float, str]:
    """One run: (seconds the tool printed, its first line); raises on failure."""
    child = run_child([*command(tool), *case.arguments(count), path])
    found = ELAPSED.search(child.stdout)
    if child.exit_code != 0 or found is None:
        raise RuntimeError(f"{tool} bench {case.name}: exit {child.exit_code}: "
                           f"{child.stderr.strip()}")
    return float(found.group(1)), child.stdout.splitlines()[0]


def prepare(workdir: str, size: int, seed: int) -> dict[tuple[str, bool], str]:
    """{(format, write): image}; the read images are kept, the write ones are scratch."""
    raw = random_base(workdir, size, seed, LAYOUT_VERSION)
    qcow2 = raw.removesuffix(".raw") + ".qcow2"
    if not os.path.exists(qcow2):
        subprocess.run([QEMU, "convert", "-f", "raw", "-O", "qcow2", raw, qcow2 + ".partial"],
                       check=True)
        os.rename(qcow2 + ".partial", qcow2)
    images = {("raw", False): raw, ("qcow2", False): qcow2}
    for fmt, source in (("raw", raw), ("qcow2", qcow2)):
        scratch = os.path.join(workdir, f"scratch.{fmt}")
        shutil.copyfile(source, scratch)
        images[(fmt, True)] = scratch
    warm_page_cache(*images.values())
    return images


def bench(images: dict[tuple[str, bool], str], args: argparse.Namespace
          ) -> tuple[dict[Case, Figures], bool]:
    cases = [Case(fmt, write, size, depth) for fmt in FORMATS for write in (False, True)
             for size in BUFFER_SIZES for depth in DEPTHS]
    figures = {case: Figures() for case in cases}
    same_lines = True
    for repetition in range(args.repeat):
        order = (COREFMT, QEMU) if repetition % 2 == 0 else (QEMU, COREFMT)
        for case in cases:
            path = images[(case.fmt, case.write)]
            lines = {}
            for tool in order:
                for _ in range(args.settle):
                    run_case(tool, case, path, args.count)
                seconds, lines[tool] = run_case(tool, case, path, args.count)
                figures[case].seconds[tool].append(seconds)
            if lines[COREFMT] != lines[QEMU]:
                print(f"{case.name}: first lines differ: {lines}", file=sys.stderr)
                same_lines = False
        print(f"repetition {repetition + 1}/{args.repeat} done", file=sys.stderr)
    return figures, same_lines


def report(figures: dict[Case, Figures], count: int) -> None:
    print(f"\n{count} requests per run; seconds of the request loop as each tool prints it")
    for case, figure in figures.items():
        print(f"{case.name}:")
        for tool in (COREFMT, QEMU):
            print(row(tool, figure.seconds[tool], "s", ".3f"))
        print("  " + ratio_line("elapsed", figure.seconds[COREFMT], figure.seconds[QEMU],
                                TARGET_RATIO, higher_is_better=False, against=QEMU))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_COUNT} requests, {QUICK_REPEAT} repetitions, 256 MiB")
    parser.add_argument("--dir", help="work here and keep the images for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--size", type=int, help="image size in bytes (default 1 GiB)")
    parser.add_argument("--count", type=int, help=f"requests per run (default {DEFAULT_COUNT})")
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {DEFAULT_REPEAT})")
    parser.add_argument("--settle", type=int, default=DEFAULT_SETTLE,
                        help="untimed runs of the same tool before each timed run")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    args.count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    args.size = args.size or (DEFAULT_SIZE // 4 if args.quick else DEFAULT_SIZE)
    if args.size % (64 * KiB) or args.count < 1 or args.repeat < 1:
        parser.error("--size must be a multiple of 64 KiB; --count and --repeat at least 1")
    if not check_tools(QEMU):
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(load_line())
        images = prepare(workdir, args.size, args.seed)
        figures, correct = bench(images, args)
        report(figures, args.count)
        # Both scratch images got the same write requests (same offsets and pattern).
        correct &= qemu_compare(images[("raw", True)], "raw", images[("qcow2", True)], "qcow2")
        print(load_line())
    except (RuntimeError, subprocess.CalledProcessError) as error:
        print(f"failed: {error}", file=sys.stderr)
        return EXIT_WRONG
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("lines and data: " + ("same" if correct else "DIFFERENT"))
    return 0 if correct else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: a backing chain of 500 qcow2 overlays over a raw base:
``convert -O raw``, ``map --output=json`` and "open + one 4 KiB read"
of the top, corefmt against qemu-img / qemu-io, time and peak RSS.

The chain (``--overlays``, default 500; ``--quick`` 50) is built by
qemu-img and qemu-io, untimed, and kept in ``--dir`` for the next run:
a raw base of ``--size`` (default 1 GiB) with 64 KiB of data at offset 0
and holes elsewhere, then overlay k (1..N, 64 KiB clusters) holding one
4 KiB write of pattern k at offset k * stride (stride: the size divided
by N + 1, rounded down to 64 KiB). Each overlay is written standalone
and then pointed at the one below with ``qemu-img rebase -u``: building
is linear in N, and the guest content is what writing through the chain
would give (below each write there are only holes).

Timed, each tool as a child process, ``--repeat`` times, interleaved (the
order alternates between repetitions):

- convert: ``corefmt convert -f qcow2 -O raw top out`` against
  ``qemu-img convert -f qcow2 -O raw -t writeback top out`` (both flush
  their output; qemu-img's default ``-t unsafe`` would not).
- map: ``corefmt map -f qcow2 --output=json top`` against ``qemu-img map``.
- open + read: ``corefmt io -f qcow2 -c 'read 0 4k' top`` against
  ``qemu-io -f qcow2 -c 'read 0 4k' top``: offset 0 is only in the base,
  so the read goes through every layer.

Measured: wall time, CPU time and peak RSS of each child (``os.wait4``).
Checked: convert's outputs equal the top (``qemu-img compare``), map's
JSON equals qemu-img's, both reads print ``read 4096/4096 bytes at
offset 0``. Targets: time ratio corefmt/qemu <= 0.5 for each operation,
corefmt peak RSS <= 50 MiB.

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when an output is wrong (or a tool fails).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qcow2_benchlib import (
    COREFMT,
    COREFMT_CLI,
    QEMU,
    GiB,
    KiB,
    MiB,
    check_tools,
    load_line,
    qemu_compare,
    ratio_line,
    remove,
    row,
    rss_method,
    run_child,
    verdict,
    warm_page_cache,
    write_extents,
)

CLUSTER = 64 * KiB
DEFAULT_SIZE = 1 * GiB
DEFAULT_OVERLAYS = 500
QUICK_OVERLAYS = 50
DEFAULT_REPEAT = 5
QUICK_REPEAT = 3
DEFAULT_SEED = 1
BASE_DATA = 64 * KiB
TARGET_TIME_RATIO = 0.5
TARGET_PEAK_RSS_MIB = 50
EXIT_WRONG = 1
#: Bump when the chain's layout changes, so a kept chain is rebuilt.
LAYOUT_VERSION = 1
TOOLS = (COREFMT, QEMU)
OPERATIONS = ("convert", "map", "open + read")
READ_LINE = "read 4096/4096 bytes at offset 0"


@dataclass
class Run:
    operation: str
    tool: str
    seconds: float
    cpu_seconds: float
    peak_rss: int
    correct: bool
    note: str


def overlay_path(chain_dir: str, index: int) -> str:
    return os.path.join(chain_dir, f"overlay-{index:04d}.qcow2")


def build_chain(workdir: str, size: int, overlays: int, seed: int) -> str:
    """Build the chain (or reuse a complete one); return the top's path."""
    chain_dir = os.path.join(workdir, f"chain-{overlays}-{size}-{seed}-v{LAYOUT_VERSION}")
    marker = os.path.join(chain_dir, "complete")
    top = overlay_path(chain_dir, overlays)
    if os.path.exists(marker):
        print(f"reusing {chain_dir}")
        return top
    shutil.rmtree(chain_dir, ignore_errors=True)
    os.makedirs(chain_dir)
    started = time.perf_counter()
    base = os.path.join(chain_dir, "base.raw")
    write_extents(base, size, [(0, BASE_DATA)], seed)
    stride = size // (overlays + 1) // CLUSTER * CLUSTER
    if stride < CLUSTER:
        raise SystemExit(f"--size {size} is too small for {overlays} overlays")
    below, below_format = base, "raw"
    for index in range(1, overlays + 1):
        path = overlay_path(chain_dir, index)
        run = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
                path, str(size)],
               ["qemu-io", "-f", "qcow2", "-c",
                f"write -q -P {index % 255 + 1} {index * stride} 4k", path],
               ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", os.path.basename(below),
                "-F", below_format, path]]
        for argv in run:
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
        below, below_format = path, "qcow2"
        if index % 100 == 0:
            print(f"  built {index} of {overlays} overlays", flush=True)
    os.sync()
    open(marker, "w").close()
    print(f"built {chain_dir} in {time.perf_counter() - started:.1f} s")
    return top


def command(operation: str, tool: str, top: str, target: str) -> list[str]:
    if operation == "convert":
        if tool == COREFMT:
            return [*COREFMT_CLI, "convert", "-f", "qcow2", "-O", "raw", top, target]
        return ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-t", "writeback",
                top, target]
    if operation == "map":
        program = [*COREFMT_CLI] if tool == COREFMT else ["qemu-img"]
        return [*program, "map", "-f", "qcow2", "--output=json", top]
    program = [*COREFMT_CLI, "io"] if tool == COREFMT else ["qemu-io"]
    return [*program, "-f", "qcow2", "-c", "read 0 4k", top]


def run_all(top: str, workdir: str, repeat: int) -> list[Run]:
    reference_map = subprocess.run(command("map", QEMU, top, ""), capture_output=True,
                                   text=True, check=True).stdout
    runs: list[Run] = []
    for repetition in range(repeat):
        order = TOOLS if repetition % 2 == 0 else TOOLS[::-1]
        for operation in OPERATIONS:
            for tool in order:
                target = os.path.join(workdir, f"out-{tool}.raw")
                child = run_child(command(operation, tool, top, target))
                note = ""
                if child.exit_code != 0:
                    correct, note = False, f"exit {child.exit_code}: {child.stderr.strip()[-300:]}"
                elif operation == "convert":
                    correct = qemu_compare(top, "qcow2", target, "raw")
                    note = "" if correct else "output differs from the top"
                elif operation == "map":
                    correct = child.stdout == reference_map
                    note = "" if correct else "JSON differs from qemu-img's"
                else:
                    correct = child.stdout.splitlines()[:1] == [READ_LINE]
                    note = "" if correct else f"printed {child.stdout.strip()[:100]!r}"
                remove(target)
                runs.append(Run(operation, tool, child.seconds, child.cpu_seconds,
                                child.peak_rss, correct, note))
                print(f"  {operation:<12}{tool:<9}#{repetition + 1}  {child.seconds:8.3f} s"
                      f"  {child.peak_rss / MiB:6.1f} MiB{'' if correct else '  WRONG: ' + note}",
                      flush=True)
    return runs


def report(runs: list[Run], overlays: int) -> bool:
    print()
    print(f"chain of {overlays} qcow2 overlays over raw: median (range)")
    for operation in OPERATIONS:
        picked = {tool: [r for r in runs if r.operation == operation and r.tool == tool]
                  for tool in TOOLS}
        for tool in TOOLS:
            label = f"{operation} {tool}"
            print(row(label + " wall", [r.seconds for r in picked[tool]], "s", ".3f"))
            print(row(label + " CPU", [r.cpu_seconds for r in picked[tool]], "s", ".3f"))
            print(row(label + " peak RSS", [r.peak_rss / MiB for r in picked[tool]], "MiB"))
        print(ratio_line(f"{operation} time", [r.seconds for r in picked[COREFMT]],
                         [r.seconds for r in picked[QEMU]], TARGET_TIME_RATIO,
                         higher_is_better=False))
        peak = max(r.peak_rss for r in picked[COREFMT]) / MiB
        print(f"{operation} corefmt peak RSS: {peak:.1f} MiB "
              f"({verdict(peak, TARGET_PEAK_RSS_MIB, higher_is_better=False)} MiB; "
              f"qemu {max(r.peak_rss for r in picked[QEMU]) / MiB:.1f} MiB)")
    correct = all(run.correct for run in runs)
    print("outputs: " + ("all correct" if correct else "SOME WRONG"))
    return correct


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_OVERLAYS} overlays, {QUICK_REPEAT} runs each")
    parser.add_argument("--dir", help="work here and keep the chain for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--overlays", type=int,
                        help=f"qcow2 overlays in the chain (default {DEFAULT_OVERLAYS})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="virtual size in bytes (default 1 GiB)")
    parser.add_argument("--repeat", type=int, help=f"runs of each (default {DEFAULT_REPEAT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    overlays = args.overlays or (QUICK_OVERLAYS if args.quick else DEFAULT_OVERLAYS)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if overlays < 1 or repeat < 1:
        parser.error("--overlays and --repeat must be at least 1")
    if not check_tools("qemu-img", "qemu-io"):
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-qcow2-chain-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(load_line())
        print(rss_method())
        top = build_chain(workdir, args.size, overlays, args.seed)
        warm_page_cache(*(os.path.join(os.path.dirname(top), name)
                          for name in sorted(os.listdir(os.path.dirname(top)))))
        print(f"{overlays} overlays, {repeat} runs of each operation, interleaved")
        runs = run_all(top, workdir, repeat)
        print(load_line())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(runs, overlays) else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: peak RSS (and time) of ``corefmt convert`` raw -> qcow2 and
qcow2 -> raw for big sparse images, against ``qemu-img convert``.

Memory must not grow with the virtual size: the sources have the same
data (``--data``, default 256 MiB; ``--quick`` 64 MiB) in extents of
256 KiB at random 256 KiB-aligned offsets (``--seed``) over each virtual
size of ``--sizes`` (default 16 GiB and 256 GiB; ``--quick`` 16 GiB), the
rest holes. The raw sources are built, and the qcow2 sources made from
them by ``qemu-img convert`` (64 KiB clusters), untimed, in ``--dir``
(kept for the next run when given).

For each size and direction both tools run as child processes
``--repeat`` times, interleaved (the order alternating), page cache warm:
``corefmt convert -f F -O T src out`` against ``qemu-img convert -f F -O T
-t writeback src out`` (both flush their output). Measured: peak RSS (
``os.wait4``), wall and CPU time. Checked: each output equals the source
(``qemu-img compare``). Targets: corefmt peak RSS <= 150 MiB at every
size; time ratio corefmt/qemu-img <= 1.0 (as convert_raw.py).

This is a benchmark, not a test: it exits 0 whatever the figures, and 1
only when an output differs from its source (or a tool fails).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
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

EXTENT = 256 * KiB
DEFAULT_SIZES = "16G,256G"
QUICK_SIZES = "16G"
DEFAULT_DATA = 256 * MiB
QUICK_DATA = 64 * MiB
DEFAULT_REPEAT = 3
QUICK_REPEAT = 2
DEFAULT_SEED = 1
TARGET_PEAK_RSS_MIB = 150
TARGET_TIME_RATIO = 1.0
EXIT_WRONG = 1
LAYOUT_VERSION = 1
TOOLS = (COREFMT, QEMU)
DIRECTIONS = (("raw", "qcow2"), ("qcow2", "raw"))


@dataclass
class Run:
    size: int
    direction: str
    tool: str
    seconds: float
    cpu_seconds: float
    peak_rss: int
    correct: bool


def parse_sizes(text: str) -> list[int]:
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    sizes = []
    for word in text.split(","):
        word = word.strip().upper()
        sizes.append(int(float(word[:-1]) * units[word[-1]]) if word[-1] in units
                     else int(word))
    return sizes


def prepare_sources(workdir: str, size: int, data: int, seed: int) -> dict[str, str]:
    """{'raw': path, 'qcow2': path} of the sources, built or reused."""
    stem = os.path.join(workdir, f"sparse-{size}-{data}-{seed}-v{LAYOUT_VERSION}")
    paths = {"raw": stem + ".raw", "qcow2": stem + ".qcow2"}
    if not os.path.exists(paths["raw"]):
        slots = random.Random(seed).sample(range(size // EXTENT), data // EXTENT)
        write_extents(paths["raw"], size, [(slot * EXTENT, EXTENT) for slot in sorted(slots)],
                      seed)
        print(f"built {paths['raw']}")
    if not os.path.exists(paths["qcow2"]):
        partial = paths["qcow2"] + ".partial"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                        "cluster_size=64k", paths["raw"], partial], check=True)
        os.rename(partial, paths["qcow2"])
        print(f"built {paths['qcow2']} (qemu-img convert)")
    return paths


def command(tool: str, source_format: str, target_format: str, source: str,
            target: str) -> list[str]:
    formats = ["-f", source_format, "-O", target_format]
    if tool == COREFMT:
        return [*COREFMT_CLI, "convert", *formats, source, target]
    return ["qemu-img", "convert", *formats, "-t", "writeback", source, target]


def run_all(workdir: str, sizes: Sequence[int], data: int, seed: int, repeat: int) -> list[Run]:
    runs: list[Run] = []
    for size in sizes:
        sources = prepare_sources(workdir, size, data, seed)
        warm_page_cache(sources["qcow2"])  # the raw one: read through SEEK_DATA below
        for source_format, target_format in DIRECTIONS:
            direction = f"{source_format} -> {target_format}"
            if source_format == "raw":
                warm_raw(sources["raw"])
            for repetition in range(repeat):
                order = TOOLS if repetition % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    target = os.path.join(workdir, f"out-{tool}.{target_format}")
                    remove(target)
                    child = run_child(command(tool, source_format, target_format,
                                              sources[source_format], target))
                    correct = child.exit_code == 0 and qemu_compare(
                        sources[source_format], source_format, target, target_format)
                    remove(target)
                    runs.append(Run(size, direction, tool, child.seconds, child.cpu_seconds,
                                    child.peak_rss, correct))
                    print(f"  {size / GiB:5.0f} GiB {direction:<14}{tool:<9}#{repetition + 1}"
                          f"  {child.seconds:7.2f} s  {child.peak_rss / MiB:6.1f} MiB"
                          f"{'' if correct else '  WRONG ' + child.stderr.strip()[-300:]}",
                          flush=True)
    return runs


def warm_raw(path: str) -> None:
    """Read only the data extents of a sparse raw file (SEEK_DATA/SEEK_HOLE):
    reading 256 GiB of holes would take minutes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, position = os.fstat(fd).st_size, 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after position
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for chunk in range(start, end, 8 * MiB):
                os.pread(fd, min(8 * MiB, end - chunk), chunk)
            position = end
    finally:
        os.close(fd)


def report(runs: list[Run], sizes: Sequence[int]) -> bool:
    print()
    print("convert of sparse images: median (range)")
    for size in sizes:
        for source_format, target_format in DIRECTIONS:
            direction = f"{source_format} -> {target_format}"
            picked = {tool: [r for r in runs if r.size == size and r.direction == direction
                             and r.tool == tool] for tool in TOOLS}
            name = f"{size / GiB:.0f} GiB {direction}"
            for tool in TOOLS:
                print(row(f"{name} {tool} wall", [r.seconds for r in picked[tool]], "s", ".2f"))
                print(row(f"{name} {tool} peak RSS", [r.peak_rss / MiB for r in picked[tool]],
                          "MiB"))
            print(ratio_line(f"{name} time", [r.seconds for r in picked[COREFMT]],
                             [r.seconds for r in picked[QEMU]], TARGET_TIME_RATIO,
                             higher_is_better=False, against="qemu-img"))
            peak = max(r.peak_rss for r in picked[COREFMT]) / MiB
            print(f"{name} corefmt peak RSS {peak:.1f} MiB "
                  f"({verdict(peak, TARGET_PEAK_RSS_MIB, higher_is_better=False)} MiB; "
                  f"qemu-img {max(r.peak_rss for r in picked[QEMU]) / MiB:.1f} MiB)")
    correct = all(run.correct for run in runs)
    print("outputs: " + ("all identical to their sources" if correct else "SOME DIFFER"))
    return correct


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {QUICK_SIZES}, {QUICK_DATA // MiB} MiB of data, "
                             f"{QUICK_REPEAT} runs each")
    parser.add_argument("--dir", help="work here and keep the sources for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--sizes", help=f"virtual sizes, comma-separated (default "
                                        f"{DEFAULT_SIZES})")
    parser.add_argument("--data", type=int,
                        help=f"bytes of data in each source (default {DEFAULT_DATA // MiB} MiB)")
    parser.add_argument("--repeat", type=int, help=f"runs of each (default {DEFAULT_REPEAT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    data = (args.data or (QUICK_DATA if args.quick else DEFAULT_DATA)) // EXTENT * EXTENT
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if repeat < 1 or data < EXTENT or any(size < 2 * data for size in sizes):
        parser.error("--repeat at least 1; --data at least 256 KiB and at most half a size")
    if not check_tools("qemu-img"):
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-qcow2-rss-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(load_line())
        print(rss_method())
        print(f"sizes {', '.join(f'{s / GiB:.0f} GiB' for s in sizes)}, "
              f"{data / MiB:.0f} MiB of data each, {repeat} runs of each, interleaved")
        runs = run_all(workdir, sizes, data, args.seed, repeat)
        print(load_line())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(runs, sizes) else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

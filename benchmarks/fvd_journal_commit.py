#!/usr/bin/env python3
"""Benchmark: FVD's two journal commit modes (open option ``journal_commit``)
on random writes into an FVD image over a raw base, with qemu-io on a qcow2
overlay of the same base as the baseline.

``journal_commit=flush`` (the default) keeps a write's journal records in
memory until the guest's next flush, then writes them all at once after one
data barrier; ``journal_commit=write`` writes each write's records at once,
each after a data barrier of its own (two fsyncs per write that changes
metadata). Both give the same guarantee at a flush; the second costs more.

Workload: ``--writes`` (default 512) writes of 4 KiB and, separately, of
64 KiB, at uniformly random 4 KiB-aligned offsets (``--seed``; the same
offsets for every configuration of a size) into a fresh image over a raw
base of random data (``--size``, default 1 GiB, built untimed, kept in
``--dir``), with a flush after every N writes, N in {1, 16, 256}. FVD
images are made with corefmt's defaults (64 KiB blocks), compact
(``compact_image=on``, 1 MiB chunks) and not. Nearly every write lands in
a block not yet copied from the base, so nearly every write needs journal
records: the case where the two modes differ most. corefmt runs through
the Python API in a child process of its own, the loop (writes and
flushes, not the open and the close) timed in that process. The baseline
is one ``qemu-io -t writeback`` process per run on a fresh qcow2 overlay
(64 KiB clusters) of the same base, with one ``-c 'write ...'`` per write
and a ``-c flush`` after every N: the same durability. Its time is the
process's wall time less that of a qemu-io that only opens, flushes and
closes a fresh overlay (the median of those measured in the same run).

Runs are interleaved: every repetition (``--repeat``, default 5) runs the
five tools of one (size, N) group next to each other, in an order that
alternates between repetitions. Printed: median and range of writes/s for
each, the ratio write/flush of the medians (below 1: journal_commit=write
is slower) with its range over repetitions, and the ratios of each FVD
mode against qemu-io; and the disk flushes (fdatasync/fsync) each run
makes, counted in corefmt's loop and, when strace is installed, for
qemu-io (exact, whatever the machine's noise). Checked, after each run of
the last repetition: the image's guest-visible content equals a reference
overlay written untimed by qemu-io (``corefmt compare``, ``qemu-img
compare``).

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when an image's content is wrong (or a tool fails).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from qcow2_benchlib import (
    COREFMT_CLI,
    GiB,
    KiB,
    MiB,
    check_tools,
    load_line,
    random_base,
    remove,
    run_child,
    spread,
    warm_page_cache,
)

ALIGN = 4 * KiB
WRITE_SIZES = (4 * KiB, 64 * KiB)
FLUSH_EVERY = (1, 16, 256)
DEFAULT_SIZE = 1 * GiB
DEFAULT_WRITES = 512
QUICK_WRITES = 128
DEFAULT_REPEAT = 5
QUICK_REPEAT = 3
DEFAULT_SEED = 1
PATTERN = 0xAB
CLUSTER = 64 * KiB
EXIT_WRONG = 1
#: Bump when the base image's content changes, so kept bases are rebuilt.
LAYOUT_VERSION = 1

FLUSH, WRITE = "flush", "write"
QEMU_IO = "qemu-io qcow2"
#: (label, compact_image, journal_commit) of the FVD runs.
FVD_RUNS = (("fvd flush", False, FLUSH), ("fvd write", False, WRITE),
            ("fvd flush compact", True, FLUSH), ("fvd write compact", True, WRITE))
TOOLS = (*(label for label, _, _ in FVD_RUNS), QEMU_IO)

#: The corefmt side, in a child process of its own (like qemu-io): prints
#: one JSON line. argv: image, offsets file, write size, N, journal_commit.
WORKLOAD = r"""
import json, os, sys, time
import corefmt

syncs = [0]  # disk flushes (fdatasync/fsync) the loop asks for: the cost model
for name in ("fdatasync", "fsync"):
    def counted(fd, _real=getattr(os, name)):
        syncs[0] += 1
        return _real(fd)
    setattr(os, name, counted)

path, offsets_file, size, every, mode = sys.argv[1:6]
size, every = int(size), int(every)
with open(offsets_file) as handle:
    offsets = [int(line) for line in handle]
data = bytes([0xAB]) * size
with corefmt.open(path, "fvd", options={"journal_commit": mode}) as disk:
    write, flush = disk.write, disk.flush
    syncs[0] = 0
    start = time.perf_counter()
    for count, offset in enumerate(offsets, 1):
        write(offset, data)
        if count % every == 0:
            flush()
    if len(offsets) % every:
        flush()
    seconds = time.perf_counter() - start
    loop_syncs = syncs[0]
print(json.dumps({"seconds": seconds, "syncs": loop_syncs}))
"""


# -- images -------------------------------------------------------------------------
def prepare_base(workdir: str, size: int, seed: int) -> str:
    return random_base(workdir, size, seed, LAYOUT_VERSION)


def write_offsets(disk_size: int, write_size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed * 1000 + write_size)
    slots = (disk_size - write_size) // ALIGN + 1
    return [rng.randrange(slots) * ALIGN for _ in range(count)]


def fresh_fvd(path: str, base: str, compact: bool) -> None:
    import corefmt

    remove(path)
    corefmt.create(path, "fvd", options={"compact_image": "on" if compact else "off"},
                   backing=base, backing_format="raw")
    os.sync()


def fresh_qcow2(path: str, base: str) -> None:
    remove(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                    "-o", f"cluster_size={CLUSTER}", path], check=True)
    os.sync()


def qemu_io_argv(image: str, offsets: Sequence[int], write_size: int, every: int
                 ) -> list[str]:
    argv = ["qemu-io", "-f", "qcow2", "-t", "writeback"]
    for count, offset in enumerate(offsets, 1):
        argv += ["-c", f"write -q -P {PATTERN:#x} {offset} {write_size}"]
        if count % every == 0:
            argv += ["-c", "flush"]
    if len(offsets) % every:
        argv += ["-c", "flush"]
    return [*argv, image]


# -- runs -------------------------------------------------------------------------------
def run_fvd(image: str, offsets_file: str, write_size: int, every: int, mode: str
            ) -> tuple[float, int]:
    """(seconds of the loop, disk flushes it made)."""
    child = run_child([sys.executable, "-c", WORKLOAD, image, offsets_file, str(write_size),
                       str(every), mode])
    if child.exit_code != 0:
        raise RuntimeError(f"corefmt workload failed: {child.stderr.strip()[-600:]}")
    result = json.loads(child.stdout)
    return result["seconds"], result["syncs"]


def count_syncs(argv: Sequence[str]) -> int | None:
    """fdatasync + fsync calls of a process, counted by strace (untimed run);
    None without strace."""
    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        result = subprocess.run(["strace", "-f", "-qq", "-c", "-e", "trace=fdatasync,fsync",
                                 "-o", out.name, *argv], capture_output=True, check=False)
        if result.returncode != 0:
            return None
        calls = 0
        for line in out.read().splitlines():
            words = line.split()
            if words and words[-1] in ("fdatasync", "fsync"):
                calls += int(words[3])
        return calls


def run_qemu(image: str, offsets: Sequence[int], write_size: int, every: int) -> float:
    child = run_child(qemu_io_argv(image, offsets, write_size, every))
    if child.exit_code != 0 or "error" in child.stdout.lower() + child.stderr.lower():
        raise RuntimeError(f"qemu-io failed: {(child.stdout + child.stderr).strip()[-600:]}")
    return child.seconds


def empty_qemu(image: str, base: str) -> float:
    """A qemu-io that opens a fresh overlay, flushes and closes it."""
    fresh_qcow2(image, base)
    return run_child(["qemu-io", "-f", "qcow2", "-t", "writeback", "-c", "flush",
                      image]).seconds


def content_ok(image: str, image_format: str, reference: str) -> bool:
    """Whether ``image`` reads as the reference overlay (qcow2) does."""
    if image_format == "qcow2":
        argv = ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", image, reference]
    else:
        argv = [*COREFMT_CLI, "compare", "-q", "-f", image_format, "-F", "qcow2", image,
                reference]
    return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL).returncode == 0


def build_reference(workdir: str, base: str, offsets: Sequence[int], write_size: int) -> str:
    path = os.path.join(workdir, f"reference-{write_size}.qcow2")
    fresh_qcow2(path, base)
    child = run_child(qemu_io_argv(path, offsets, write_size, FLUSH_EVERY[-1]))
    if child.exit_code != 0:
        raise RuntimeError(f"qemu-io could not write the reference overlay: "
                           f"{(child.stdout + child.stderr).strip()[-600:]}")
    return path


def bench(base: str, workdir: str, args: argparse.Namespace
          ) -> tuple[dict[tuple[int, int, str], list[float]],
                     dict[tuple[int, int, str], int | None], list[float], bool]:
    """writes/s per (write size, N, tool), paired by repetition; disk
    flushes per run; the empty qemu-io's seconds; whether every checked
    image was right."""
    results: dict[tuple[int, int, str], list[float]] = {}
    seconds: dict[tuple[int, int, str], list[float]] = {}
    syncs: dict[tuple[int, int, str], int | None] = {}
    empties: list[float] = []
    correct = True
    images = {tool: os.path.join(workdir, f"run-{tool.replace(' ', '-')}."
                                 f"{'qcow2' if tool == QEMU_IO else 'fvd'}") for tool in TOOLS}
    scratch = os.path.join(workdir, "empty.qcow2")
    plans = {}
    for write_size in WRITE_SIZES:
        offsets = write_offsets(args.size, write_size, args.writes, args.seed)
        offsets_file = os.path.join(workdir, f"offsets-{write_size}.txt")
        with open(offsets_file, "w") as handle:
            handle.writelines(f"{offset}\n" for offset in offsets)
        plans[write_size] = (offsets, offsets_file, build_reference(workdir, base, offsets,
                                                                    write_size))
    print(f"{args.writes} random writes per run, {args.repeat} repetitions, "
          f"tools interleaved; writes/s")
    for repetition in range(args.repeat):
        last = repetition == args.repeat - 1
        for group, (write_size, every) in enumerate(
                (size, every) for size in WRITE_SIZES for every in FLUSH_EVERY):
            offsets, offsets_file, reference = plans[write_size]
            order = TOOLS if (repetition + group) % 2 == 0 else TOOLS[::-1]
            line = []
            for tool in order:
                warm_page_cache(base)
                image = images[tool]
                if tool == QEMU_IO:
                    if repetition == 0:  # the flushes qemu-io makes, untimed
                        fresh_qcow2(image, base)
                        total = count_syncs(qemu_io_argv(image, offsets, write_size, every))
                        fresh_qcow2(image, base)
                        empty = count_syncs(["qemu-io", "-f", "qcow2", "-t", "writeback",
                                             "-c", "flush", image])
                        syncs[(write_size, every, tool)] = (
                            None if total is None or empty is None else total - empty)
                    fresh_qcow2(image, base)
                    took = run_qemu(image, offsets, write_size, every)
                else:
                    _, compact, mode = next(run for run in FVD_RUNS if run[0] == tool)
                    fresh_fvd(image, base, compact)
                    took, syncs[(write_size, every, tool)] = run_fvd(
                        image, offsets_file, write_size, every, mode)
                seconds.setdefault((write_size, every, tool), []).append(took)
                if last and not content_ok(image, "qcow2" if tool == QEMU_IO else "fvd",
                                           reference):
                    correct = False
                    print(f"  {tool}: CONTENT DIFFERS from the reference", flush=True)
                line.append(f"{tool} {args.writes / took:,.0f}")
            empties.append(empty_qemu(scratch, base))
            print(f"  #{repetition + 1} {write_size // KiB:>2} KiB N={every:<3} "
                  + ", ".join(line) + "  (qemu-io before its fixed cost is taken off)",
                  flush=True)
    fixed = statistics.median(empties)
    for key, values in seconds.items():
        if key[2] == QEMU_IO:
            values = [max(value - fixed, 1e-6) for value in values]
        results[key] = [args.writes / value for value in values]
    for path in [*images.values(), scratch, *(plan[2] for plan in plans.values())]:
        remove(path)
    return results, syncs, empties, correct


# -- report -----------------------------------------------------------------------
def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> str:
    ratio = statistics.median(ours) / statistics.median(theirs)
    pairs = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return f"{ratio:5.2f} ({pairs[0]:.2f}-{pairs[-1]:.2f})"


def cell(values: Sequence[float]) -> str:
    median, low, high = spread(values)
    return f"{median:7,.0f} ({low:,.0f}-{high:,.0f})"


def report(results: dict[tuple[int, int, str], list[float]],
           syncs: dict[tuple[int, int, str], int | None], empties: Sequence[float],
           writes: int) -> None:
    print()
    median, low, high = spread(empties)
    print(f"qemu-io fixed cost (open, flush, close of a fresh overlay): {median * 1000:.1f} ms "
          f"({low * 1000:.1f}-{high * 1000:.1f}), taken off each qemu-io run")
    print(f"writes/s, median (range) over repetitions, {writes} writes per run; ratios of "
          f"the medians (range of the per-repetition ratios)")
    header = (f"{'size':>6} {'N':>4}  {'layout':<12}{'journal_commit=flush':>24}"
              f"{'journal_commit=write':>24}{'write/flush':>18}{'qemu-io qcow2':>24}"
              f"{'flush/qemu':>18}{'write/qemu':>18}")
    print(header)
    for write_size in WRITE_SIZES:
        for every in FLUSH_EVERY:
            qemu = results[(write_size, every, QEMU_IO)]
            for compact in (False, True):
                suffix = " compact" if compact else ""
                flush = results[(write_size, every, f"fvd flush{suffix}")]
                write = results[(write_size, every, f"fvd write{suffix}")]
                print(f"{write_size // KiB:>4}K {every:>5}  "
                      f"{'compact' if compact else 'not compact':<12}"
                      f"{cell(flush):>24}{cell(write):>24}{paired_ratio(write, flush):>18}"
                      f"{cell(qemu) if not compact else '':>24}"
                      f"{paired_ratio(flush, qemu):>18}{paired_ratio(write, qemu):>18}")
    print()
    print(f"disk flushes (fdatasync/fsync) per run of {writes} writes: corefmt counted in "
          f"its loop, qemu-io by strace (an empty run's taken off)")
    print(f"{'size':>6} {'N':>4}" + "".join(f"{tool:>20}" for tool in TOOLS))
    for write_size in WRITE_SIZES:
        for every in FLUSH_EVERY:
            counts = [syncs.get((write_size, every, tool)) for tool in TOOLS]
            print(f"{write_size // KiB:>4}K {every:>5}" + "".join(
                f"{'-' if count is None else count:>20}" for count in counts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_WRITES} writes per run, {QUICK_REPEAT} repetitions")
    parser.add_argument("--dir", help="work here and keep the base for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="virtual size in bytes, a multiple of 64 KiB (default 1 GiB)")
    parser.add_argument("--writes", type=int,
                        help=f"writes per run (default {DEFAULT_WRITES}; --quick "
                             f"{QUICK_WRITES})")
    parser.add_argument("--repeat", type=int,
                        help=f"repetitions (default {DEFAULT_REPEAT}; --quick {QUICK_REPEAT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    args.writes = args.writes or (QUICK_WRITES if args.quick else DEFAULT_WRITES)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if args.size % CLUSTER or args.size < 16 * MiB or args.writes < 1 or args.repeat < 1:
        parser.error("--size must be a multiple of 64 KiB of at least 16 MiB; --writes "
                     "and --repeat at least 1")
    if not check_tools("qemu-img", "qemu-io"):
        return 0
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set (imports compile every time); the "
              "timed loops do not include imports, but unset it for comparable runs")
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-fvd-journal-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(load_line())
        base = prepare_base(workdir, args.size, args.seed)
        print(f"base: {base} ({args.size / GiB:.2f} GiB of random data, raw)")
        results, syncs, empties, correct = bench(base, workdir, args)
        report(results, syncs, empties, args.writes)
        print(load_line())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("content: " + ("every checked image equals the reference" if correct
                         else "WRONG: some images differ from the reference"))
    return 0 if correct else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: 4 KiB I/O on qcow2 through corefmt's Python API against
``qemu-img bench`` (reads) and ``qemu-io`` (first writes into clusters).

(a) Reads. A fully allocated qcow2 (``--size``, default 1 GiB, 64 KiB
clusters; qemu-img convert of a raw image of random data, untimed, kept in
``--dir``) is read 4 KiB at a time at queue depth 1, page cache warm.
``qemu-img bench`` has no random mode: request k is at
``(offset + k * step) % image size`` (-o, -S). With a step of a large odd
number of 4 KiB blocks (``--step-blocks``, default 104729, a prime: about
409 MiB) every request lands far from the one before, in another cluster,
and the whole image is visited before an offset repeats. corefmt reads
exactly those offsets in a ``node.readinto`` loop (timed in its process,
like qemu-img bench, which times only its request loop). corefmt on
uniformly random offsets is printed beside it, as a check that the stride
does not flatter either tool. qemu-img bench is run with its default AIO
(a thread pool: each request goes to a worker thread and back) and with
``-i io_uring`` when this qemu supports it.

(b) First writes. A fresh qcow2 overlay (64 KiB clusters) over the raw
image gets one 4 KiB write at the start of each of its clusters, in a
shuffled order (``--seed``), each one allocating a cluster and copying the
other 60 KiB from the base: corefmt through ``node.write`` in a loop, qemu
through one ``qemu-io -t writeback`` invocation with one ``-c 'write ...'``
per offset. Both flush once at the end (corefmt ``node.flush()``, qemu-io
``-c flush``). Two figures: the writes alone (corefmt's loop, timed in its
process, against the sum of the times qemu-io prints for each request),
and writes + flush (corefmt's loop and flush against qemu-io's process
wall time minus that of a qemu-io that only opens, flushes and closes a
fresh overlay, the median of those measured in the same repetitions). The
flush writes every copied cluster to disk (64 KiB each), so the second
figure is mostly the disk's. ``--writes`` (``--quick``: 4096) writes into
the first clusters of the shuffled order only. Checked: the two overlays
have the same content and ``qemu-img check`` finds corefmt's clean.

Runs are interleaved (the order alternates between repetitions) and each
timed run follows an untimed one of the same tool (``--settle``). Printed:
median and range of ops/s of each, and the ratio corefmt/qemu of the
medians with its range over repetitions. Targets: ratio >= 1.0 for both.

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when data read or written is wrong (or a tool fails).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from qcow2_benchlib import (
    COREFMT,
    GiB,
    KiB,
    MiB,
    check_tools,
    load_line,
    ratio_line,
    remove,
    row,
    run_child,
    warm_page_cache,
    write_extents,
)

BLOCK = 4 * KiB
CLUSTER = 64 * KiB
DEFAULT_SIZE = 1 * GiB
DEFAULT_READS = 200_000
QUICK_READS = 20_000
DEFAULT_REPEAT = 5
QUICK_REPEAT = 3
#: --quick writes into this many clusters only (256 MiB of the 1 GiB overlay):
#: each first write copies a whole cluster, and the final flush writes it all.
QUICK_WRITES = 4096
DEFAULT_SETTLE = 1
DEFAULT_STEP_BLOCKS = 104_729
DEFAULT_SEED = 1
PATTERN = 0xAB
TARGET_RATIO = 1.0
EXIT_WRONG = 1
#: Bump when the image layout changes, so kept images are rebuilt.
LAYOUT_VERSION = 1

QEMU_THREADS = "qemu-img bench"
QEMU_URING = "qemu-img bench -i io_uring"
QEMU_IO = "qemu-io"
#: What qemu-io prints after each request: '..., 1 ops; 00.00 sec (... and N ops/sec)'.
QEMU_IO_RATE = re.compile(r" and ([0-9.]+) ops/sec\)")

#: The corefmt side, run in a child process of its own (like qemu's tools):
#: prints one JSON line. argv: mode, image, then mode-specific arguments.
WORKLOAD = r"""
import json, os, random, sys, time
import corefmt

mode, path = sys.argv[1], sys.argv[2]
result = {}
if mode == "read":
    count, step, seed, raw = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    with corefmt.open(path, "qcow2", read_only=True) as disk:
        size = disk.virtual_size
        offsets = [(k * step) % size for k in range(count)]  # qemu-img bench's sequence
        rng = random.Random(seed)
        uniform = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
        buf = bytearray(4096)
        readinto = disk.readinto
        for name, sequence in (("stride", offsets), ("random", uniform)):
            start = time.perf_counter()
            for offset in sequence:
                readinto(offset, buf)
            result[name] = count / (time.perf_counter() - start)
        fd = os.open(raw, os.O_RDONLY)
        try:  # the data read must be the raw image's
            result["wrong"] = sum(disk.read(o, 4096) != os.pread(fd, 4096, o)
                                  for o in offsets[:256] + uniform[:256])
        finally:
            os.close(fd)
elif mode == "write":
    with open(sys.argv[3]) as handle:
        offsets = [int(line) for line in handle]
    data = bytes([int(sys.argv[4])]) * 4096
    with corefmt.open(path, "qcow2") as disk:
        write = disk.write
        start = time.perf_counter()
        for offset in offsets:
            write(offset, data)
        written = time.perf_counter()
        disk.flush()
        result["writes"] = written - start
        result["seconds"] = time.perf_counter() - start
print(json.dumps(result))
"""


# -- images -------------------------------------------------------------------------
def prepare_images(workdir: str, size: int, seed: int) -> tuple[str, str]:
    """(raw, qcow2): random data in every block; reused when ``--dir`` kept them."""
    stem = os.path.join(workdir, f"random-{size}-{seed}-v{LAYOUT_VERSION}")
    raw, qcow2 = stem + ".raw", stem + ".qcow2"
    if not os.path.exists(raw):
        write_extents(raw, size, [(0, size)], seed)
        print(f"built {raw}")
    if not os.path.exists(qcow2):
        partial = qcow2 + ".partial"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                        "-o", f"cluster_size={CLUSTER}", raw, partial], check=True)
        os.rename(partial, qcow2)
        print(f"built {qcow2} (qemu-img convert)")
    return raw, qcow2


def fresh_overlay(path: str, base: str) -> None:
    remove(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                    "-o", f"cluster_size={CLUSTER}", path], check=True)
    os.sync()


# -- (a) reads ----------------------------------------------------------------------
def io_uring_works(image: str) -> bool:
    result = subprocess.run(["qemu-img", "bench", "-c", "1", "-i", "io_uring", "-f", "qcow2",
                             image], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"qemu-img bench -i io_uring does not work here: "
              f"{result.stderr.strip()[:200]}")
    return result.returncode == 0


def qemu_bench(image: str, count: int, step: int, uring: bool) -> float:
    """ops/s of one qemu-img bench run (its own timer: the request loop only)."""
    argv = ["qemu-img", "bench", "-f", "qcow2", "-c", str(count), "-d", "1",
            "-t", "writeback", "-s", "4k", "-o", "0", "-S", str(step),
            *(["-i", "io_uring"] if uring else []), image]
    child = run_child(argv)
    found = re.search(r"Run completed in ([0-9.]+) seconds", child.stdout)
    if child.exit_code != 0 or found is None:
        raise RuntimeError(f"qemu-img bench failed: {child.stderr.strip()[:300]}")
    return count / float(found.group(1))


def corefmt_reads(image: str, raw: str, count: int, step: int, seed: int) -> dict:
    child = run_child([sys.executable, "-c", WORKLOAD, "read", image, str(count), str(step),
                       str(seed), raw])
    if child.exit_code != 0:
        raise RuntimeError(f"corefmt read workload failed: {child.stderr.strip()[-600:]}")
    return json.loads(child.stdout)


def bench_reads(image: str, raw: str, args: argparse.Namespace) -> tuple[dict, bool]:
    step = args.step_blocks * BLOCK
    tools = [COREFMT, QEMU_THREADS] + ([QEMU_URING] if io_uring_works(image) else [])
    results: dict[str, list[float]] = {tool: [] for tool in [*tools, "corefmt random"]}
    correct = True
    warm_page_cache(raw)  # for the check of the data read
    print(f"(a) {args.reads} reads of 4 KiB, depth 1, step {args.step_blocks} blocks "
          f"({step / MiB:.0f} MiB) modulo {args.size / MiB:.0f} MiB; "
          f"{args.repeat} runs each, interleaved")
    for repetition in range(args.repeat):
        order = tools if repetition % 2 == 0 else tools[::-1]
        for tool in order:
            for settle in range(args.settle + 1):
                # pages of the image were seen evicted between runs (other jobs'
                # memory): read it all again, untimed, before every run
                warm_page_cache(image)
                if tool == COREFMT:
                    got = corefmt_reads(image, raw, args.reads, step, args.seed)
                    value = got["stride"]
                    if got["wrong"]:
                        correct = False
                        print(f"  corefmt read WRONG DATA at {got['wrong']} offsets")
                else:
                    value = qemu_bench(image, args.reads, step, tool == QEMU_URING)
                if settle == args.settle:  # the timed one
                    results[tool].append(value)
                    if tool == COREFMT:
                        results["corefmt random"].append(got["random"])
            print(f"  {tool:<28}#{repetition + 1}  {value:10.0f} ops/s", flush=True)
    return results, correct


def report_reads(results: dict[str, list[float]]) -> None:
    print()
    print("(a) random 4 KiB reads, ops/s: median (range)")
    for tool, values in results.items():
        label = {COREFMT: "corefmt API (bench's offsets)",
                 "corefmt random": "corefmt API (uniform random)"}.get(tool, tool)
        print(row(label, values, "ops/s", ".0f"))
    for tool in (QEMU_THREADS, QEMU_URING):
        if results.get(tool):
            print(ratio_line(f"reads vs {tool}", results[COREFMT], results[tool],
                             TARGET_RATIO, higher_is_better=True))


# -- (b) first writes ---------------------------------------------------------------
def write_offsets(size: int, seed: int) -> list[int]:
    clusters = list(range(size // CLUSTER))
    random.Random(seed).shuffle(clusters)
    return [cluster * CLUSTER for cluster in clusters]


def qemu_io_argv(overlay: str, offsets: Sequence[int]) -> list[str]:
    # not -q: each write prints its own time, which gives the loop without the flush
    commands = [f"write -P {PATTERN:#x} {offset} 4k" for offset in offsets]
    return ["qemu-io", "-f", "qcow2", "-t", "writeback",
            *(part for command in [*commands, "flush"] for part in ("-c", command)), overlay]


def bench_writes(raw: str, workdir: str, args: argparse.Namespace) -> tuple[dict, bool]:
    offsets = write_offsets(args.size, args.seed)[:args.writes]
    offsets_file = os.path.join(workdir, "write-offsets.txt")
    with open(offsets_file, "w") as handle:
        handle.writelines(f"{offset}\n" for offset in offsets)
    overlay = {tool: os.path.join(workdir, f"overlay-{tool.replace(' ', '-')}.qcow2")
               for tool in (COREFMT, QEMU_IO)}
    scratch = os.path.join(workdir, "overlay-empty.qcow2")
    results: dict[str, list[float]] = {COREFMT: [], QEMU_IO: [], "qemu-io empty": [],
                                       "corefmt process": [], "corefmt empty": [],
                                       "corefmt writes": [], "qemu-io writes": []}
    empty_offsets = os.path.join(workdir, "no-offsets.txt")
    open(empty_offsets, "w").close()
    print()
    print(f"(b) {len(offsets)} first writes of 4 KiB (one per 64 KiB cluster, shuffled) "
          f"into a fresh overlay over raw, one flush at the end; {args.repeat} runs each")
    for repetition in range(args.repeat):
        order = (COREFMT, QEMU_IO) if repetition % 2 == 0 else (QEMU_IO, COREFMT)
        for tool in order:
            for _settle in range(args.settle + 1):  # the last one is timed
                fresh_overlay(overlay[tool], raw)
                warm_page_cache(raw)
                if tool == COREFMT:
                    child = run_child([sys.executable, "-c", WORKLOAD, "write", overlay[tool],
                                       offsets_file, str(PATTERN)])
                    if child.exit_code == 0:
                        timings = json.loads(child.stdout)
                        seconds, loop = timings["seconds"], timings["writes"]
                else:
                    child = run_child(qemu_io_argv(overlay[tool], offsets))
                    seconds = child.seconds
                    rates = [float(rate) for rate in QEMU_IO_RATE.findall(child.stdout)]
                    loop = sum(1 / rate for rate in rates)
                    if child.exit_code == 0 and len(rates) != args.writes:
                        raise RuntimeError(f"qemu-io printed {len(rates)} timings, "
                                           f"not {args.writes}")
                if child.exit_code != 0:
                    raise RuntimeError(f"{tool} failed: {child.stderr.strip()[-600:]}")
            results[tool].append(seconds)
            results[f"{'corefmt' if tool == COREFMT else 'qemu-io'} writes"].append(loop)
            if tool == COREFMT:
                results["corefmt process"].append(child.seconds)
            # the fixed cost of each tool's process (open, flush, close, exit)
            fresh_overlay(scratch, raw)
            if tool == COREFMT:
                empty = run_child([sys.executable, "-c", WORKLOAD, "write", scratch,
                                   empty_offsets, str(PATTERN)])
                results["corefmt empty"].append(empty.seconds)
            else:
                empty = run_child(["qemu-io", "-f", "qcow2", "-t", "writeback",
                                   "-c", "flush", scratch])
                results["qemu-io empty"].append(empty.seconds)
            print(f"  {tool:<10}#{repetition + 1}  {seconds:8.3f} s"
                  f"{'' if tool == COREFMT else ' (process, fixed cost not yet taken off)'}",
                  flush=True)
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                           overlay[COREFMT], overlay[QEMU_IO]], check=False).returncode == 0
    check = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", overlay[COREFMT]],
                           check=False, capture_output=True, text=True)
    print(f"  content: corefmt's overlay {'equals' if same else 'DIFFERS FROM'} qemu-io's; "
          f"qemu-img check of corefmt's: "
          f"{'clean' if check.returncode == 0 else 'ERRORS ' + check.stdout.strip()[:200]}")
    correct = same and check.returncode == 0
    fixed = statistics.median(results["qemu-io empty"])
    results[QEMU_IO] = [seconds - fixed for seconds in results[QEMU_IO]]
    for path in [*overlay.values(), scratch]:
        remove(path)
    return results | {"writes": [float(len(offsets))]}, correct


def report_writes(results: dict[str, list[float]]) -> None:
    writes = results.pop("writes")[0]
    print()
    print(f"(b) first writes into clusters ({writes:.0f} writes + 1 flush): median (range)")
    ops = {tool: [writes / seconds for seconds in results[tool]] for tool in (COREFMT, QEMU_IO)}
    loops = {tool: [writes / seconds for seconds in results[f"{tool} writes"]]
             for tool in ("corefmt", "qemu-io")}
    print(row("corefmt API writes (loop, no flush)", loops["corefmt"], "ops/s", ".0f"))
    print(row("qemu-io writes (sum of its timings)", loops["qemu-io"], "ops/s", ".0f"))
    print(row("corefmt API (loop + flush)", ops[COREFMT], "ops/s", ".0f"))
    print(row("qemu-io (process - empty process)", ops[QEMU_IO], "ops/s", ".0f"))
    print(row("corefmt process wall time", results["corefmt process"], "s", ".3f"))
    print(row("corefmt empty process (open+close)", results["corefmt empty"], "s", ".3f"))
    print(row("qemu-io empty process (open+flush)", results["qemu-io empty"], "s", ".3f"))
    print(ratio_line("first writes, no flush", loops["corefmt"], loops["qemu-io"],
                     TARGET_RATIO, higher_is_better=True, against="qemu-io"))
    print(ratio_line("first writes + flush", ops[COREFMT], ops[QEMU_IO], TARGET_RATIO,
                     higher_is_better=True, against="qemu-io"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_READS} reads, {QUICK_WRITES} writes, "
                             f"{QUICK_REPEAT} runs each")
    parser.add_argument("--dir", help="work here and keep the images for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="virtual size in bytes, a multiple of 64 KiB (default 1 GiB)")
    parser.add_argument("--reads", type=int, help=f"reads per run (default {DEFAULT_READS})")
    parser.add_argument("--writes", type=int,
                        help="clusters written in (b) (default every cluster; "
                             f"--quick {QUICK_WRITES})")
    parser.add_argument("--repeat", type=int, help=f"runs of each (default {DEFAULT_REPEAT})")
    parser.add_argument("--settle", type=int, default=DEFAULT_SETTLE,
                        help="untimed runs of the same tool before each timed run "
                             f"(default {DEFAULT_SETTLE})")
    parser.add_argument("--step-blocks", type=int, default=DEFAULT_STEP_BLOCKS,
                        help="qemu-img bench's -S, in 4 KiB blocks (odd: every block visited)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--only", choices=("reads", "writes"), help="run one part only")
    args = parser.parse_args(argv)
    args.reads = args.reads or (QUICK_READS if args.quick else DEFAULT_READS)
    args.writes = min(args.writes or (QUICK_WRITES if args.quick else args.size // CLUSTER),
                      args.size // CLUSTER)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if args.size % CLUSTER or args.size < CLUSTER or args.reads < 1 or args.repeat < 1:
        parser.error("--size must be a multiple of 64 KiB; --reads and --repeat at least 1")
    if not check_tools("qemu-img", "qemu-io"):
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-qcow2-io-")
    os.makedirs(workdir, exist_ok=True)
    correct = True
    try:
        print(load_line())
        raw, qcow2 = prepare_images(workdir, args.size, args.seed)
        if args.only != "writes":
            reads, ok = bench_reads(qcow2, raw, args)
            report_reads(reads)
            correct &= ok
        if args.only != "reads":
            writes, ok = bench_writes(raw, workdir, args)
            report_writes(writes)
            correct &= ok
        print(load_line())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("data: " + ("correct" if correct else "WRONG"))
    return 0 if correct else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

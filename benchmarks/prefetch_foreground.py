#!/usr/bin/env python3
"""Benchmark: foreground random reads of an FVD overlay while background
prefetch fills it, against the same reads with no prefetch.

FVD's promise is that prefetch makes an image independent of its base
without slowing the workload that uses it. The workload here: random
4 KiB reads (``--seconds`` long, default 4) at uniformly random 4 KiB
offsets of a fresh FVD overlay (64 KiB blocks) over a raw base of random
data (``--size``, default 1 GiB, built untimed in ``--dir``), through
corefmt's API in this process, one reader thread as a guest's. With
prefetch: the overlay is opened with ``prefetch=True`` (the prefetch
filter; its throttling on, FVD's defaults plus corefmt's foreground
trigger) and the reads start at once; without: ``prefetch=False``. Each
repetition (``--repeat``, default 5) runs both, in alternating order, on
fresh overlays. Printed: median and range of reads/s for each, the ratio
with/without of the medians and its range over repetitions (the target is
0.8 or better), and how far prefetch got (bytes copied, pauses) while
the reads ran. An unthrottled run (``throttle=off``) is printed too, to
show what the trigger buys.

Page cache: the base is read once untimed first, so every run reads from
memory, the case where prefetch competes hardest (for the CPU and the
GIL: Python request paths, not the disk). This is a benchmark, not a
test: it exits 0 whatever the timings, 1 only if a read returns wrong data.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import corefmt

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
READ_SIZE = 4 * KiB
BLOCK_OPTIONS = {"block_size": "64k"}
TARGET = 0.8


def build_base(directory: str, size: int) -> str:
    path = os.path.join(directory, "base.raw")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    with open(path, "wb") as out:
        for _ in range(size // (16 * MiB)):
            out.write(os.urandom(16 * MiB))
    return path


def warm(path: str) -> None:
    with open(path, "rb") as source:
        while source.read(16 * MiB):
            pass


def one_run(base: str, directory: str, size: int, seconds: float, prefetch: bool,
            throttle: bool, seed: int) -> tuple[float, dict]:
    """Reads per second, and the prefetch status at the end of the reads."""
    top = os.path.join(directory, "top.fvd")
    if os.path.exists(top):
        os.unlink(top)
    corefmt.create(top, "fvd", size, backing=base, backing_format="raw",
                   options=BLOCK_OPTIONS)
    spec: object = top
    if prefetch:
        spec = {"driver": "prefetch", "throttle": "on" if throttle else "off",
                "file": {"driver": "fvd", "file": top}}
    rng = random.Random(seed)
    slots = size // READ_SIZE
    buf = bytearray(READ_SIZE)
    count = 0
    with corefmt.open(spec) as node, open(base, "rb") as reference:
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            offset = rng.randrange(slots) * READ_SIZE
            node.readinto(offset, buf)
            count += 1
            # spot-check content without timing a compare of every read
            if count % 997 == 0 and bytes(buf) != os.pread(reference.fileno(), READ_SIZE,
                                                           offset):
                raise SystemExit(f"wrong data at {offset}")
        elapsed = time.perf_counter() - began
        status = node.info() if prefetch else {}
    return count / elapsed, status


def summarise(name: str, values: list[float]) -> str:
    return (f"{name:<28} median {statistics.median(values):10.0f} reads/s   "
            f"range {min(values):.0f}..{max(values):.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=lambda text: int(float(text) * GiB), default=GiB,
                        help="base size in GiB (default 1)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the base lives (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="corefmt-prefetch-bench-")
    base = build_base(directory, args.size)
    warm(base)
    kinds = {"no prefetch": (False, True), "prefetch (throttled)": (True, True),
             "prefetch (throttle=off)": (True, False)}
    results: dict[str, list[float]] = {name: [] for name in kinds}
    progress: dict[str, list[dict]] = {name: [] for name in kinds}
    ratios: list[float] = []
    for repetition in range(args.repeat):
        order = list(kinds)
        if repetition % 2:
            order.reverse()
        this: dict[str, float] = {}
        for name in order:
            prefetch, throttle = kinds[name]
            rate, status = one_run(base, directory, args.size, args.seconds, prefetch,
                                   throttle, seed=repetition)
            results[name].append(rate)
            progress[name].append(status)
            this[name] = rate
        ratios.append(this["prefetch (throttled)"] / this["no prefetch"])
    print(f"FVD overlay (64 KiB blocks) over a {args.size // MiB} MiB raw base, random 4 KiB "
          f"reads for {args.seconds:g} s, {args.repeat} repetitions, interleaved")
    for name in kinds:
        print(summarise(name, results[name]))
        copied = [status.get("copied", 0) for status in progress[name]]
        if any(copied):
            pauses = [status.get("pauses", 0) for status in progress[name]]
            print(f"{'':<28} prefetched during the reads: median "
                  f"{statistics.median(copied) // MiB} MiB, pauses median "
                  f"{statistics.median(pauses):.0f}")
    ratio = statistics.median(results["prefetch (throttled)"]) / statistics.median(
        results["no prefetch"])
    unthrottled = statistics.median(results["prefetch (throttle=off)"]) / statistics.median(
        results["no prefetch"])
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"ratio with/without prefetch: {ratio:.2f} (per repetition {min(ratios):.2f}.."
          f"{max(ratios):.2f}); target >= {TARGET}: {verdict}")
    print(f"ratio unthrottled/without: {unthrottled:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

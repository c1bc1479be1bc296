#!/usr/bin/env python3
"""Benchmark: ``corefmt nbd`` against ``qemu-nbd`` serving the same image
to the same NBD clients, raw and qcow2.

Both servers run at once, read-only and persistent (``-r -t -k SOCKET -f
FMT``), each on its own Unix socket, over the same image file; they sit
idle while the other is measured. Clients, each run as a child process:

- ``qemu-img convert -f raw -O raw nbd+unix:///?socket=SOCK out.raw``;
- ``nbdcopy nbd+unix:///?socket=SOCK out.raw``;
- ``qemu-img bench -f raw -c N -d DEPTH -s 4096 -S STEP URI`` at queue
  depth 1 and 16: 4 KiB reads. qemu-img bench has no random mode: request
  k reads at ``(k * STEP) % size``. STEP is a large prime number of 4 KiB
  blocks, so each read lands far from the one before and no offset repeats
  before the whole image has been read (the same stride as
  qcow2_random_io.py). The time is the one qemu-img bench prints (its
  request loop, without opening the connection).

The image (``--size``, default 1 GiB) is a sparse raw file with about half
of it data, in extents of 4 KiB to 4 MiB separated by holes of the same
range of sizes; the qcow2 image is ``qemu-img convert`` of it (untimed).
Both live in ``--dir`` (default a temporary folder in /dev/shm, so the
outputs written by the copies cost memory bandwidth, not the disk's mood).

Runs are interleaved: for each client the order of the servers alternates
between repetitions, and each timed run follows an untimed run of the same
client against the same server (``--settle``). Printed per client: median
and range of MiB/s (virtual size over wall time) or of reads/s, the
servers' CPU time, and the ratio corefmt/qemu-nbd of the medians with its
range over repetitions (higher is better). Target: >= 0.8 for the copies;
the 4 KiB reads are reported without one.

Checked: every copy equals the image (``qemu-img compare``), so a server
that answers fast but wrong cannot look good. This is a benchmark, not a
test: it exits 0 whatever the timings, and 1 only when a copy differs from
the image or a client or server fails.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from convert_raw import parse_size
from qcow2_benchlib import (
    _CHILD_ENV,
    COREFMT,
    COREFMT_CLI,
    KiB,
    MiB,
    check_tools,
    load_line,
    qemu_compare,
    ratio_line,
    remove,
    row,
    run_child,
    warm_page_cache,
    write_extents,
)

QEMU = "qemu-nbd"
SERVERS = (COREFMT, QEMU)
FORMATS = ("raw", "qcow2")

DEFAULT_SIZE = "1G"
QUICK_SIZE = "32M"
DEFAULT_REPEAT = 3
QUICK_REPEAT = 1
#: Untimed runs of the same client and server before each timed one: a run
#: right after a pause, or after the other server, is slower on a VM (see
#: convert_raw.py's DEFAULT_SETTLE).
DEFAULT_SETTLE = 1
QUICK_SETTLE = 0
DEFAULT_SEED = 1
#: 4 KiB reads per qemu-img bench run, at each depth.
DEFAULT_READS = {1: 20000, 16: 50000}
QUICK_READS = {1: 500, 16: 1000}
DEPTHS = (1, 16)
READ_SIZE = 4 * KiB
#: Stride of the reads, in READ_SIZE blocks: a prime, so it is coprime
#: with any image size in 4 KiB blocks and every block is read once before
#: any is read again.
STEP_BLOCKS = 104729
#: Extents of data, and the holes between them, are log-uniform in this
#: range: equal ranges make about half the image data.
MIN_EXTENT = 4 * KiB
MAX_EXTENT = 4 * MiB
#: Bump when the layout changes, so an image kept in --dir is rebuilt.
LAYOUT_VERSION = 1
#: qcow2 cluster size of the served qcow2 image (qemu's default).
QCOW2_CLUSTER = "64k"

TARGET_COPY_RATIO = 0.8
#: A server has this long to write its pid file and listen.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
EXIT_MISMATCH = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_TIME = re.compile(r"Run completed in ([0-9.]+) seconds")


@dataclass
class Measure:
    """The timed runs of one client against both servers, one format."""

    name: str
    unit: str
    values: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERVERS})
    server_cpu: dict[str, list[float]] = field(
        default_factory=lambda: {s: [] for s in SERVERS})
    target: float | None = None


# -- the image ------------------------------------------------------------------
def plan_extents(size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) of the data extents: a hole, an extent, a hole...

    Holes and extents are drawn from the same log-uniform range of 4 KiB
    multiples, so data is about half the image, in many small extents and a
    few large ones: servers and clients see both sparse and dense regions.
    """
    rng = random.Random(seed)
    blocks = size // READ_SIZE
    low = math.log(MIN_EXTENT // READ_SIZE)
    high = math.log(MAX_EXTENT // READ_SIZE)

    def draw() -> int:
        return max(1, int(math.exp(rng.uniform(low, high))))

    extents: list[tuple[int, int]] = []
    position = draw()
    while position < blocks:
        length = min(draw(), blocks - position)
        extents.append((position * READ_SIZE, length * READ_SIZE))
        position += length + draw()
    return extents


def prepare_images(workdir: str, size: int, seed: int) -> dict[str, str]:
    """The raw image and its qcow2 copy, reused when --dir kept them."""
    raw = os.path.join(workdir, f"image-{size}-{seed}-v{LAYOUT_VERSION}.raw")
    qcow2 = raw.removesuffix(".raw") + ".qcow2"
    if not (os.path.exists(raw) and os.path.getsize(raw) == size):
        started = time.perf_counter()
        write_extents(raw, size, plan_extents(size, seed), seed)
        print(f"built {raw} in {time.perf_counter() - started:.1f} s")
        if os.path.exists(qcow2):
            os.unlink(qcow2)
    if not os.path.exists(qcow2):
        partial = qcow2 + ".partial"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                        "-o", f"cluster_size={QCOW2_CLUSTER}", raw, partial], check=True)
        os.rename(partial, qcow2)
    return {"raw": raw, "qcow2": qcow2}


# -- the servers ----------------------------------------------------------------
def server_command(server: str, fmt: str, image: str, socket: str, pid_file: str,
                   extra: Sequence[str]) -> list[str]:
    options = ["-r", "-t", "-k", socket, "-f", fmt, "--pid-file", pid_file, *extra]
    if server == COREFMT:
        return [*COREFMT_CLI, "nbd", *options, image]
    return ["qemu-nbd", *options, image]


@contextmanager
def serving(server: str, fmt: str, image: str, workdir: str,
            extra: Sequence[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server; yield (NBD URI, process) once it listens; stop it.

    Both servers write their pid file once the socket listens, so waiting
    for it (and the socket) never costs a client connection, which with
    ``-e 1`` would hold the only slot.
    """
    socket = os.path.join(workdir, f"{server}-{fmt}.sock")
    pid_file = socket.removesuffix(".sock") + ".pid"
    for stale in (socket, pid_file):
        if os.path.exists(stale):
            os.unlink(stale)
    log = open(socket.removesuffix(".sock") + ".log", "w+b")  # noqa: SIM115
    process = subprocess.Popen(server_command(server, fmt, image, socket, pid_file, extra),
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               env=_CHILD_ENV)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(pid_file) and os.path.exists(socket)):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{server} did not start serving {image}: "
                                   f"{log.read().decode(errors='replace')[-2000:]}")
            time.sleep(POLL_INTERVAL)
        yield f"nbd+unix:///?socket={socket}", process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def cpu_seconds(pid: int) -> float:
    """User + system time of a running process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # after the command name: state is field 3, utime 14 and stime 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- the clients ----------------------------------------------------------------
def copy_command(client: str, uri: str, output: str) -> list[str]:
    if client == "convert":
        return ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, output]
    return ["nbdcopy", uri, output]


def bench_command(uri: str, depth: int, reads: int) -> list[str]:
    return ["qemu-img", "bench", "-f", "raw", "-c", str(reads), "-d", str(depth),
            "-s", str(READ_SIZE), "-S", str(STEP_BLOCKS * READ_SIZE), uri]


def run_client(argv: list[str], server: subprocess.Popen[bytes]) -> tuple[float, float, str]:
    """(wall seconds, server CPU seconds, stdout) of one client run; raises
    when the client fails."""
    before = cpu_seconds(server.pid)
    child = run_child(argv)
    spent = cpu_seconds(server.pid) - before
    if child.exit_code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {child.exit_code}: {child.stderr[-2000:]}")
    return child.seconds, spent, child.stdout


def bench_rate(stdout: str, reads: int) -> float:
    """Reads per second from qemu-img bench's own timing of its loop."""
    found = BENCH_TIME.search(stdout)
    if found is None:
        raise RuntimeError(f"qemu-img bench printed no time: {stdout[-500:]}")
    return reads / max(float(found.group(1)), 1e-6)


def measure_format(fmt: str, image: str, workdir: str, args: argparse.Namespace,
                   extra: dict[str, Sequence[str]]) -> tuple[list[Measure], bool]:
    """Every client against both servers of one format; (measures, copies ok)."""
    size = args.size
    copies = [Measure(f"{fmt} qemu-img convert", "MiB/s", target=TARGET_COPY_RATIO),
              Measure(f"{fmt} nbdcopy", "MiB/s", target=TARGET_COPY_RATIO)]
    reads = [Measure(f"{fmt} 4 KiB reads QD{depth}", "reads/s") for depth in DEPTHS]
    matched = True
    with serving(COREFMT, fmt, image, workdir, extra[COREFMT]) as ours, \
            serving(QEMU, fmt, image, workdir, extra[QEMU]) as theirs:
        servers = {COREFMT: ours, QEMU: theirs}
        for repetition in range(args.repeat):
            order = SERVERS if repetition % 2 == 0 else SERVERS[::-1]
            for measure, client in zip(copies, ("convert", "nbdcopy"), strict=True):
                for server in order:
                    uri, process = servers[server]
                    output = os.path.join(workdir, f"out-{server}.raw")
                    argv = copy_command(client, uri, output)
                    for _ in range(args.settle):
                        remove(output)
                        run_client(argv, process)
                    remove(output)
                    seconds, cpu, _ = run_client(argv, process)
                    same = qemu_compare(output, "raw", image, fmt)
                    matched &= same
                    remove(output)
                    measure.values[server].append(size / MiB / seconds)
                    measure.server_cpu[server].append(cpu)
                    print(f"  {measure.name:<28} {server:<8} #{repetition + 1} "
                          f"{size / MiB / seconds:9.0f} MiB/s"
                          f"{'' if same else '  COPY DIFFERS FROM THE IMAGE'}", flush=True)
            for measure, depth in zip(reads, DEPTHS, strict=True):
                count = args.reads[depth]
                for server in order:
                    uri, process = servers[server]
                    argv = bench_command(uri, depth, count)
                    for _ in range(args.settle):
                        run_client(argv, process)
                    _, cpu, stdout = run_client(argv, process)
                    rate = bench_rate(stdout, count)
                    measure.values[server].append(rate)
                    measure.server_cpu[server].append(cpu)
                    print(f"  {measure.name:<28} {server:<8} #{repetition + 1} "
                          f"{rate:9.0f} reads/s", flush=True)
    return copies + reads, matched


# -- report ---------------------------------------------------------------------
def report(measures: list[Measure]) -> None:
    print()
    print("median (range) over repetitions; server CPU: the server's user + system time "
          "during the timed run")
    for measure in measures:
        print(f"{measure.name}")
        for server in SERVERS:
            print(row(f"{server} {measure.unit}", measure.values[server], "", ".0f"))
            print(row(f"{server} server CPU s", measure.server_cpu[server], "", ".3f"))
    print()
    for measure in measures:
        ours, theirs = measure.values[COREFMT], measure.values[QEMU]
        if measure.target is not None:
            print(ratio_line(measure.name, ours, theirs, measure.target, True, against=QEMU))
        else:
            line = ratio_line(measure.name, ours, theirs, 1.0, True, against=QEMU)
            print(line.rsplit("; ", 1)[0] + "; no target)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None,
                        help=f"virtual size of the image (default {DEFAULT_SIZE}, "
                             f"--quick {QUICK_SIZE})")
    parser.add_argument("--dir", help="work here and keep the images for the next run "
                                      "(default: a temporary folder, removed)")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed runs of each client per server (default "
                             f"{DEFAULT_REPEAT}, --quick {QUICK_REPEAT})")
    parser.add_argument("--settle", type=int, default=None,
                        help=f"untimed runs before each timed one (default {DEFAULT_SETTLE}, "
                             f"--quick {QUICK_SETTLE})")
    parser.add_argument("--reads", type=int, default=None,
                        help="4 KiB reads per qemu-img bench run (default "
                             f"{DEFAULT_READS[1]} at QD1, {DEFAULT_READS[16]} at QD16)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--format", choices=FORMATS, action="append",
                        help="serve only this format (repeatable; default both)")
    parser.add_argument("--quick", action="store_true",
                        help="a small image, one repetition, no settling: checks the "
                             "benchmark runs, the figures mean little")
    parser.add_argument("--corefmt-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for corefmt nbd (e.g. --corefmt-arg=-e4)")
    parser.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for qemu-nbd (e.g. --qemu-arg=-e4)")
    args = parser.parse_args(argv)
    args.size = args.size or parse_size(QUICK_SIZE if args.quick else DEFAULT_SIZE)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if args.settle is None:
        args.settle = QUICK_SETTLE if args.quick else DEFAULT_SETTLE
    defaults = QUICK_READS if args.quick else DEFAULT_READS
    args.reads = {depth: args.reads or defaults[depth] for depth in DEPTHS}
    if args.repeat < 1 or args.settle < 0 or min(args.reads.values()) < 1:
        parser.error("--repeat and --reads must be at least 1, --settle at least 0")
    if not check_tools("qemu-img", "qemu-nbd", "nbdcopy"):
        return 0
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-nbd-bench-", dir=shm)
    os.makedirs(workdir, exist_ok=True)
    extra = {COREFMT: args.corefmt_arg, QEMU: args.qemu_arg}
    measures: list[Measure] = []
    matched = True
    try:
        images = prepare_images(workdir, args.size, args.seed)
        data = sum(length for _, length in plan_extents(args.size, args.seed))
        print(f"image: {args.size / MiB:.0f} MiB virtual, {data / MiB:.0f} MiB data "
              f"({100 * data / args.size:.0f} %); {args.repeat} repetitions, "
              f"settle {args.settle}; {load_line()}")
        for fmt in args.format or FORMATS:
            warm_page_cache(images[fmt])
            found, same = measure_format(fmt, images[fmt], workdir, args, extra)
            measures += found
            matched &= same
    except RuntimeError as error:  # a client or a server failed: no figures to trust
        print(f"FAILED: {error}", file=sys.stderr)
        return EXIT_MISMATCH
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(measures)
    print("content: " + ("every copy identical to the image" if matched
                         else "MISMATCH: some copies differ from the image"))
    return 0 if matched else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: the FVD paper's comparison (C. Tang, "FVD: a High-Performance
Virtual Machine Image Format for Cloud", USENIX ATC 2011) inside corefmt:
raw, a qcow2 overlay and an FVD overlay, through the Python API, in one
run on one machine.

The paper's abstract: "the throughput of FVD is 249% higher than that of
QCOW2 when using the PostMark benchmark to create files" (FVD/qcow2 3.49),
and FVD's throughput close to raw's. This script asks the same questions
of corefmt's drivers.

Setups: ``raw`` (a preallocated raw copy of the base, no backing: the
paper's baseline), ``qcow2`` (an overlay of the raw base, 64 KiB
clusters), ``fvd`` (an overlay with FVD's defaults: 4 KiB blocks, journal
committed at the guest's flush) and three variants (``--no-variants``
leaves them out): ``fvd compact`` (``compact_image=on``), ``fvd 512b``
(``block_size=512``: the block size the 2011 driver, and so the paper,
used for bases up to 16 GiB) and ``fvd 64k`` (``block_size=64k``, qcow2's
cluster: what copy-on-write of large blocks costs). The base (``--size``, default 512 MiB, of
random non-zero data) is built once, untimed, in ``--dir`` (default a new
folder under /var/tmp, removed; it must be on a disk, not tmpfs: flushes
are part of what is measured). Overlays are created fresh for every run;
the raw copy is made once and its written ranges are copied back from the
base after each workload, so it, too, holds the base's content before
every run.

Workloads, the same requests, data and flushes for every setup (so every
setup makes the same durability promise), built once per run from
``--seed``:

1. postmark: PostMark's transactions (create, delete, read, append, equally
   likely) on a guest file system laid out as a metadata area (inode
   table, block bitmaps), a journal and a data area of files spread over
   the disk. Creates and appends write 512 B to 16 KiB (mostly 4 KiB);
   every transaction but a read overwrites 4 KiB metadata blocks in place
   (a delete two); every ``COMMIT_OPS`` transactions a journal commit
   writes 4-32 KiB sequentially into the journal and flushes, as ext3/4
   does. Reads use one reused buffer. Reported: transactions/s.
2. random write: ``--writes`` 4 KiB writes at aligned random offsets over
   the whole disk into a fresh image, then one flush, both timed. MiB/s.
3. sequential read of the whole disk in 1 MiB requests (``readinto`` into
   one reused buffer): (a) on a fresh overlay, as in the paper (reads come
   from the base), and (b) on workload 2's images right after it (reads
   come partly from the overlay). MiB/s.

Runs are interleaved: each repetition (``--repeat``, default 5) runs every
setup on one workload before the next workload, the setup order rotated
by one per repetition. Only the request loop is timed (not open or close),
in this process, after ``os.sync()`` and a garbage collection. Printed:
median and range per setup, the CPU time of the loop (the rest is
waiting for the disk), the ratios fvd/qcow2 and fvd/raw of the
medians with the range of the per-repetition ratios, and the disk flushes
(fdatasync/fsync) each run made. Then one summary line per workload
against the targets: FVD above qcow2 everywhere, FVD at least 0.9 of raw.

The base and the raw copy are kept in the page cache (re-read before each
workload), so the figures are the formats' CPU costs and their disk
flushes, not disk seeks: the paper ran a guest on a real disk, where
qcow2's extra metadata I/O cost seeks as well.

Checked, in the last repetition, after each workload that writes: every
setup's image reads the same as the raw copy (``corefmt.compare``). This
is a benchmark, not a test: it exits 0 whatever the timings, and 1 only
when an image's content is wrong.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from qcow2_benchlib import (
    KiB,
    MiB,
    data_pool,
    load_line,
    pool_slice,
    random_base,
    remove,
    spread,
    warm_page_cache,
)

import corefmt

DEFAULT_SIZE = 512 * MiB
QUICK_SIZE = 16 * MiB
MIN_SIZE = 8 * MiB
DEFAULT_REPEAT = 5
QUICK_REPEAT = 1
DEFAULT_OPS = 8000
QUICK_OPS = 300
DEFAULT_WRITES = 4096
QUICK_WRITES = 256
DEFAULT_SEED = 1
#: Default parent of the work folder: /tmp may be tmpfs, /var/tmp seldom is.
DEFAULT_PARENT = "/var/tmp"
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
#: Bump when the base image's content changes, so kept bases are rebuilt.
LAYOUT_VERSION = 1
EXIT_WRONG = 1

BLOCK = 4 * KiB  # the guest file system's block, and workload 2's write size
SECTOR = 512
READ_REQUEST = 1 * MiB
CLUSTER = "64k"  # qcow2's cluster = FVD's default block
#: Guest file system layout, as fractions of the disk: metadata area first,
#: then the journal, then the data area holding the files.
META_FRACTION = 64
JOURNAL_FRACTION = 32
INODE_SHARE = 3 / 4  # of the metadata area; the rest is block bitmaps
INODES_PER_BLOCK = 16  # 256-byte inodes: consecutive creates share a block
INITIAL_FILES = 1000
MAX_FILE_SIZE = 64 * KiB
COMMON_WRITE = 4 * KiB
COMMON_WRITE_SHARE = 0.6  # the rest uniform over 512 B .. 16 KiB
MAX_SMALL_WRITE = 16 * KiB
COMMIT_OPS = 32  # transactions per journal commit (and flush)
JOURNAL_WRITE_BLOCKS = (1, 8)  # 4-32 KiB per commit
#: PostMark's transaction types, equally likely (its default biases of 5).
TRANSACTIONS = ("create", "delete", "read", "append")
#: Seeds of the workloads, offset from --seed so they differ.
POSTMARK_SEED, RANDOM_WRITE_SEED = 0, 1

WRITE, READ, FLUSH = 0, 1, 2
Request = tuple[int, int, memoryview | None]

POSTMARK, RANDOM_WRITE, READ_FRESH, READ_AFTER = "postmark", "random write", \
    "seq read fresh", "seq read after 2"
TARGET_QCOW2 = 1.0  # FVD strictly above qcow2
TARGET_RAW = 0.9  # FVD at least this fraction of raw
PAPER_POSTMARK_RATIO = 3.49  # "249% higher than that of QCOW2"
SYNC_CALLS = ("fdatasync", "fsync")


@dataclass(frozen=True)
class Setup:
    """One image configuration: its format and create options."""

    name: str
    format: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def overlay(self) -> bool:
        return self.format != "raw"


RAW = Setup("raw", "raw")
QCOW2 = Setup("qcow2", "qcow2", {"cluster_size": CLUSTER})
FVD = Setup("fvd", "fvd")
FVD_COMPACT = Setup("fvd compact", "fvd", {"compact_image": "on"})
#: The 2011 driver's own choice for bases up to 16 GiB (docs/formats/fvd.md,
#: "Why 4 KiB blocks"), so the paper's: no copy-on-write for writes
#: aligned to 512 bytes.
FVD_512 = Setup("fvd 512b", "fvd", {"block_size": "512"})
#: corefmt's default until it measured this: every first 4 KiB write copies 60 KiB.
FVD_64K = Setup("fvd 64k", "fvd", {"block_size": "64k"})
VARIANTS = (FVD_COMPACT, FVD_512, FVD_64K)


@dataclass
class Plan:
    """One workload's requests, built once and replayed on every setup."""

    name: str
    title: str
    unit: str
    amount: float  # transactions, or MiB moved, per run
    requests: list[Request]
    reads_images_of: str | None = None  # the workload whose images it reads

    @property
    def writes(self) -> bool:
        return any(op == WRITE for op, _, _ in self.requests)


# -- workloads ------------------------------------------------------------------------
class PostMark:
    """Builds the PostMark-like request list: file data, in-place metadata
    and journal commits of a journaling file system (see the module doc)."""

    def __init__(self, size: int, seed: int, pool: memoryview) -> None:
        self.rng = random.Random(seed)
        self.pool = pool
        self.buffer = memoryview(bytearray(MAX_FILE_SIZE))
        meta_size = max(BLOCK * 8, size // META_FRACTION // BLOCK * BLOCK)
        self.inode_blocks = int(meta_size // BLOCK * INODE_SHARE)
        self.bitmap_blocks = meta_size // BLOCK - self.inode_blocks
        self.journal_start = meta_size
        self.journal_size = max(BLOCK * JOURNAL_WRITE_BLOCKS[1],
                                size // JOURNAL_FRACTION // BLOCK * BLOCK)
        self.journal_head = 0
        self.data_start = self.journal_start + self.journal_size
        self.data_end = size - MAX_FILE_SIZE
        self.next_inode = 0
        self.files: list[list[int]] = []  # [inode, start, length]
        self.requests: list[Request] = []

    def build(self, transactions: int) -> list[Request]:
        for _ in range(INITIAL_FILES):  # files already in the base image
            self.files.append([self.new_inode(), self.new_start(), self.write_size()])
        for count in range(1, transactions + 1):
            getattr(self, self.rng.choice(TRANSACTIONS))()
            if count % COMMIT_OPS == 0:
                self.commit()
        if transactions % COMMIT_OPS:
            self.commit()
        return self.requests

    # the file system's allocation
    def new_inode(self) -> int:
        self.next_inode += 1
        return self.next_inode

    def new_start(self) -> int:
        return self.rng.randrange(self.data_start // BLOCK, self.data_end // BLOCK) * BLOCK

    def write_size(self) -> int:
        if self.rng.random() < COMMON_WRITE_SHARE:
            return COMMON_WRITE
        return self.rng.randrange(1, MAX_SMALL_WRITE // SECTOR + 1) * SECTOR

    # requests
    def write(self, offset: int, length: int) -> None:
        self.requests.append((WRITE, offset, pool_slice(self.pool, offset, length)))

    def write_inode(self, inode: int) -> None:
        self.write(inode // INODES_PER_BLOCK % self.inode_blocks * BLOCK, BLOCK)

    def write_bitmap(self, start: int) -> None:
        share = (start - self.data_start) / (self.data_end - self.data_start)
        block = self.inode_blocks + min(int(share * self.bitmap_blocks), self.bitmap_blocks - 1)
        self.write(block * BLOCK, BLOCK)

    def commit(self) -> None:
        """Journal blocks written sequentially (wrapping), then a flush."""
        length = self.rng.randint(*JOURNAL_WRITE_BLOCKS) * BLOCK
        if self.journal_head + length > self.journal_size:
            self.journal_head = 0
        self.write(self.journal_start + self.journal_head, length)
        self.journal_head += length
        self.requests.append((FLUSH, 0, None))

    # PostMark's transactions
    def create(self) -> None:
        inode, start, length = self.new_inode(), self.new_start(), self.write_size()
        self.write(start, length)
        self.write_inode(inode)
        self.write_bitmap(start)
        self.files.append([inode, start, length])

    def delete(self) -> None:
        if not self.files:
            self.create()
            return
        index = self.rng.randrange(len(self.files))
        self.files[index], self.files[-1] = self.files[-1], self.files[index]
        inode, start, _ = self.files.pop()
        self.write_inode(inode)
        self.write_bitmap(start)

    def append(self) -> None:
        if not self.files:
            self.create()
            return
        entry = self.rng.choice(self.files)
        inode, start, length = entry
        extra = self.write_size()
        if length + extra > MAX_FILE_SIZE:  # full: rewritten from its start
            length = 0
        self.write(start + length, extra)
        entry[2] = length + extra
        self.write_inode(inode)

    def read(self) -> None:
        if not self.files:
            self.create()
            return
        _, start, length = self.rng.choice(self.files)
        self.requests.append((READ, start, self.buffer[:length]))


def postmark_plan(size: int, transactions: int, seed: int, pool: memoryview) -> Plan:
    requests = PostMark(size, seed, pool).build(transactions)
    return Plan(POSTMARK, f"1. PostMark-like: {transactions} transactions, a journal commit "
                          f"and flush every {COMMIT_OPS}", "ops/s", transactions, requests)


def random_write_plan(size: int, writes: int, seed: int, pool: memoryview) -> Plan:
    rng = random.Random(seed)
    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(writes)]
    requests: list[Request] = [(WRITE, offset, pool_slice(pool, offset, BLOCK))
                               for offset in offsets]
    requests.append((FLUSH, 0, None))
    return Plan(RANDOM_WRITE, f"2. random 4 KiB writes: {writes} into a fresh image, then a "
                              f"flush (timed)", "MiB/s", writes * BLOCK / MiB, requests)


def read_plans(size: int) -> list[Plan]:
    buffer = memoryview(bytearray(READ_REQUEST))
    requests: list[Request] = [(READ, offset, buffer) for offset in range(0, size, READ_REQUEST)]
    fresh = Plan(READ_FRESH, "3a. sequential 1 MiB reads of the whole disk, fresh overlay "
                             "(the paper's case: reads from the base)", "MiB/s", size / MiB,
                 requests)
    after = Plan(READ_AFTER, "3b. sequential 1 MiB reads of the whole disk, right after "
                             "workload 2 on its images", "MiB/s", size / MiB, requests,
                 reads_images_of=RANDOM_WRITE)
    return [fresh, after]


def build_plans(args: argparse.Namespace) -> list[Plan]:
    """In run order: 3b right after 2, whose images it reads."""
    pool = data_pool(args.seed)
    fresh, after = read_plans(args.size)
    return [postmark_plan(args.size, args.ops, args.seed + POSTMARK_SEED, pool),
            random_write_plan(args.size, args.writes, args.seed + RANDOM_WRITE_SEED, pool),
            after, fresh]


def written_ranges(requests: Sequence[Request]) -> list[tuple[int, int]]:
    """Merged (start, end) of every write: what the raw copy gets back."""
    spans = sorted((offset, offset + len(view)) for op, offset, view in requests
                   if op == WRITE and view is not None)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# -- images ---------------------------------------------------------------------------
def prepare_base(workdir: str, size: int, seed: int) -> str:
    return random_base(workdir, size, seed, LAYOUT_VERSION)


class Images:
    """Each setup's image for a run: fresh overlays of the base, or the raw
    copy, restored from the base after the writes it took."""

    def __init__(self, workdir: str, base: str) -> None:
        self.workdir, self.base = workdir, base
        self.raw_copy = os.path.join(workdir, "raw-copy.raw")
        self.dirty: list[tuple[int, int]] = []
        shutil.copyfile(base, self.raw_copy)
        fsync_path(self.raw_copy)

    def fresh(self, setup: Setup, workload: str) -> str:
        if not setup.overlay:
            return self.raw_copy
        slug = f"{workload}-{setup.name}".replace(" ", "-")
        path = os.path.join(self.workdir, f"{slug}.{setup.format}")
        remove(path)
        corefmt.create(path, setup.format, options=setup.options, backing=self.base,
                       backing_format="raw")
        return path

    def written(self, setup: Setup, plan: Plan) -> None:
        if not setup.overlay:
            self.dirty.extend(written_ranges(plan.requests))

    def discard(self, setup: Setup, path: str) -> None:
        if setup.overlay:
            remove(path)
        elif self.dirty:
            copy_ranges(self.base, self.raw_copy, self.dirty)
            self.dirty = []

    def close(self) -> None:
        remove(self.raw_copy)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_ranges(source: str, target: str, ranges: Sequence[tuple[int, int]]) -> None:
    """Copy ``ranges`` of ``source`` over ``target`` and sync it (untimed)."""
    with open(source, "rb", buffering=0) as src, open(target, "r+b", buffering=0) as dst:
        for start, end in ranges:
            data = os.pread(src.fileno(), end - start, start)
            if os.pwrite(dst.fileno(), data, start) != len(data):
                raise OSError(f"short write restoring {target} at {start}")
        os.fdatasync(dst.fileno())


def same_content(image: str, image_format: str, reference: str) -> bool:
    return corefmt.compare(image, reference, a_format=image_format, b_format="raw").identical


def filesystem_of(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount prefix)."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                words = line.split()
                point = words[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, words[2]
    except OSError:
        pass
    return kind


# -- runs -----------------------------------------------------------------------------
class SyncCounter:
    """Counts os.fdatasync/os.fsync calls (corefmt's file storage calls them
    through ``os``): the disk flushes each run pays for durability."""

    def __init__(self) -> None:
        self.count = 0

    def counting(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def counted(fd: int) -> None:
            self.count += 1
            real(fd)
        return counted

    @contextmanager
    def installed(self) -> Iterator[SyncCounter]:
        originals = {name: getattr(os, name) for name in SYNC_CALLS}
        for name, real in originals.items():
            setattr(os, name, self.counting(real))
        try:
            yield self
        finally:
            for name, real in originals.items():
                setattr(os, name, real)


@dataclass(frozen=True)
class Run:
    """One timed request loop."""

    seconds: float
    cpu_seconds: float  # this process's, user + system
    flushes: int  # fdatasync/fsync calls


def replay(path: str, image_format: str, requests: Sequence[Request], syncs: SyncCounter
           ) -> Run:
    """Times the request loop alone: open and close are not timed."""
    os.sync()  # no writeback of earlier runs during this one
    with corefmt.open(path, image_format) as node:
        write, readinto, flush = node.write, node.readinto, node.flush
        gc.collect()
        syncs.count = 0
        cpu = time.process_time()
        start = time.perf_counter()
        for op, offset, view in requests:
            if op == WRITE:
                write(offset, view)
            elif op == READ:
                readinto(offset, view)
            else:
                flush()
        seconds = time.perf_counter() - start
        run = Run(seconds, time.process_time() - cpu, syncs.count)
    return run


def rotated(setups: Sequence[Setup], repetition: int) -> list[Setup]:
    shift = repetition % len(setups)
    return [*setups[shift:], *setups[:shift]]


@dataclass
class Results:
    """Throughputs per (workload, setup), paired by repetition."""

    throughput: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    flushes: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    correct: bool = True

    def add(self, plan: Plan, setup: Setup, run: Run) -> None:
        key = (plan.name, setup.name)
        self.throughput.setdefault(key, []).append(plan.amount / max(run.seconds, 1e-9))
        self.cpu.setdefault(key, []).append(run.cpu_seconds)
        self.flushes.setdefault(key, []).append(run.flushes)


def check_images(plan: Plan, images: Images, paths: dict[str, str],
                 setups: Sequence[Setup]) -> bool:
    ok = True
    for setup in setups:
        if setup.overlay and not same_content(paths[setup.name], setup.format,
                                              images.raw_copy):
            print(f"  {plan.name}: {setup.name} CONTENT DIFFERS from raw", flush=True)
            ok = False
    return ok


def run_workload(plan: Plan, order: Sequence[Setup], images: Images, kept: dict[str, str],
                 syncs: SyncCounter, results: Results) -> dict[str, str]:
    """Runs ``plan`` on every setup; returns the images used, by setup."""
    paths: dict[str, str] = {}
    for setup in order:
        path = kept[setup.name] if plan.reads_images_of else images.fresh(setup, plan.name)
        run = replay(path, setup.format, plan.requests, syncs)
        images.written(setup, plan)
        results.add(plan, setup, run)
        paths[setup.name] = path
    return paths


def bench(plans: Sequence[Plan], setups: Sequence[Setup], base: str, workdir: str,
          repeat: int) -> Results:
    results = Results()
    images = Images(workdir, base)
    syncs = SyncCounter()
    kept: dict[str, str] = {}
    try:
        with syncs.installed():
            for repetition in range(repeat):
                order = rotated(setups, repetition)
                print(f"  #{repetition + 1} order: {', '.join(s.name for s in order)}",
                      flush=True)
                for plan in plans:
                    warm_page_cache(base, images.raw_copy)
                    paths = run_workload(plan, order, images, kept, syncs, results)
                    progress(plan, order, results)
                    if repetition == repeat - 1 and plan.writes:
                        results.correct &= check_images(plan, images, paths, setups)
                    if any(later.reads_images_of == plan.name for later in plans):
                        kept = paths
                        continue
                    for setup in order:
                        images.discard(setup, paths[setup.name])
                    if plan.reads_images_of:
                        kept = {}
    finally:
        for path in kept.values():
            if path != images.raw_copy:
                remove(path)
        images.close()
    return results


def progress(plan: Plan, order: Sequence[Setup], results: Results) -> None:
    figures = ", ".join(f"{setup.name} {results.throughput[(plan.name, setup.name)][-1]:,.0f}"
                        for setup in order)
    print(f"    {plan.name:<17} {plan.unit}: {figures}", flush=True)


# -- report ---------------------------------------------------------------------------
def ratio(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float, float]:
    """(ratio of the medians, lowest and highest per-repetition ratio)."""
    pairs = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return statistics.median(ours) / statistics.median(theirs), pairs[0], pairs[-1]


def ratio_text(name: str, ours: Sequence[float], theirs: Sequence[float]) -> str:
    value, low, high = ratio(ours, theirs)
    return f"ratio {name} {value:.2f} (per repetition {low:.2f} - {high:.2f})"


def report_workload(plan: Plan, setups: Sequence[Setup], results: Results, repeat: int
                    ) -> None:
    print(f"\n{plan.title}")
    print(f"  {plan.unit}, median (range) of {repeat}; median CPU seconds of the loop; "
          f"disk flushes per run")
    for setup in setups:
        key = (plan.name, setup.name)
        median, low, high = spread(results.throughput[key])
        flushes = sorted(set(results.flushes[key]))
        print(f"  {setup.name:<12}{median:>12,.1f}  ({low:,.1f} - {high:,.1f})  cpu "
              f"{statistics.median(results.cpu[key]):.3f} s  flushes "
              f"{'/'.join(map(str, flushes))}")
    for fvd in (s for s in setups if s.format == "fvd"):
        for other in (QCOW2, RAW):
            print("  " + ratio_text(f"{fvd.name}/{other.name}",
                                    results.throughput[(plan.name, fvd.name)],
                                    results.throughput[(plan.name, other.name)]))


def verdict(value: float, target: float, strict: bool) -> str:
    met = value > target if strict else value >= target
    return f"{'met' if met else 'MISSED'} ({'>' if strict else '>='} {target})"


def summary_line(plan: Plan, fvd: Setup, results: Results) -> str:
    ours = results.throughput[(plan.name, fvd.name)]
    against_qcow2 = ratio(ours, results.throughput[(plan.name, QCOW2.name)])[0]
    against_raw = ratio(ours, results.throughput[(plan.name, RAW.name)])[0]
    line = (f"  {plan.name:<17} {fvd.name:<12} {fvd.name}/qcow2 {against_qcow2:5.2f} "
            f"{verdict(against_qcow2, TARGET_QCOW2, True):<14} {fvd.name}/raw "
            f"{against_raw:5.2f} {verdict(against_raw, TARGET_RAW, False)}")
    if plan.name == POSTMARK and fvd == FVD:
        line += f"; paper: fvd/qcow2 {PAPER_POSTMARK_RATIO:.2f} (+249%)"
    return line


def report(plans: Sequence[Plan], setups: Sequence[Setup], results: Results, repeat: int
           ) -> None:
    for plan in sorted(plans, key=lambda plan: plan.title):
        report_workload(plan, setups, results, repeat)
    print(f"\nsummary: targets FVD above qcow2 in every workload, FVD at least {TARGET_RAW} "
          f"of raw (ratios of the medians; the targets are fvd's, FVD's defaults; the "
          f"variants for comparison)")
    for plan in sorted(plans, key=lambda plan: plan.title):
        for fvd in (s for s in setups if s.format == "fvd"):
            print("summary " + summary_line(plan, fvd, results).lstrip())


# -- main -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SIZE // MiB} MiB, {QUICK_OPS} transactions, "
                             f"{QUICK_WRITES} writes, {QUICK_REPEAT} repetition")
    parser.add_argument("--dir", help="work here and keep the base for the next run "
                                      f"(default: a new folder in {DEFAULT_PARENT}, removed)")
    parser.add_argument("--size", type=corefmt.to_size,
                        help=f"disk size, a multiple of 1 MiB (default "
                             f"{DEFAULT_SIZE // MiB}M; --quick {QUICK_SIZE // MiB}M)")
    parser.add_argument("--ops", type=int, help=f"PostMark transactions per run (default "
                                                f"{DEFAULT_OPS}; --quick {QUICK_OPS})")
    parser.add_argument("--writes", type=int, help=f"random 4 KiB writes per run (default "
                                                   f"{DEFAULT_WRITES}; --quick {QUICK_WRITES})")
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {DEFAULT_REPEAT}; "
                                                   f"--quick {QUICK_REPEAT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-variants", action="store_true",
                        help="leave out the FVD variants (compact, 512-byte and 64 KiB blocks)")
    args = parser.parse_args(argv)
    args.size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    args.ops = args.ops or (QUICK_OPS if args.quick else DEFAULT_OPS)
    args.writes = args.writes or (QUICK_WRITES if args.quick else DEFAULT_WRITES)
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    if args.size % MiB or args.size < MIN_SIZE or min(args.ops, args.writes, args.repeat) < 1:
        parser.error(f"--size must be a multiple of 1 MiB of at least {MIN_SIZE // MiB} MiB; "
                     f"--ops, --writes and --repeat at least 1")
    return args


def work_folder(requested: str | None) -> str:
    if requested:
        os.makedirs(requested, exist_ok=True)
        return requested
    parent = DEFAULT_PARENT if os.path.isdir(DEFAULT_PARENT) else None
    return tempfile.mkdtemp(prefix="corefmt-fvd-paper-", dir=parent)


def preamble(workdir: str) -> None:
    print(load_line())
    kind = filesystem_of(workdir)
    print(f"work folder: {workdir} ({kind})")
    if kind in MEMORY_FILESYSTEMS:
        print("warning: the work folder is in memory: flushes cost nothing there; use "
              "--dir on a disk")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set; the timed loops do not import, but "
              "unset it for comparable runs")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setups = [RAW, QCOW2, FVD, *(() if args.no_variants else VARIANTS)]
    workdir = work_folder(args.dir)
    try:
        preamble(workdir)
        base = prepare_base(workdir, args.size, args.seed)
        print(f"base: {args.size // MiB} MiB of random data, raw; {args.repeat} "
              f"repetitions, setups interleaved, order rotated")
        plans = build_plans(args)
        results = bench(plans, setups, base, workdir, args.repeat)
        report(plans, setups, results, args.repeat)
        print(load_line())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("content: " + ("every image read the same as raw" if results.correct
                         else "WRONG: some images differ from raw"))
    return 0 if results.correct else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

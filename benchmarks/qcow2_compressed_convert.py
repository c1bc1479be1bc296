#!/usr/bin/env python3
"""Benchmark: ``corefmt convert -c`` against ``qemu-img convert -c``, raw to
compressed qcow2, with zlib and with zstd.

The source (``--size``, default 4 GiB) is what a compressed cloud image
holds: compressible data, not random bytes. Its data is cut from the files
of this machine's /usr (binaries, libraries, text: documentation, scripts,
locale data), taken in a seeded order, and laid out as a used disk: data
extents of 64 KiB..16 MiB over ``DATA_FRACTION`` of the disk, holes between
them. The build is untimed and kept in ``--dir`` when one is given.

Both tools run as child processes ``--repeat`` times per compression type,
interleaved with the order alternating, page cache warm, with the same
durability (``-t writeback``: both flush the output) and the same
compression level (corefmt uses qemu's zlib and zstd parameters). Each
output is compared with the source (``qemu-img compare``) and checked
(``qemu-img check``); sizes are printed side by side. Targets (issue: qcow2
2/2): output size within 1 % of qemu-img's, time corefmt/qemu-img <= 0.6.

This is a benchmark, not a test: it exits 0 whatever the timings, and 1
only when an output differs from the source, fails its check, or a tool
fails.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile

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
    run_child,
    warm_page_cache,
)

DEFAULT_SIZE_GIB = 4
DEFAULT_REPEAT = 3
DEFAULT_SEED = 1
#: Share of the disk holding data (the rest is holes).
DATA_FRACTION = 0.6
MIN_EXTENT, MAX_EXTENT = 64 * KiB, 16 * MiB
#: The pool of real file bytes the data is cut from.
POOL_BYTES = 512 * MiB
POOL_ROOT = "/usr"
#: Bump when the source's recipe changes, so a kept source is rebuilt.
LAYOUT_VERSION = 1
COMPRESSION_TYPES = ("zlib", "zstd")
TARGET_RATIO = 0.6
SIZE_TOLERANCE = 0.01
EXIT_FAILED = 1


def _pool(seed: int) -> bytes:
    """POOL_BYTES of file contents from POOL_ROOT in a seeded order."""
    paths = []
    for folder, _dirs, files in os.walk(POOL_ROOT):
        paths.extend(os.path.join(folder, name) for name in files)
    paths.sort()
    random.Random(seed).shuffle(paths)
    parts, total = [], 0
    for path in paths:
        if total >= POOL_BYTES:
            break
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                data = handle.read(POOL_BYTES - total)
        except OSError:
            continue
        parts.append(data)
        total += len(data)
    return b"".join(parts)


def build_source(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = _pool(seed)
    if len(pool) < MAX_EXTENT:
        raise SystemExit(f"{POOL_ROOT} holds too little data for a source")
    partial = path + ".partial"
    with open(partial, "wb") as out:
        out.truncate(size)
        position, written = 0, 0
        while position < size:
            length = min(size - position, rng.randint(MIN_EXTENT // KiB, MAX_EXTENT // KiB) * KiB)
            start = rng.randrange(0, len(pool) - length) if len(pool) > length else 0
            out.seek(position)
            out.write(pool[start:start + length])
            written += length
            gap = int(length * (1 - DATA_FRACTION) / DATA_FRACTION * rng.uniform(0.5, 1.5))
            position += length + gap // (64 * KiB) * (64 * KiB)
        out.flush()
        os.fsync(out.fileno())
    os.rename(partial, path)
    print(f"built {path}: {written / MiB:.0f} MiB of data from {POOL_ROOT}")


def _check(path: str) -> bool:
    result = subprocess.run(["qemu-img", "check", "-q", path], check=False,
                            stdin=subprocess.DEVNULL)
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE_GIB, metavar="GIB")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--dir", help="work folder (the source is kept there)")
    parser.add_argument("--types", default=",".join(COMPRESSION_TYPES))
    args = parser.parse_args(argv)
    if not check_tools("qemu-img"):
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="corefmt-bench-compress-")
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, f"source-{args.size}g-{args.seed}-v{LAYOUT_VERSION}.raw")
    if not os.path.exists(source):
        build_source(source, args.size * GiB, args.seed)
    print(load_line())
    failed = False
    for kind in args.types.split(","):
        times: dict[str, list[float]] = {COREFMT: [], QEMU: []}
        cpu: dict[str, list[float]] = {COREFMT: [], QEMU: []}
        sizes: dict[str, int] = {}
        for repetition in range(args.repeat):
            order = (COREFMT, QEMU) if repetition % 2 == 0 else (QEMU, COREFMT)
            for tool in order:
                output = os.path.join(workdir, f"out-{tool}.qcow2")
                remove(output)
                warm_page_cache(source)
                program = [*COREFMT_CLI] if tool == COREFMT else ["qemu-img"]
                child = run_child([*program, "convert", "-c", "-t", "writeback", "-f", "raw",
                                   "-O", "qcow2", "-o", f"compression_type={kind}",
                                   source, output])
                if child.exit_code:
                    print(f"{tool} failed: {child.stderr.strip()}", file=sys.stderr)
                    return EXIT_FAILED
                times[tool].append(child.seconds)
                cpu[tool].append(child.cpu_seconds)
                sizes[tool] = os.path.getsize(output)
                if repetition == 0 and not (qemu_compare(source, "raw", output, "qcow2")
                                            and _check(output)):
                    print(f"{tool}'s {kind} output differs from the source or fails its "
                          "check", file=sys.stderr)
                    failed = True
        print(f"{kind}, {args.size} GiB source, {args.repeat} repetitions:")
        for tool in (COREFMT, QEMU):
            print(row(f"{tool} wall", times[tool], "s", ".2f"))
            print(row(f"{tool} cpu", cpu[tool], "s", ".2f"))
        size_ratio = sizes[COREFMT] / sizes[QEMU]
        print(f"  output size: corefmt {sizes[COREFMT] / MiB:.1f} MiB, qemu-img "
              f"{sizes[QEMU] / MiB:.1f} MiB (ratio {size_ratio:.4f}; "
              f"{'within' if abs(size_ratio - 1) <= SIZE_TOLERANCE else 'outside'} 1 %)")
        print(ratio_line(f"convert -c {kind}", times[COREFMT], times[QEMU], TARGET_RATIO,
                         higher_is_better=False))
        for tool in (COREFMT, QEMU):
            remove(os.path.join(workdir, f"out-{tool}.qcow2"))
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: ``commit`` and safe ``rebase`` of a 4 GiB qcow2 image with
1.6 GiB allocated in it, over a raw and over a qcow2 base, corefmt against
qemu-img in the same run.

Images (built by qemu-img, untimed, kept in ``--dir``): a base of
``--size`` (default 4 GiB; ``--quick`` 1 GiB) with data in its first
quarter, as raw and as qcow2; ``mid.qcow2`` over each with 8 MiB pieces
spread over the disk (a tenth of it); ``top.qcow2`` with 16 MiB pieces,
``--allocated`` bytes in all (default 1.6 GiB; 40 % of the disk).

Timed, each tool as a child process, ``--repeat`` times, interleaved (the
order alternates between repetitions), every run on fresh copies (untimed):

- commit: ``top`` over the base, committed into it: ``corefmt commit top``
  against ``qemu-img commit -t writeback top`` (both flush).
- rebase: ``top`` over ``mid`` over the base, rebased onto the base
  (``-b base -F FMT``): both compare what ``mid`` holds outside ``top``
  and copy what differs.

Checked: the results read as the input did (``qemu-img compare``).
Target: time ratio corefmt/qemu-img <= 1.0 for each. A benchmark, not a
test: it exits 0 whatever the timings, 1 only when an output is wrong.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from qcow2_benchlib import (
    COREFMT,
    COREFMT_CLI,
    QEMU,
    GiB,
    MiB,
    check_tools,
    load_line,
    qemu_compare,
    ratio_line,
    remove,
    row,
    run_child,
    write_extents,
)

#: Target: corefmt's time over qemu-img's.
TARGET_RATIO = 1.0
TOP_PIECE = 16 * MiB
MID_PIECE = 8 * MiB
#: The image layout; a new version rebuilds kept images.
LAYOUT_VERSION = 1
FORMATS = ("raw", "qcow2")


def _pieces(size: int, total: int, piece: int, phase: int) -> list[tuple[int, int]]:
    """``total`` bytes in ``piece``-long extents evenly over the disk."""
    count = max(1, total // piece)
    stride = size // count // piece * piece
    return [(index * stride + phase % max(stride - piece, 1) // piece * piece, piece)
            for index in range(count)]


def _qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def _qcow2_from_extents(path: str, size: int, extents: list[tuple[int, int]], seed: int
                        ) -> None:
    raw = path + ".raw"
    write_extents(raw, size, extents, seed)
    _qemu("convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)


def build(workdir: str, size: int, allocated: int) -> dict[str, str]:
    """The kept inputs: base.{raw,qcow2}, top.qcow2 and mid.qcow2 (standalone;
    pointed at a base per run)."""
    tag = f"{size}-{allocated}-v{LAYOUT_VERSION}"
    paths = {"raw": os.path.join(workdir, f"base-{tag}.raw"),
             "qcow2": os.path.join(workdir, f"base-{tag}.qcow2"),
             "top": os.path.join(workdir, f"top-{tag}.qcow2"),
             "mid": os.path.join(workdir, f"mid-{tag}.qcow2")}
    if not os.path.exists(paths["raw"]):
        write_extents(paths["raw"], size, [(0, size // 4)], seed=1)
    if not os.path.exists(paths["qcow2"]):
        _qemu("convert", "-f", "raw", "-O", "qcow2", paths["raw"], paths["qcow2"])
    if not os.path.exists(paths["mid"]):
        _qcow2_from_extents(paths["mid"], size, _pieces(size, size // 10, MID_PIECE, 3 * MiB),
                            seed=2)
    if not os.path.exists(paths["top"]):
        _qcow2_from_extents(paths["top"], size, _pieces(size, allocated, TOP_PIECE, 0), seed=3)
    return paths


def _copy(source: str, target: str) -> None:
    remove(target)
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", source, target], check=True)


def _prepare(paths: dict[str, str], run_dir: str, base_format: str, operation: str
             ) -> tuple[str, str]:
    """Fresh copies for one run: (top, base)."""
    base = os.path.join(run_dir, f"base.{base_format}")
    top = os.path.join(run_dir, "top.qcow2")
    _copy(paths[base_format], base)
    _copy(paths["top"], top)
    if operation == "commit":
        _qemu("rebase", "-u", "-b", os.path.basename(base), "-F", base_format, top)
    else:
        mid = os.path.join(run_dir, "mid.qcow2")
        _copy(paths["mid"], mid)
        _qemu("rebase", "-u", "-b", os.path.basename(base), "-F", base_format, mid)
        _qemu("rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", top)
    reference = os.path.join(run_dir, "reference.qcow2")
    _copy(top, reference)  # the same chain, to compare the result with
    os.sync()
    return top, base


def _command(tool: str, operation: str, top: str, base_format: str) -> list[str]:
    if operation == "commit":
        return ([*COREFMT_CLI, "commit", "-q", top] if tool == COREFMT
                else ["qemu-img", "commit", "-q", "-t", "writeback", top])
    args = ["rebase", "-q", "-b", f"base.{base_format}", "-F", base_format, top]
    return [*COREFMT_CLI, *args] if tool == COREFMT else ["qemu-img", *args]


def _expected_ok(operation: str, top: str, base: str, base_format: str, run_dir: str) -> bool:
    reference = os.path.join(run_dir, "reference.qcow2")
    if operation == "commit":  # the base now shows what the top showed
        return qemu_compare(base, base_format, reference, "qcow2")
    return qemu_compare(top, "qcow2", reference, "qcow2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(),
                                                      "corefmt-bench-commit-rebase"))
    parser.add_argument("--size", type=int, default=4 * GiB)
    parser.add_argument("--allocated", type=int, default=int(1.6 * GiB))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 GiB, 0.4 GiB allocated")
    args = parser.parse_args()
    if args.quick:
        args.size, args.allocated = 1 * GiB, int(0.4 * GiB)
    if not check_tools("qemu-img", "cp"):
        return 0
    os.makedirs(args.dir, exist_ok=True)
    paths = build(args.dir, args.size, args.allocated)
    run_dir = os.path.join(args.dir, "run")
    os.makedirs(run_dir, exist_ok=True)
    print(f"commit and safe rebase: {args.size / GiB:.1f} GiB disk, "
          f"{args.allocated / GiB:.2f} GiB allocated in the top; {load_line()}")
    failed = False
    for operation in ("commit", "rebase"):
        for base_format in FORMATS:
            times: dict[str, list[float]] = {COREFMT: [], QEMU: []}
            for repetition in range(args.repeat):
                order = (COREFMT, QEMU) if repetition % 2 == 0 else (QEMU, COREFMT)
                for tool in order:
                    top, base = _prepare(paths, run_dir, base_format, operation)
                    child = run_child(_command(tool, operation, top, base_format))
                    if child.exit_code != 0:
                        print(f"{tool} {operation} failed: {child.stderr.strip()}",
                              file=sys.stderr)
                        failed = True
                        continue
                    if not _expected_ok(operation, top, base, base_format, run_dir):
                        print(f"{tool} {operation} over {base_format}: wrong result",
                              file=sys.stderr)
                        failed = True
                    times[tool].append(child.seconds)
            name = f"{operation} qcow2 over {base_format}"
            print(f"{name}:")
            for tool in (COREFMT, QEMU):
                if times[tool]:
                    print(row(tool, times[tool], "s", ".2f"))
            if len(times[COREFMT]) == len(times[QEMU]) == args.repeat:
                print("  " + ratio_line(name, times[COREFMT], times[QEMU], TARGET_RATIO,
                                        higher_is_better=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The qcow2 interop matrix: a pairwise covering array of create options,
the combinations qemu-img 7.2 refuses, and one seeded workload that both the
corefmt Python API and qemu-io can run (with a raw reference it is mirrored
into)."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TIMEOUT = 120

KiB, MiB = 1024, 1024 * 1024

#: The factors of the matrix and their values (readable, as in the issue).
FACTORS: dict[str, tuple] = {
    "compat": ("0.10", "1.1"),
    "cluster_size": (512, 4 * KiB, 64 * KiB, 2 * MiB),
    "refcount_bits": (1, 16, 64),
    "extended_l2": (False, True),
    "data_file": ("none", "external", "raw"),
    "lazy_refcounts": (False, True),
    "backing": ("none", "raw", "qcow2"),
}
MIN_EXTL2_CLUSTER = 16 * KiB


@dataclass(frozen=True)
class Combo:
    compat: str
    cluster_size: int
    refcount_bits: int
    extended_l2: bool
    data_file: str  # none | external | raw (external with data_file_raw=on)
    lazy_refcounts: bool
    backing: str  # none | raw | qcow2

    @property
    def v3(self) -> bool:
        return self.compat == "1.1"

    @property
    def size(self) -> int:
        """Small images: 4 MiB, 8 MiB (4 clusters) with 2 MiB clusters."""
        return max(4 * MiB, 4 * self.cluster_size)

    def options(self, directory: Path, preallocation: str | None = None) -> str:
        """The -o string (data files by absolute path: qemu 7.2 resolves a
        relative one against its working directory)."""
        parts = [f"compat={self.compat}", f"cluster_size={self.cluster_size}",
                 f"refcount_bits={self.refcount_bits}",
                 f"extended_l2={'on' if self.extended_l2 else 'off'}",
                 f"lazy_refcounts={'on' if self.lazy_refcounts else 'off'}"]
        if self.data_file != "none":
            parts.append(f"data_file={directory / 'image.data'}")
        if self.data_file == "raw":
            parts.append("data_file_raw=on")
        if preallocation:
            parts.append(f"preallocation={preallocation}")
        return ",".join(parts)

    @property
    def id(self) -> str:
        cs = self.cluster_size
        size = f"{cs // MiB}M" if cs >= MiB else f"{cs // KiB}k" if cs >= KiB else str(cs)
        return "-".join([
            f"v{'3' if self.v3 else '2'}", f"c{size}", f"rb{self.refcount_bits}",
            "extl2" if self.extended_l2 else "l2", f"df_{self.data_file}",
            "lazy" if self.lazy_refcounts else "eager", f"bk_{self.backing}"])


def refusal(combo: Combo) -> str | None:
    """Why qemu-img 7.2 refuses ``combo`` (None: it accepts it)."""
    if not combo.v3:
        if combo.refcount_bits != 16:
            return "refcount_bits needs v3"
        if combo.extended_l2:
            return "extended_l2 needs v3"
        if combo.data_file != "none":
            return "data_file needs v3"
        if combo.lazy_refcounts:
            return "lazy_refcounts needs v3"
    if combo.extended_l2 and combo.cluster_size < MIN_EXTL2_CLUSTER:
        return "extended_l2 needs 16k clusters"
    if combo.data_file == "raw" and combo.backing != "none":
        return "data_file_raw with a backing file"
    return None


def covering_array() -> list[Combo]:
    """A small set of accepted combinations in which every pair of values
    that some accepted combination holds appears at least once (greedy:
    each row the accepted combination covering most pairs not yet covered,
    the first such in product order, so the array is the same every run)."""
    names = list(FACTORS)
    valid = [values for values in itertools.product(*FACTORS.values())
             if refusal(Combo(*values)) is None]

    def pairs(values: tuple) -> set:
        return {((i, values[i]), (j, values[j]))
                for i, j in itertools.combinations(range(len(names)), 2)}

    uncovered = set().union(*(pairs(values) for values in valid))
    rows: list[Combo] = []
    while uncovered:
        best = max(valid, key=lambda values: len(pairs(values) & uncovered))
        uncovered -= pairs(best)
        rows.append(Combo(*best))
    return rows


def uncoverable_pairs() -> set:
    """Pairs of values no accepted combination holds (the refused tests' job)."""
    names = list(FACTORS)
    every = set()
    held = set()
    for values in itertools.product(*FACTORS.values()):
        for i, j in itertools.combinations(range(len(names)), 2):
            pair = ((names[i], values[i]), (names[j], values[j]))
            every.add(pair)
            if refusal(Combo(*values)) is None:
                held.add(pair)
    return every - held


#: What qemu-img 7.2 refuses: (id, -o string, backing?, qemu's message).
V3_NEEDED = "compatibility level 1.1 and above (use version=v3 or greater)"
REFUSED = [
    ("v2-refcount_bits=1", "compat=0.10,refcount_bits=1", False,
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ("v2-refcount_bits=64", "compat=0.10,refcount_bits=64", False,
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ("v2-extended_l2", "compat=0.10,extended_l2=on", False,
     "Extended L2 entries are only supported with " + V3_NEEDED),
    ("v2-data_file", "compat=0.10,data_file={dir}/image.data", False,
     "External data files are only supported with " + V3_NEEDED),
    ("v2-data_file_raw", "compat=0.10,data_file={dir}/image.data,data_file_raw=on", False,
     "External data files are only supported with " + V3_NEEDED),
    ("v2-lazy_refcounts", "compat=0.10,lazy_refcounts=on", False,
     "Lazy refcounts only supported with " + V3_NEEDED),
    ("extended_l2-cluster512", "extended_l2=on,cluster_size=512", False,
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ("extended_l2-cluster4k", "extended_l2=on,cluster_size=4k", False,
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ("extended_l2-cluster8k", "extended_l2=on,cluster_size=8k", False,
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ("data_file_raw-raw_backing", "data_file={dir}/image.data,data_file_raw=on", "raw",
     "Backing file and data-file-raw cannot be used at the same time"),
    ("data_file_raw-qcow2_backing", "data_file={dir}/image.data,data_file_raw=on", "qcow2",
     "Backing file and data-file-raw cannot be used at the same time"),
    ("data_file_raw-without-data_file", "data_file_raw=on", False,
     "data-file-raw requires data-file"),
]


# -- running the tools --------------------------------------------------------------------
def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("PYTHONWARNINGS", None)
    return env


def qemu(program: str | None, *args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    assert program, "qemu-img/qemu-io not installed"
    return subprocess.run([program, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=environment(), timeout=TIMEOUT, check=False)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result


# -- backing files ------------------------------------------------------------------------
def make_backing(directory: Path, kind: str, size: int, seed: int) -> tuple[Path | None, bytes]:
    """The backing file of a row and the bytes it shows: a raw file whose
    first 3/4 hold random data (the rest a hole), or a qcow2 (made by
    qemu) with data in the first half, zeros written in part of it and
    nothing in the second half (so reads fall through to its end)."""
    if kind == "none":
        return None, bytes(size)
    content = bytearray(size)
    if kind == "raw":
        path = directory / "backing.raw"
        content[:size * 3 // 4] = random.Random(seed).randbytes(size * 3 // 4)
        with open(path, "wb") as f:
            f.write(content[:size * 3 // 4])
            f.truncate(size)
        return path, bytes(content)
    path = directory / "backing.qcow2"
    ok(qemu(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, size,
            cwd=directory))
    half = size // 2
    ok(qemu(QEMU_IO, "-c", f"write -P 0x5c 0 {half}", "-c", f"write -z {half // 4} 64k", path,
            cwd=directory))
    content[:half] = b"\x5c" * half
    content[half // 4:half // 4 + 64 * KiB] = bytes(64 * KiB)
    return path, bytes(content)


# -- the workload -------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # write | zero | zero_unmap | discard
    offset: int
    length: int
    pattern: int = 0  # write: the qemu-io -P byte

    def qemu_io(self) -> str:
        if self.kind == "write":
            return f"write -P {self.pattern:#x} {self.offset} {self.length}"
        if self.kind == "zero":
            return f"write -z {self.offset} {self.length}"
        if self.kind == "zero_unmap":
            return f"write -z -u {self.offset} {self.length}"
        return f"discard {self.offset} {self.length}"


def workload(combo: Combo, seed: int) -> list[Op]:
    """The same kinds of request in every row, scaled to its cluster size:
    partial-cluster writes over the backing file (copy-on-write), writes
    across cluster boundaries, seeded random writes, zeroing of whole and
    part clusters with and without unmap, a discard of whole clusters, and
    the disk's last byte."""
    cs, size = combo.cluster_size, combo.size
    rng = random.Random(seed)

    def pattern() -> int:
        return rng.randrange(1, 256)

    ops = [
        Op("write", min(512, cs // 4), min(1024, cs // 2), pattern()),  # COW head and tail
        Op("write", cs - min(1536, cs // 2), 2 * min(1536, cs // 2), pattern()),  # 0/1
        Op("write", cs + cs // 2, cs, pattern()),            # half of 1, half of 2
    ]
    for _ in range(6):
        length = rng.randrange(1, 2 * cs // 512 + 1) * 512
        offset = rng.randrange(0, (size - length) // 512 + 1) * 512
        ops.append(Op("write", offset, length, pattern()))
    ops += [
        Op("write", 3 * cs + min(1024, cs // 4), min(512, cs // 4), pattern()),  # partial
        Op("zero", cs, cs),                                  # whole cluster, allocated, kept
        Op("zero", 2 * cs + min(512, cs // 4), min(1024, cs // 2)),  # part of a cluster
        Op("write", 3 * cs, cs, pattern()),
        Op("zero_unmap", 3 * cs, cs),                        # whole cluster, unmapped
        Op("zero_unmap", size - 2 * cs, 2 * cs),             # up to the end
        Op("write", 2 * cs, cs // 2, pattern()),
        Op("discard", 2 * cs, cs),                           # whole cluster with data
        Op("write", size - 1, 1, pattern()),                 # last byte
    ]
    return ops


def discard_reads_zeros(combo: Combo) -> bool:
    """The driver's docstring (and qemu 7.2): a discarded cluster reads as
    zeros, except in v2 with a backing file, where discard does nothing."""
    return combo.v3 or combo.backing == "none"


def apply_reference(reference: bytearray, combo: Combo, ops: list[Op],
                    data: dict[int, bytes]) -> None:
    """Mirror the workload into the raw reference (``data``: the bytes each
    write index wrote)."""
    for index, op in enumerate(ops):
        end = op.offset + op.length
        if op.kind == "write":
            reference[op.offset:end] = data[index]
        elif op.kind in ("zero", "zero_unmap"):
            reference[op.offset:end] = bytes(op.length)
        elif discard_reads_zeros(combo):
            cs = combo.cluster_size
            start = -(-op.offset // cs) * cs
            stop = end // cs * cs
            if stop > start:
                reference[start:stop] = bytes(stop - start)


def write_data(ops: list[Op], seed: int) -> dict[int, bytes]:
    """Seeded random bytes for each write of the API run."""
    rng = random.Random(seed)
    return {index: rng.randbytes(op.length) for index, op in enumerate(ops) if op.kind == "write"}

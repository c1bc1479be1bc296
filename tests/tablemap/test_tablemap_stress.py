"""tablemap under ``corefmt stress`` with a cache of 4 L2 tables (evictions on
most requests), and proof that broken variants do not pass.

The stress runner opens images without open options, so the tiny cache is
set at create time: ``-o l2_cache_entries=4`` is recorded in the header as
the image's default (the open option overrides it). With 512-byte tables a
4 MiB image has 16 L2 tables, four times what the cache holds.

The data-before-L2 ordering is also proven by a harness of its own that
cuts the power of the image's and the data file's disks at once (the
stress runner of the last commit crashed only the image files it created).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import threading
import time

import pytest

import corefmt
from corefmt import CorefmtError, StorageError, plugins
from corefmt.cli.stress import add_stress_parser
from corefmt.storage.simulated import SimFault
from corefmt.stress import StressConfig, run_seed, run_seeds

MiB = 1024 * 1024
SIZE = 4 * MiB
TINY = "table_size=512,l2_cache_entries=4"
SEEDS = 40


def _cli(*words: str) -> int:
    parser = argparse.ArgumentParser(prog="corefmt")
    add_stress_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["stress", *words])
    return args.run(args)


def test_stress_cli_crash_errors_over_raw_with_a_tiny_cache(tablemap, capsys):
    assert _cli("--format", "tablemap", "-o", TINY, "--size", "4M", "--base", "raw",
                "--seeds", str(SEEDS), "--crash", "--errors") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f", crashes {SEEDS}, " in last and last.endswith("mismatches 0, check failures 0")


def test_stress_alone_crash_errors_with_a_tiny_cache(tablemap):
    summary = run_seeds(StressConfig(format="tablemap", options=TINY, size=SIZE, crash=True,
                                     errors=True), range(SEEDS))
    assert summary.ok, summary.line()
    assert summary.crashes == SEEDS and summary.errors_injected > SEEDS // 2


def _first_caught(config: StressConfig, seeds: int) -> str | None:
    """The first seed the stress run fails. A broken image can also make the
    runner raise (it reads the reopened image without catching errors: a core
    gap), which fails ``corefmt stress`` as surely as a mismatch."""
    for seed in range(seeds):
        try:
            result = run_seed(config, seed)
        except CorefmtError as error:
            return f"seed {seed} raised: {error}"
        if not result.ok:
            return f"seed {seed}: {(result.mismatches + result.check_failures)[:1]}"
    return None


@pytest.mark.parametrize(("variant", "mode"), [
    ("tablemap-l1first", {"crash": True, "errors": True}),  # L1 may land before its table
    # an L2 entry may land before its data: caught since the runner cuts the
    # power of data files too (the two-disk test below proves it regardless)
    ("tablemap-nobarrier", {"crash": True, "errors": True}),
    ("tablemap-nodirty", {}),  # evicted tables dropped: entries lost with no crash at all
])
def test_broken_variants_fail_the_same_stress_run(broken_tablemap, variant, mode):
    config = StressConfig(format=variant, base="raw", options=TINY, size=SIZE, **mode)
    assert _first_caught(config, SEEDS), f"{variant} slipped through"


# -- both disks lose power at once --------------------------------------------------
class TwoDiskCut:
    """A policy for the image's and the data file's simulated disks: at the
    ``at``-th request (of either) both lose power, each keeping a seed-chosen
    subset of its unflushed writes."""

    def __init__(self, disks, at: int, seed: int):
        self.disks, self.at, self.seed, self.count = disks, at, seed, 0

    def __call__(self, request):
        self.count += 1
        if self.count != self.at:
            return None
        for number, disk in enumerate(self.disks):
            if disk.name != request.disk:
                disk.power_cut(random.Random(f"{self.seed}:{number}"))
        return SimFault(power_cut=self.seed)


def _crash_seed(format: str, seed: int) -> list[str]:
    """Random writes and flushes over a raw base, a two-disk power cut, then
    every sector must hold its last flushed content or a later write, and
    check must find no corruption. Returns the problems."""
    rng = random.Random(seed)
    sim = plugins.registry().storages["sim"]
    base, top = f"sim:tm2-{seed}-base", f"sim:tm2-{seed}-top"
    corefmt.create(base, "raw", SIZE)
    base_data = rng.randbytes(SIZE)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, base_data)
    corefmt.create(top, "tablemap", options=TINY, backing=base, backing_format="raw")
    disks = [sim.disk(top), sim.disk(top + ".data")]
    sectors = SIZE // 512
    durable = [base_data[i * 512:(i + 1) * 512] for i in range(sectors)]
    later: dict[int, list[bytes]] = {}  # sector -> what was written since the last flush
    for disk in disks:
        disk.sync()
    node = corefmt.open(top, format)
    policy = TwoDiskCut(disks, rng.randint(20, 400), seed)
    for disk in disks:
        disk.policy = policy
    try:
        for _ in range(120):
            if rng.random() < 0.1:
                node.flush()
                for sector, values in later.items():
                    durable[sector] = values[-1]
                later.clear()
                continue
            first = rng.randrange(sectors - 16)
            data = rng.randbytes(rng.randint(1, 16) * 512)
            for k in range(len(data) // 512):
                later.setdefault(first + k, []).append(data[k * 512:(k + 1) * 512])
            node.write(first * 512, data)
    except CorefmtError:
        pass  # the power went
    finally:
        for disk in disks:
            disk.policy = None
            disk.power_cut(random.Random(seed))  # if the policy did not yet
        _close_quietly(node)
    for disk in disks:
        disk.restore(disk.crash_image or b"")
    problems = []
    with corefmt.open(top) as node:
        try:
            content = node.read(0, SIZE)
        except CorefmtError as error:
            content = b""
            problems.append(f"seed {seed}: the image does not read: {error}")
        for sector in range(sectors if content else 0):
            got = content[sector * 512:(sector + 1) * 512]
            if got != durable[sector] and got not in later.get(sector, ()):
                problems.append(f"seed {seed}: sector {sector} holds neither its flushed "
                                "data nor a later write")
                break
        found = node.image.check(False)
        if not found.clean:
            problems.append(f"seed {seed}: check: {found.messages[:2]}")
    for path in (base, top, top + ".data"):
        sim.forget(path)
    return problems


def _close_quietly(node) -> None:
    with contextlib.suppress(CorefmtError):
        node.close()


CRASH_SEEDS = 30


def test_power_cuts_of_image_and_data_file_keep_flushed_data(tablemap):
    problems = [problem for seed in range(CRASH_SEEDS) for problem in _crash_seed("tablemap", seed)]
    assert not problems, problems[:3]


def test_an_l2_entry_before_its_data_is_flushed_is_caught(broken_tablemap):
    problems = [problem for seed in range(CRASH_SEEDS)
                for problem in _crash_seed("tablemap-nobarrier", seed)]
    assert problems, "tablemap-nobarrier slipped through"


# -- a core bug tablemap ran into --------------------------------------------------
class _FailFirstWrite(corefmt.Storage):
    """Memory whose first write waits until released, then fails."""

    def __init__(self):
        super().__init__("failing", False)
        self.bytes = bytearray(4096)
        self.started, self.release = threading.Event(), threading.Event()
        self.writes = 0

    def size(self) -> int:
        return len(self.bytes)

    def readinto(self, offset, buf) -> None:
        buf[:] = self.bytes[offset:offset + len(buf)]

    def _write(self, offset, data) -> None:
        self.writes += 1
        if self.writes == 1:
            self.started.set()
            self.release.wait(5)
            raise StorageError(self.path, "write", OSError(5, "Input/output error"))
        self.bytes[offset:offset + len(data)] = data

    def _truncate(self, size) -> None:
        del self.bytes[size:]


def test_a_flush_does_not_count_a_failed_concurrent_write_back():
    """Seen as lost L2 tables under --crash --errors: one request's eviction
    fails while another request's flush waits for it; that flush reported
    success with the table still dirty, and the L1 then pointed at it."""
    storage = _FailFirstWrite()
    cache = corefmt.MetadataCache("t", storage, 512, 4)
    with cache.table_empty(0) as handle:
        handle.data[:8] = b"\x01" * 8
    def first_flush() -> None:  # its write-back fails
        with contextlib.suppress(StorageError):
            cache.flush()

    evicting = threading.Thread(target=first_flush)
    evicting.start()
    assert storage.started.wait(5)
    flushing = threading.Thread(target=cache.flush, kwargs={"storage": True})
    flushing.start()
    time.sleep(0.2)  # the flush now waits for the write-back in flight
    storage.release.set()
    evicting.join(5)
    flushing.join(5)
    assert cache.dirty_count == 0 and storage.bytes[:8] == b"\x01" * 8


class _GatedStorage(corefmt.Storage):
    """Bytes in memory; a write at ``gate_offset`` waits until released;
    ``durable`` is what the last flush saw."""

    def __init__(self, content: bytes, gate_offset: int | None = None):
        super().__init__("gated", False)
        self.bytes, self.durable = bytearray(content), bytes(content)
        self.gate_offset = gate_offset
        self.at_gate, self.release = threading.Event(), threading.Event()

    def size(self) -> int:
        return len(self.bytes)

    def readinto(self, offset, buf) -> None:
        part = self.bytes[offset:offset + len(buf)]
        buf[:len(part)] = part
        buf[len(part):] = bytes(len(buf) - len(part))

    def _write(self, offset, data) -> None:
        if offset == self.gate_offset:
            self.at_gate.set()
            self.release.wait(5)
        end = offset + len(data)
        self.bytes.extend(bytes(max(0, end - len(self.bytes))))
        self.bytes[offset:end] = data

    def _truncate(self, size) -> None:
        del self.bytes[size:]

    def flush(self) -> None:
        self.durable = bytes(self.bytes)


def test_a_flush_waits_for_the_l1_write_of_a_flush_racing_it(tablemap):
    """Seen under --crash --errors as a lost L2 table: a flush found no dirty
    L1 chunk (another request's flush was writing it) and reported success
    before that write was durable."""
    from corefmt_tablemap.driver import L1_OFFSET

    memory = plugins.registry().storages["memory"]
    corefmt.create("memory:tm-race", "tablemap", SIZE, options=TINY)
    created = memory.open("memory:tm-race", read_only=True)
    storage = _GatedStorage(created.read(0, created.size()), gate_offset=L1_OFFSET)
    data = _GatedStorage(b"")
    context = corefmt.ImageContext(path="memory:tm-race", read_only=False,
                                   read_below=lambda offset, length: bytes(length),
                                   open_child=lambda role, path, **_: data)
    image = tablemap.open(storage, context)
    image.write(0, b"x" * 4096)  # a new table: the L1 chunk is dirty
    first = threading.Thread(target=image.flush)
    first.start()
    assert storage.at_gate.wait(5)  # the first flush is writing the L1 chunk
    second = threading.Thread(target=image.flush)
    second.start()
    second.join(0.3)
    racing = second.is_alive()
    storage.release.set()
    first.join(5)
    second.join(5)
    assert racing, "the second flush returned while the L1 chunk was still being written"
    assert storage.durable[L1_OFFSET:L1_OFFSET + 8] != bytes(8)

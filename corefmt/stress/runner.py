"""Runs one seed: build images on simulated disks, race a workload, check.

A seed decides everything: the base content, the workload, the storage
alignment, which requests fail, where the power goes and, through the
batch scheduler, how the racing requests of each batch interleave and in
which order they complete. Running a seed again gives the same result.
Images are made and opened through ``corefmt.create``/``corefmt.open``, so
any installed format (and any format as the base of a chain) is tested
the same way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import random
from collections.abc import Callable, Iterable

import attrs

import corefmt
from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.block.queue import RequestQueue
from corefmt.driver import has_capability
from corefmt.errors import CorefmtError
from corefmt.storage.simulated import SimDisk, SimStorageDriver, request_tag
from corefmt.stress.defaults import DEFAULT_OPERATIONS, DEFAULT_SIZE
from corefmt.stress.faults import FaultPlan, plan_faults
from corefmt.stress.model import MAX_MESSAGES, ImageModel, Outcome
from corefmt.stress.qemu_check import applies_to, qemu_check
from corefmt.stress.report import StressSummary
from corefmt.stress.scheduler import STALL_SECONDS, BatchScheduler
from corefmt.stress.workload import (
    DISCARD,
    FLUSH,
    MAX_BATCH,
    READ,
    SECTOR_SIZE,
    WRITE,
    ZERO,
    Op,
    generate,
)

#: Storage request alignments a seed picks from (512: disks, 4096: O_DIRECT-like).
ALIGNMENTS = (1, SECTOR_SIZE, 4096)
BASE_EXTENTS = 8
BASE_EXTENT_MAX = 64 * 1024
PROBE_WRITE_MAX = 8192
#: Names the scheduler's random stream, apart from the workload's (same seed).
SCHEDULE_STREAM = "schedule"


@attrs.frozen
class StressConfig:
    """What to test; the CLI options map one to one onto these fields."""

    format: str = "raw"
    #: The chain below the image under test, bottom first: "raw" or "raw,qcow2".
    base: str | None = None
    size: int = DEFAULT_SIZE
    operations: int = DEFAULT_OPERATIONS
    crash: bool = False
    errors: bool = False
    copy_on_read: bool = True
    #: Racing requests complete in a seed-chosen order (else in the order issued).
    delays: bool = True
    #: ``-o`` create options of the image under test (not of the base).
    options: str = ""


@attrs.define
class SeedResult:
    seed: int
    operations: int = 0
    crashed: bool = False
    errors_injected: int = 0
    #: Every mismatch counts; only the first MAX_MESSAGES are described.
    mismatch_count: int = 0
    mismatches: list[str] = attrs.field(factory=list)
    check_failures: list[str] = attrs.field(factory=list)
    #: Batches that ran unscheduled (a thread blocked outside ``corefmt.sync``):
    #: their interleaving, and so this result, may differ on replay.
    stalls: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatch_count and not self.check_failures


def _sim_driver() -> SimStorageDriver:
    driver = plugins.registry().storages.get("sim")
    if not isinstance(driver, SimStorageDriver):
        raise CorefmtError("the simulated storage driver 'sim' is not installed")
    return driver


def _run_op(node: BlockNode, op: Op, plan: FaultPlan, disk: SimDisk,
            scheduler: BatchScheduler) -> Outcome:
    """Run one request on a queue worker, in the scheduler's turns; report, never raise."""
    with scheduler.task(op.tag):  # the outcome is judged in turn too
        return _outcome(node, op, plan, disk)


def _outcome(node: BlockNode, op: Op, plan: FaultPlan, disk: SimDisk) -> Outcome:
    data: bytes | None = None
    try:
        with request_tag(op.tag):
            if op.kind == READ:
                data = node.read(op.offset, op.length)
            elif op.kind == WRITE:
                assert op.data is not None
                node.write(op.offset, op.data)
            elif op.kind == ZERO:
                node.write_zeroes(op.offset, op.length)
            elif op.kind == DISCARD:
                node.discard(op.offset, op.length)
            elif op.kind == FLUSH:
                node.flush()
    except Exception as error:  # every failure is judged by the model
        return Outcome(False, f"{type(error).__name__}: {error}",
                       injected=plan.was_fired(op.tag) or disk.dead)
    return Outcome(True, data=data, injected=plan.was_fired(op.tag))


def base_formats(config: StressConfig) -> list[str]:
    """The formats of the chain below the image under test, bottom first."""
    return [name.strip() for name in config.base.split(",")] if config.base else []


def _fill_base(rng: random.Random, path: str, format: str, size: int) -> bytes:
    """Random data in a few extents of a base layer; returns what the chain
    down from it holds (each layer of a deeper chain adds its own extents)."""
    with corefmt.open(path, format) as base:
        content = bytearray(base.read(0, size))
        for _ in range(BASE_EXTENTS):
            length = rng.randint(1, min(BASE_EXTENT_MAX, size))
            offset = rng.randrange(0, size - length + 1)
            data = rng.randbytes(length)
            base.write(offset, data)
            content[offset:offset + length] = data
        base.flush()
    return bytes(content)


def _unused_prefix(sim: SimStorageDriver, prefix: str) -> str:
    """``prefix``, unless another run uses it now: names show up in messages,
    so they must not change from one replay to the next."""
    for number in itertools.count(1):
        candidate = prefix if number == 1 else f"{prefix}.{number}"
        if not sim.exists(f"{candidate}-top"):
            return candidate
    raise AssertionError("unreachable")


class _SeedRun:
    """The state of one seed's run (images, model, plan, result)."""

    def __init__(self, config: StressConfig, seed: int):
        self.config = config
        self.rng = random.Random(seed)
        self.result = SeedResult(seed)
        self.sim = _sim_driver()
        prefix = _unused_prefix(self.sim, f"sim:stress-{seed}")
        self.top_path = f"{prefix}-top"
        self.base_formats = base_formats(config)
        self.base_paths = [f"{prefix}-base{depth}" for depth in range(len(self.base_formats))]

    @property
    def paths(self) -> list[str]:
        return [self.top_path, *self.base_paths]

    def run(self) -> SeedResult:
        try:
            self._run()
        finally:
            for path in self.paths:
                self.sim.forget(path)
        return self.result

    def _problem(self, messages: list[str]) -> None:
        result = self.result
        result.mismatch_count += len(messages)
        room = max(MAX_MESSAGES - len(result.mismatches), 0)
        result.mismatches.extend(messages[:room])

    def _run(self) -> None:
        config, rng = self.config, self.rng
        initial = self._create_images()
        top = self.sim.disk(self.top_path)
        model = ImageModel(initial)
        with corefmt.open(self.top_path, config.format, read_only=True, backing=False) as probe:
            granularity = probe.limits.copy_granularity
        batches = generate(rng, config.size, config.operations, granularity)
        count = sum(len(batch) for batch in batches)
        plan = plan_faults(rng, self.result.seed, count, errors=config.errors,
                           crash_disk=self.top_path if config.crash else None)
        scheduler = BatchScheduler(random.Random(f"{self.result.seed}:{SCHEDULE_STREAM}"),
                                   reorder=config.delays)
        disks = [self.sim.disk(path) for path in self.paths]
        for disk in disks:
            disk.policy = plan
            disk.gate = scheduler.hold
        node = corefmt.open(self.top_path, config.format,
                            copy_on_read=config.copy_on_read and config.base is not None)
        try:
            self._workload(node, model, batches, plan, top, scheduler)
        finally:
            for disk in disks:
                disk.policy = None
                disk.gate = None
            self.result.errors_injected = sum(disk.errors_injected for disk in disks)
            if config.crash:
                top.power_cut(random.Random(plan.crash_seed))  # no-op if it already happened
            with contextlib.suppress(Exception):  # a dead disk may refuse the close
                node.close()
        if config.crash:
            self.result.crashed = True
            top.restore(top.crash_image or b"")
            self._verify_reopen(model, durable=True)
        else:
            self._verify_reopen(model, durable=False)

    def _create_images(self) -> bytes:
        config, rng = self.config, self.rng
        alignment = rng.choice(ALIGNMENTS)
        initial = bytes(config.size)
        below: tuple[str, str] | None = None  # (path, format) of the layer below
        for path, format in zip(self.base_paths, self.base_formats, strict=True):
            if below is None:
                corefmt.create(path, format, config.size)
            else:
                corefmt.create(path, format, config.size, backing=below[0],
                               backing_format=below[1])
            self.sim.disk(path).alignment = alignment
            initial = _fill_base(rng, path, format, config.size)
            below = (path, format)
        if below is not None:
            corefmt.create(self.top_path, config.format, config.size, options=config.options,
                           backing=below[0], backing_format=below[1])
        else:
            corefmt.create(self.top_path, config.format, config.size, options=config.options)
        for path in self.paths:
            disk = self.sim.disk(path)
            disk.sync()  # a finished create is durable; the test starts here
            disk.alignment = alignment
        return initial

    def _workload(self, node: BlockNode, model: ImageModel, batches: list[list[Op]],
                  plan: FaultPlan, top: SimDisk, scheduler: BatchScheduler) -> None:
        # One worker per request of a batch: the scheduler starts a batch only
        # once all of its requests have arrived.
        with RequestQueue(depth=MAX_BATCH, name="corefmt-stress") as queue:
            for batch in batches:
                scheduler.begin(op.tag for op in batch)
                futures = [queue.submit(_run_op, node, op, plan, top, scheduler)
                           for op in batch]
                self._await(futures, scheduler)
                outcomes = [future.result() for future in futures]
                self.result.operations += len(batch)
                self._problem(model.apply_batch(batch, outcomes))
                if top.dead:
                    return
        if not self.config.crash:
            self._problem(model.check_current(node.read(0, self.config.size),
                                              "after the workload"))
            node.flush()

    def _await(self, futures: list[concurrent.futures.Future[Outcome]],
               scheduler: BatchScheduler) -> None:
        """Wait for a batch; if no turn is handed over for a while, unstick it."""
        progress = scheduler.handovers
        while True:
            _, pending = concurrent.futures.wait(futures, timeout=STALL_SECONDS)
            if not pending:
                return
            if scheduler.handovers == progress and scheduler.stall():
                self.result.stalls += 1
            progress = scheduler.handovers

    def _verify_reopen(self, model: ImageModel, durable: bool) -> None:
        """Reopen the top image: it opens, holds what it must, checks clean, works."""
        what = "after the power cut" if durable else "after reopening"
        try:
            node = corefmt.open(self.top_path, self.config.format)
        except CorefmtError as error:
            self._problem([f"{what}: the image does not open: {error}"])
            return
        with node:
            content = node.read(0, self.config.size)
            checked = model.check_durable if durable else model.check_current
            self._problem(checked(content, what))
            self._check_image(node, what)
            self._probe_write(node, content, what)
        if durable and applies_to(self.config.format):
            # The reference implementation must agree the image is consistent.
            disk = self.sim.disk(self.top_path)
            with disk.lock:
                image_bytes = bytes(disk.current)
            problem = qemu_check(self.config.format, image_bytes)
            if problem:
                self.result.check_failures.append(f"{what}: {problem}")

    def _check_image(self, node: BlockNode, what: str) -> None:
        image = node.image
        if image is None or not has_capability(image, "check"):
            return
        found = image.check(False)  # type: ignore[attr-defined]
        if not found.clean:
            self.result.check_failures.append(
                f"{what}: check found {found.corruptions} corruptions, "
                f"{found.check_errors} errors: {'; '.join(found.messages[:3])}")

    def _probe_write(self, node: BlockNode, content: bytes, what: str) -> None:
        """Later requests must work: a write reads back, the rest is untouched."""
        length = self.rng.randint(1, min(PROBE_WRITE_MAX, self.config.size))
        offset = self.rng.randrange(0, self.config.size - length + 1)
        data = self.rng.randbytes(length)
        try:
            node.write(offset, data)
            node.flush()
            after = node.read(0, self.config.size)
        except CorefmtError as error:
            self._problem([f"{what}: a new write failed: {error}"])
            return
        expected = content[:offset] + data + content[offset + length:]
        if after != expected:
            self._problem([f"{what}: write {offset}+{length} did not read back exactly"])


def run_seed(config: StressConfig, seed: int) -> SeedResult:
    """Run one seed; never raises for what the image does (that is a mismatch)."""
    return _SeedRun(config, seed).run()


def run_seeds(config: StressConfig, seeds: Iterable[int],
              on_result: Callable[[SeedResult], None] | None = None) -> StressSummary:
    summary = StressSummary()
    for seed in seeds:
        result = run_seed(config, seed)
        summary.add(result)
        if on_result is not None:
            on_result(result)
    return summary

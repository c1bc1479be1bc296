"""Runs one seed: build images on simulated disks, race a workload, check.

A seed decides everything: the base content, the workload, the storage
alignment, which requests fail, where the power goes and, through the
batch scheduler, how the racing requests of each batch interleave and in
which order they complete. Running a seed again gives the same result.
Images are made and opened through ``corefmt.create``/``corefmt.open``, so
any installed format (and any format as the base of a chain) is tested
the same way.

Besides the workload, a seed fails or cuts the phases around it: one
create (of the image under test or of a lower layer, on a disk of its
own), the close, and the first reopen. What the checker can demand of
them: an interrupted create leaves an image that either opens, with the
size asked for (or, for a format whose image is its file, the file's
size) and the content of a new image (zeros, or its backing's), or is
refused with a one-line ``CorefmtError``; a create or open whose storage
failed a request fails itself; an open cut short changes nothing that a
later open sees. A close flushes: once it has succeeded, a power cut
keeps everything.

In a chain, prefetch races the guest's requests (``Prefetcher.copy_range``)
and some seeds run one whole-image prefetch to completion. Fills change
nothing the guest sees, so the model only judges their errors; a prefetch
that completed and had the driver record that the base is no longer
needed (FVD's all_data_in_fvd_img, written and flushed before it returns)
must hold after every later open, power cut or not: the image then opens
without its base, shows what the model allows and reports no backing.

On an image that stores data compressed, compressed writes race the rest
(judged as writes); on one with internal snapshots, lone snapshot creates
and deletes run between the batches, and after the reopen every snapshot
listed must be one the run allows, holding what it held when it was taken
(``corefmt.stress.snapshots``).

The power goes for the whole machine: every disk the seed uses loses its
unflushed writes at once. Only the image under test and its data files
are written; lower layers are opened read-only (copy-on-read fills the
top image), so for them a power cut must change nothing, which is checked.

``real_files`` runs the same workload and model on files (the ``file``
storage, buffered or O_DIRECT) with threads the OS schedules: the
concurrency part only, with no injected errors or power cuts, and a seed
replays the workload but not the interleaving.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable

import attrs

import corefmt
from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.block.queue import RequestQueue
from corefmt.capabilities import CheckFix, call_check
from corefmt.driver import supports
from corefmt.errors import CorefmtError, OptionError
from corefmt.fills import PrefetchTuning
from corefmt.flags import RequestFlags
from corefmt.ops.prefetch import Prefetcher
from corefmt.ops.snapshot import (
    SnapshotRef,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    load_snapshot,
)
from corefmt.storage.simulated import SimDisk, SimStorageDriver, request_tag
from corefmt.stress.defaults import DEFAULT_OPERATIONS, DEFAULT_SIZE
from corefmt.stress.faults import (
    CREATE_STREAM,
    CREATE_TAG,
    FaultPlan,
    plan_create,
    plan_faults,
    plan_reopen,
)
from corefmt.stress.model import MAX_MESSAGES, ImageModel, Outcome
from corefmt.stress.qemu_check import applies_to, qemu_check
from corefmt.stress.report import StressSummary
from corefmt.stress.scheduler import STALL_SECONDS, BatchScheduler
from corefmt.stress.snapshots import SnapshotBook, harmless_copied_flags, takes_snapshots
from corefmt.stress.workload import (
    COMPRESSED,
    DISCARD,
    FLUSH,
    MAX_BATCH,
    PREFETCH,
    PREFETCH_ALL,
    READ,
    SECTOR_SIZE,
    SNAPSHOT_CREATE,
    SNAPSHOT_DELETE,
    SNAPSHOT_KINDS,
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
#: Kinds a power cut in the flush after them tests (see plan_faults).
NEW_KINDS = frozenset({COMPRESSED, *SNAPSHOT_KINDS})
#: Names the scheduler's random stream, apart from the workload's (same seed).
SCHEDULE_STREAM = "schedule"
#: The tag of the whole-image read after the workload (never planned to fail).
CHECK_TAG = -3
#: How long a batch on real files may take before the run calls it a hang.
REAL_BATCH_SECONDS = 120.0
#: Copy-on-read in chains waits for its fills (sync): asynchronous fills
#: (FVD's own mode) run on a thread the batch scheduler cannot see.
COPY_ON_READ_MODE = "sync"
#: Prefetch in the request's own thread: one slot starts no reader thread,
#: and without throttling it never sleeps, so the scheduler sees every wait.
PREFETCH_TUNING = PrefetchTuning(slots=1)


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
    #: In chains, prefetch ops race the workload (and some seeds prefetch it all).
    prefetch: bool = True
    #: Racing requests complete in a seed-chosen order (else in the order issued).
    delays: bool = True
    #: ``-o`` create options of the image under test (not of the base).
    options: str = ""
    #: Run on real files (no faults, OS-scheduled threads) instead of ``sim:``.
    real_files: bool = False
    #: With ``real_files``: open the images with O_DIRECT.
    direct: bool = False
    #: Compressed writes join the workload where the image can store them.
    compressed: bool = True
    #: Lone snapshot creates and deletes, where the image has internal snapshots.
    snapshots: bool = True
    #: The chain's bottom layer is this existing read-only image (an
    #: ``http(s)://`` or ``s3://`` name; its format is ``base``'s first):
    #: it is read, never created, filled or faulted.
    remote_base: str | None = None


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
    #: Whole-image prefetches that ran to completion (0 or 1).
    prefetches_completed: int = 0
    #: A completed prefetch had the driver record that the base is no longer
    #: needed (then checked after the reopen).
    self_contained: bool = False
    #: Compressed writes that succeeded, and those of them stored in two phases.
    compressed_writes: int = 0
    two_phase_writes: int = 0
    #: Snapshot creates and deletes that succeeded, and those that failed.
    snapshots_created: int = 0
    snapshots_deleted: int = 0
    snapshot_ops_failed: int = 0
    #: Snapshots read back after the reopen and compared with the model.
    snapshots_verified: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatch_count and not self.check_failures


def _flushes_after(ops: list[Op], kinds: frozenset[str]) -> list[int]:
    """The tags of the first flush after each op of these kinds (in tag
    order): it writes back what they left in the caches."""
    tags: list[int] = []
    pending = False
    for op in sorted(ops, key=lambda op: op.tag):
        pending |= op.kind in kinds
        if op.kind == FLUSH and pending:
            tags.append(op.tag)
            pending = False
    return tags


def _sim_driver() -> SimStorageDriver:
    driver = plugins.registry().storages.get("sim")
    if not isinstance(driver, SimStorageDriver):
        raise CorefmtError("the simulated storage driver 'sim' is not installed")
    return driver


def _run_op(node: BlockNode, op: Op, injected: Callable[[int, bool], bool],
            scheduler: BatchScheduler | None) -> Outcome:
    """Run one request on a queue worker, in the scheduler's turns; report, never raise."""
    if scheduler is None:
        return _outcome(node, op, injected)
    with scheduler.task(op.tag):  # the outcome is judged in turn too
        return _outcome(node, op, injected)


def _prefetcher(node: BlockNode) -> Prefetcher:
    return Prefetcher(node, PREFETCH_TUNING, throttle=False)


def _snapshot_of(node: BlockNode, op: Op) -> str | None:
    """The name of the snapshot a snapshot op creates, or of the one it
    deletes: one of those the image lists now, as the op picked (None:
    there is none). Names are unique in a run."""
    if op.kind == SNAPSHOT_CREATE:
        return op.snapshot_name
    listed = list_snapshots(node)
    return listed[op.pick % len(listed)].name if listed else None


def _write_compressed(node: BlockNode, op: Op) -> None:
    assert op.data is not None
    if op.two_phase:  # as convert -c: prepare (compress) now, store after
        node.prepare_write(op.offset, op.data, RequestFlags.COMPRESSED)()
    else:
        node.write(op.offset, op.data, RequestFlags.COMPRESSED)


def _perform(node: BlockNode, op: Op, name: str | None) -> tuple[bytes | None, bool]:
    """Run one request: (what a read returned, whether a prefetch completed
    and was recorded)."""
    if op.kind == READ:
        return node.read(op.offset, op.length), False
    if op.kind == WRITE:
        assert op.data is not None
        node.write(op.offset, op.data)
    elif op.kind == COMPRESSED:
        _write_compressed(node, op)
    elif op.kind == ZERO:
        node.write_zeroes(op.offset, op.length)
    elif op.kind == DISCARD:
        node.discard(op.offset, op.length)
    elif op.kind == FLUSH:
        node.flush()
    elif op.kind == PREFETCH:
        _prefetcher(node).copy_range(op.offset, op.length)
    elif op.kind == PREFETCH_ALL:
        return None, _prefetcher(node).run().self_contained
    elif op.kind == SNAPSHOT_CREATE:
        create_snapshot(node, op.snapshot_name)
    elif op.kind == SNAPSHOT_DELETE and name is not None:
        delete_snapshot(node, name)
    return None, False


def _outcome(node: BlockNode, op: Op, injected: Callable[[int, bool], bool]) -> Outcome:
    name: str | None = None
    try:
        name = _snapshot_of(node, op) if op.kind in SNAPSHOT_KINDS else None
        with request_tag(op.tag):
            data, contained = _perform(node, op, name)
    except Exception as error:  # every failure is judged by the model
        return Outcome(False, _describe(error), injected=injected(op.tag, True),
                       snapshot=name)
    return Outcome(True, data=data, injected=injected(op.tag, False),
                   self_contained=contained, snapshot=name)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def base_formats(config: StressConfig) -> list[str]:
    """The formats of the chain below the image under test, bottom first."""
    return [name.strip() for name in config.base.split(",")] if config.base else []


def _fill_base(rng: random.Random, path: str, format: str, size: int, direct: bool) -> bytes:
    """Random data in a few extents of a base layer; returns what the chain
    down from it holds (each layer of a deeper chain adds its own extents)."""
    with corefmt.open(path, format, direct=direct) as base:
        content = bytearray(base.read(0, size))
        for _ in range(BASE_EXTENTS):
            length = rng.randint(1, min(BASE_EXTENT_MAX, size))
            offset = rng.randrange(0, size - length + 1)
            data = rng.randbytes(length)
            base.write(offset, data)
            content[offset:offset + length] = data
        base.flush()
    return bytes(content)


def _read_remote(path: str, format: str, size: int) -> bytes:
    """What the remote base shows in the first ``size`` bytes (zeros past its end)."""
    with corefmt.open(path, format, read_only=True) as base:
        return base.read(0, min(size, base.virtual_size)).ljust(size, b"\0")


def _unused_directory(sim: SimStorageDriver, prefix: str) -> str:
    """``prefix/``, unless another run uses it now: names show up in messages,
    so they must not change from one replay to the next. A seed's disks are
    the ones in its directory, so are the data files its images name
    relative to themselves."""
    for number in itertools.count(1):
        candidate = f"{prefix}/" if number == 1 else f"{prefix}.{number}/"
        if not sim.names(candidate):
            return candidate
    raise AssertionError("unreachable")


class _SeedRun:
    """The state of one seed's run (images, model, plan, result)."""

    def __init__(self, config: StressConfig, seed: int):
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.result = SeedResult(seed)
        self.sim = _sim_driver()
        self.folder: str | None = None
        if config.real_files:
            self.folder = tempfile.mkdtemp(prefix=f"corefmt-stress-{seed}-")
            self.directory = self.folder + os.sep
        else:
            self.directory = _unused_directory(self.sim, f"sim:stress-{seed}")
        self.prefix = f"{self.directory}stress-{seed}"
        self.top_path = f"{self.prefix}-top"
        self.base_formats = base_formats(config)
        self.base_paths = [f"{self.prefix}-base{depth}"
                           for depth in range(len(self.base_formats))]
        if config.remote_base is not None:
            self.base_paths[0] = config.remote_base
        #: What each lower layer's disk held when the workload started.
        self.lower_content: dict[str, bytes] = {}
        self.prefetching = config.prefetch and bool(self.base_formats)
        #: The run's snapshots (None: the image under test takes none).
        self.book: SnapshotBook | None = None
        #: A snapshot operation failed or lost power: checks allow the COPIED
        #: flags it may leave behind (see harmless_copied_flags).
        self.snapshot_interrupted = False

    # -- disks ------------------------------------------------------------------------
    def _disks(self) -> list[SimDisk]:
        """Every simulated disk of this seed (images, their data files)."""
        if self.config.real_files:
            return []
        return [self.sim.disk(name) for name in self.sim.names(self.directory)]

    def _injected(self, tag: int, failed: bool) -> bool:
        """Whether the storage failed a request of ``tag`` on purpose (or lost power)."""
        disks = self._disks()
        if any(tag in disk.injected_tags for disk in disks):
            return True
        return failed and any(disk.dead for disk in disks)

    def _open(self, path: str, format: str, **options: bool | str) -> BlockNode:
        return corefmt.open(path, format, direct=self.config.direct,
                            allow_protocols=self.allowed, **options)

    @property
    def allowed(self) -> list[str]:
        """The remote base's protocol, which the layers above name."""
        remote = self.config.remote_base
        return [remote.split("://", 1)[0]] if remote else []

    # -- the run ----------------------------------------------------------------------
    def run(self) -> SeedResult:
        try:
            self._run()
        except Exception as error:  # anything the code under test raises is a failure
            self.result.check_failures.append(f"the run stopped: {_describe(error)}")
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                disks = self._disks()  # errors of the phases after the workload count too
                self.result.errors_injected = sum(disk.errors_injected for disk in disks)
                for disk in disks:
                    self.sim.forget(disk.name)
        return self.result

    def _problem(self, messages: list[str]) -> None:
        result = self.result
        result.mismatch_count += len(messages)
        room = max(MAX_MESSAGES - len(result.mismatches), 0)
        result.mismatches.extend(messages[:room])

    def _failure(self, message: str) -> None:
        self.result.check_failures.append(message)

    def _run(self) -> None:
        config, rng = self.config, self.rng
        initial, contents = self._create_images()
        model = ImageModel(initial)
        with self._open(self.top_path, config.format, read_only=True, backing=False) as probe:
            granularity = probe.limits.copy_granularity
            image = getattr(probe.layer(), "image", None)
            compressing = config.compressed and supports(image, "write_compressed")
            if config.snapshots and takes_snapshots(image):
                self.book = SnapshotBook()
        batches = generate(rng, config.size, config.operations, granularity,
                           prefetch=self.prefetching, compressed=compressing,
                           snapshots=self.book is not None)
        count = sum(len(batch) for batch in batches)
        ops = [op for batch in batches for op in batch]
        prefetch_tag = next((op.tag for op in ops if op.kind == PREFETCH_ALL), None)
        plan = plan_faults(rng, self.seed, count, errors=config.errors,
                           crash_disk=self.top_path if config.crash else None,
                           prefetch_tag=prefetch_tag,
                           snapshot_tags=[op.tag for op in ops if op.kind in SNAPSHOT_KINDS],
                           flush_tags=_flushes_after(ops, NEW_KINDS))
        self._interrupted_create(contents)
        disks = self._disks()
        plan.machine = disks
        scheduler = None
        if not config.real_files:
            scheduler = BatchScheduler(random.Random(f"{self.seed}:{SCHEDULE_STREAM}"),
                                       reorder=config.delays)
        for disk in disks:
            disk.policy = plan
            disk.gate = scheduler.hold if scheduler is not None else None
        cor = config.copy_on_read and config.base is not None
        node = self._open(self.top_path, config.format, copy_on_read=cor and COPY_ON_READ_MODE)
        try:
            self._workload(node, model, batches, scheduler)
        finally:
            for disk in disks:
                disk.gate = None
            if config.crash and plan.crash_tag != count:
                plan.cut_machine()  # the power goes before the close
            closed = self._close(node, model, count)
            for disk in disks:
                disk.policy = None
        if config.crash:
            plan.cut_machine()  # no-op if it already happened
            self.result.crashed = True
            self._check_lower_layers(crashed=True)
            for disk in disks:
                disk.restore(disk.crash_image or b"")
        else:
            self._check_lower_layers(crashed=False)
        # A close that failed made nothing durable for sure: what it did not
        # flush may be gone, as after a power cut (a failed fsync may drop it).
        self._verify_reopen(model, durable=config.crash or not closed, tag=count + 1)

    def _create_images(self) -> tuple[bytes, list[bytes]]:
        """Create the chain; returns what the top image shows and what the
        chain down from each lower layer holds."""
        config, rng = self.config, self.rng
        alignment = rng.choice(ALIGNMENTS)
        initial = bytes(config.size)
        contents: list[bytes] = []
        below: tuple[str, str] | None = None  # (path, format) of the layer below
        for path, format in zip(self.base_paths, self.base_formats, strict=True):
            if path == config.remote_base:
                initial = _read_remote(path, format, config.size)
                contents.append(initial)
                below = (path, format)
                continue
            if below is None:
                corefmt.create(path, format, config.size)
            else:
                corefmt.create(path, format, config.size, backing=below[0],
                               backing_format=below[1])
            if not config.real_files:
                self.sim.disk(path).alignment = alignment
            initial = _fill_base(rng, path, format, config.size, config.direct)
            contents.append(initial)
            below = (path, format)
        if below is not None:
            corefmt.create(self.top_path, config.format, config.size, options=config.options,
                           backing=below[0], backing_format=below[1])
        else:
            corefmt.create(self.top_path, config.format, config.size, options=config.options)
        for disk in self._disks():
            disk.sync()  # a finished create is durable; the test starts here
            disk.alignment = alignment
        for path in self.base_paths:
            if not config.real_files and path != config.remote_base:
                self.lower_content[path] = bytes(self.sim.disk(path).current)
        return initial, contents

    def _workload(self, node: BlockNode, model: ImageModel, batches: list[list[Op]],
                  scheduler: BatchScheduler | None) -> None:
        # One worker per request of a batch: the scheduler starts a batch only
        # once all of its requests have arrived.
        with RequestQueue(depth=MAX_BATCH, name="corefmt-stress") as queue:
            for batch in batches:
                if scheduler is not None:
                    scheduler.begin(op.tag for op in batch)
                futures = [queue.submit(_run_op, node, op, self._injected, scheduler)
                           for op in batch]
                self._await(futures, scheduler)
                outcomes = [future.result() for future in futures]
                self.result.operations += len(batch)
                self._problem(model.apply_batch(batch, outcomes))
                self._note_prefetch(node, batch, outcomes)
                self._note_new_kinds(node, model, batch, outcomes)
                if any(disk.dead for disk in self._disks()):
                    return
        if self.config.crash:
            return
        try:
            with request_tag(CHECK_TAG):  # copy-on-read may write, and so fail
                content = node.read(0, self.config.size)
        except CorefmtError as error:
            if not self._injected(CHECK_TAG, True):
                self._problem([f"after the workload: reading the image failed: {error}"])
            return
        self._problem(model.check_current(content, "after the workload"))

    def _note_prefetch(self, node: BlockNode, batch: list[Op], outcomes: list[Outcome]
                       ) -> None:
        """Count a completed whole-image prefetch; a driver that can record
        that its base is no longer needed must have done so (nothing raced it)."""
        for op, outcome in zip(batch, outcomes, strict=True):
            if op.kind != PREFETCH_ALL or not outcome.ok:
                continue
            self.result.prefetches_completed += 1
            self.result.self_contained = outcome.self_contained
            image = getattr(node.layer(), "image", None)
            if not outcome.self_contained and supports(image, "mark_self_contained"):
                self._failure(f"{op.describe()}: the prefetch finished, but the image "
                              "did not record that its base is no longer needed")

    def _note_new_kinds(self, node: BlockNode, model: ImageModel, batch: list[Op],
                        outcomes: list[Outcome]) -> None:
        """Count compressed writes and snapshot operations; the book learns
        what a snapshot operation did (the image's list after it, if alive)."""
        result = self.result
        for op, outcome in zip(batch, outcomes, strict=True):
            if op.kind == COMPRESSED and outcome.ok:
                result.compressed_writes += 1
                result.two_phase_writes += int(op.two_phase)
            if op.kind not in SNAPSHOT_KINDS or self.book is None:
                continue
            if outcome.snapshot is not None:
                result.snapshot_ops_failed += int(not outcome.ok)
                self.snapshot_interrupted |= not outcome.ok
                done = outcome.ok and op.kind == SNAPSHOT_CREATE
                result.snapshots_created += int(done)
                result.snapshots_deleted += int(outcome.ok and not done)
            alive = not any(disk.dead for disk in self._disks())
            listed = [info.name for info in list_snapshots(node)] if alive else None
            self._problem(self.book.apply(op, outcome, model.current, listed))

    def _await(self, futures: list[concurrent.futures.Future[Outcome]],
               scheduler: BatchScheduler | None) -> None:
        """Wait for a batch; if no turn is handed over for a while, unstick it."""
        if scheduler is None:
            _, pending = concurrent.futures.wait(futures, timeout=REAL_BATCH_SECONDS)
            if pending:
                raise CorefmtError(f"a batch did not finish in {REAL_BATCH_SECONDS:.0f} s")
            return
        progress = scheduler.handovers
        while True:
            _, pending = concurrent.futures.wait(futures, timeout=STALL_SECONDS)
            if not pending:
                return
            if scheduler.handovers == progress and scheduler.stall():
                self.result.stalls += 1
            progress = scheduler.handovers

    def _close(self, node: BlockNode, model: ImageModel, tag: int) -> bool:
        """Close under the fault plan: a close writes (metadata, dirty flags) and
        flushes, so once it succeeds a power cut must keep everything. False
        when it failed."""
        try:
            with request_tag(tag):
                node.close()
        except Exception as error:
            if not self._injected(tag, True):
                self._problem([f"closing the image failed without an injected error: "
                               f"{_describe(error)}"])
            return False
        if not any(disk.dead for disk in self._disks()):
            model.flushed()
        return True

    def _check_lower_layers(self, crashed: bool) -> None:
        """Lower layers are read-only: nothing may change them, power or not."""
        for path, before in self.lower_content.items():
            disk = self.sim.disk(path)
            after = disk.crash_image if crashed else disk.current
            if after is not None and bytes(after) != before:
                self._failure(f"the lower layer {path} changed although it is read-only")

    # -- interrupted create -------------------------------------------------------------
    def _interrupted_create(self, contents: list[bytes]) -> None:
        """Fail or cut one create (of a seed-chosen layer) and judge what it left."""
        config = self.config
        if config.real_files or not (config.crash or config.errors):
            return
        layers = [*self.base_formats, config.format]
        depth = random.Random(f"{self.seed}:{CREATE_STREAM}:layer").randrange(len(layers))
        format = layers[depth]
        options = config.options if depth == len(layers) - 1 else ""
        backing = {"backing": self.base_paths[depth - 1],
                   "backing_format": layers[depth - 1]} if depth else {}
        expected = contents[depth - 1] if depth else bytes(config.size)
        # In a directory of its own: data files it names must not be the workload's.
        folder = f"{self.directory}create/"
        path = f"{folder}stress-{self.seed}-create"
        what = f"after an interrupted create of {format}"
        counted: list[int] = []
        self.sim.create(path)
        disk = self.sim.disk(path)
        disk.policy = lambda request: counted.append(1) if request.tag == CREATE_TAG else None
        with request_tag(CREATE_TAG):
            corefmt.create(path, format, config.size, options=options, **backing)
        plan = plan_create(self.seed, len(counted), path, cut=config.crash,
                           error=config.errors)
        plan.machine = [disk]
        disk.policy = plan
        created = False
        try:
            with request_tag(CREATE_TAG):
                corefmt.create(path, format, config.size, options=options, **backing)
            created = True
        except CorefmtError:
            pass
        except Exception as error:
            self._failure(f"{what}: create raised {_describe(error)}, not a clear error")
            return
        finally:
            disk.policy = None
        if created and CREATE_TAG in disk.injected_tags:
            self._failure(f"{what}: create succeeded although the storage failed it")
        if disk.dead:
            disk.restore(disk.crash_image or b"")
        self._judge_created(path, format, expected, what)
        for name in self.sim.names(folder):  # with its data files
            self.sim.forget(name)

    def _judge_created(self, path: str, format: str, expected: bytes, what: str) -> None:
        try:
            node = corefmt.open(path, format, allow_protocols=self.allowed)
        except CorefmtError as error:
            if "\n" in str(error):
                self._failure(f"{what}: the refusal is not one line: {error!r}")
            return  # refused clearly: fine
        except Exception as error:
            self._failure(f"{what}: open raised {_describe(error)}, not a clear error")
            return
        try:
            with node:
                size = node.virtual_size
                storage_size = node.layer().storage.size()  # type: ignore[attr-defined]
                if size not in (self.config.size, storage_size):
                    self._failure(f"{what}: it opens with virtual size {size}, "
                                  f"not {self.config.size}")
                    return
                shown = node.read(0, min(size, self.config.size))
                if shown != expected[:len(shown)]:
                    self._failure(f"{what}: it opens and shows data a new image does not have")
                self._check_image(node, what)
        except Exception as error:
            self._failure(f"{what}: {_describe(error)}")

    # -- reopening ----------------------------------------------------------------------
    def _faulted_open(self, plan: FaultPlan, tag: int, what: str) -> None:
        """An open that fails or loses power at one of its first requests:
        it must fail, and (judged by the open after it) change nothing."""
        disks = self._disks()
        plan.machine = disks
        for disk in disks:
            disk.policy = plan
        node: BlockNode | None = None
        try:
            with request_tag(tag):
                node = self._open(self.top_path, self.config.format)
        except CorefmtError:
            pass
        except Exception as error:
            self._failure(f"{what}: an interrupted open raised {_describe(error)}, "
                          "not a clear error")
        finally:
            for disk in disks:
                disk.policy = None
        if node is not None:
            if self._injected(tag, False) or any(disk.dead for disk in disks):
                self._failure(f"{what}: the image opened although the storage failed "
                              "one of the open's requests")
            with contextlib.suppress(Exception):
                node.close()
        for disk in disks:
            if disk.dead:
                disk.restore(disk.crash_image or b"")

    def _verify_reopen(self, model: ImageModel, durable: bool, tag: int) -> None:
        """Reopen the top image: it opens, holds what it must, checks clean, works."""
        what = ("after the power cut" if self.config.crash else
                "after a failed close, reopening" if durable else "after reopening")
        if not self.config.real_files:
            plan = plan_reopen(self.seed, tag, self.top_path, cut=self.config.crash,
                               error=self.config.errors)
            if plan is not None:
                self._faulted_open(plan, tag, f"{what}, then a faulted open")
        if self.result.self_contained:
            self._verify_without_base(model, durable, what)
        try:
            node = self._open(self.top_path, self.config.format)
        except CorefmtError as error:
            self._problem([f"{what}: the image does not open: {error}"])
            return
        except Exception as error:
            self._failure(f"{what}: opening raised {_describe(error)}")
            return
        try:
            with node:
                self._verify_node(node, model, durable, what)
        except Exception as error:  # a driver error is this seed's failure, not the run's
            self._failure(f"{what}: {_describe(error)}")
        if durable and applies_to(self.config.format):
            # The reference implementation must agree the image is consistent.
            disk = self.sim.disk(self.top_path)
            with disk.lock:
                image_bytes = bytes(disk.current)
            problem = qemu_check(self.config.format, image_bytes,
                                 copied_flags=self.snapshot_interrupted)
            if problem:
                self._failure(f"{what}: {problem}")
        self._verify_snapshots(what)

    def _verify_snapshots(self, what: str) -> None:
        """The snapshots the reopened image lists are those the run allows,
        each holding what it held when it was taken (where it can be loaded)."""
        if self.book is None:
            return
        try:
            with self._open(self.top_path, self.config.format, read_only=True) as node:
                listed = list_snapshots(node)
                loadable = supports(getattr(node.layer(), "image", None), "snapshot_load")
            self._problem(self.book.check_listed([info.name for info in listed], what))
            for info in listed:
                if loadable and info.name in self.book.records:
                    self._problem(self.book.check_content(
                        info.name, self._snapshot_content(info.id), what))
                    self.result.snapshots_verified += 1
        except CorefmtError as error:
            self._problem([f"{what}: reading the snapshots failed: {error}"])
        except Exception as error:
            self._failure(f"{what}: reading the snapshots raised {_describe(error)}")

    def _snapshot_content(self, ident: str) -> bytes:
        """A snapshot's guest content, loaded read-only (as convert -l reads it)."""
        with self._open(self.top_path, self.config.format, read_only=True) as node:
            load_snapshot(node, SnapshotRef(id=ident))
            return node.read(0, self.config.size)

    def _verify_without_base(self, model: ImageModel, durable: bool, what: str) -> None:
        """After a recorded prefetch completion the base is not needed: the
        image opened without it shows what the model allows."""
        what = f"{what}, opened without its base after the prefetch completed"
        try:
            with self._open(self.top_path, self.config.format, read_only=True,
                            backing=False) as node:
                content = node.read(0, model.size)
        except CorefmtError as error:
            self._problem([f"{what}: {error}"])
            return
        except Exception as error:
            self._failure(f"{what}: {_describe(error)}")
            return
        checked = model.check_durable if durable else model.check_current
        self._problem(checked(content, what))

    def _verify_node(self, node: BlockNode, model: ImageModel, durable: bool,
                     what: str) -> None:
        size = node.virtual_size
        if size != model.size:
            self._problem([f"{what}: the virtual size is {size} bytes, expected {model.size}"])
            return
        content = node.read(0, model.size)
        checked = model.check_durable if durable else model.check_current
        self._problem(checked(content, what))
        if self.result.self_contained and node.layer().backing is not None:
            self._failure(f"{what}: the prefetch completed and was recorded, "
                          "but the image still opens its base")
        self._check_image(node, what)
        self._probe_write(node, content, what)

    def _check_image(self, node: BlockNode, what: str) -> None:
        image = getattr(node.layer(), "image", None)
        if image is None or not supports(image, "check"):
            return
        found = call_check(image, CheckFix.NONE)
        if (self.snapshot_interrupted and not found.check_errors and found.corruptions
                == harmless_copied_flags(found.messages, image.cluster_size)):
            return
        if not found.clean:
            self._failure(
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


def check_config(config: StressConfig) -> None:
    """Refuse combinations the runner cannot honour."""
    if config.real_files and (config.crash or config.errors):
        raise OptionError("--real-files runs the concurrency part only: "
                          "no --crash or --errors (they need simulated storage)")
    if config.direct and not config.real_files:
        raise OptionError("--direct applies to --real-files")
    if config.remote_base is not None and not config.base:
        raise OptionError("--remote-base needs --base naming its format (e.g. --base qcow2)")


def run_seed(config: StressConfig, seed: int) -> SeedResult:
    """Run one seed; never raises for what the image does (that is a mismatch)."""
    check_config(config)
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

"""FVD under blkdebug: the power going, or an I/O error, at each named event
of the driver (corefmt_fvd.events), at its first, second, middle and last
occurrences: inside the journal's recycling (a 4 KiB journal fills after
eight commits) and inside the close-time flush (the last table, bitmap,
barrier and header updates come from the close).

Power cuts happen on simulated disks (``sim:``), the image's and its data
file's at once: at the event (before the request after it) and before each
of the next few requests, so a cut also falls between two writes of an
update and the flush after them. The writes a disk had not flushed survive
or not, sector by sector, as a seed picks, so a missing barrier between two
ordered writes shows. Blkdebug's set-state rules count the event's
occurrences; the cut is the simulated disks' own. The base holds random
data with no zero sector: a sector reading zeros where the base's bytes
belong is caught. After the cut every flushed write is intact (and every
other sector holds one of the states it went through) on a read-only open,
which must replay the journal, then on a read-write open; ``corefmt check``
then finds no corruption (leaked chunks are allowed, as after any crash).
An I/O error fails its request (or the close) with a one-line CorefmtError,
and the image stays consistent the same way."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from corefmt_fvd import events

import corefmt
from corefmt import CorefmtError, plugins
from corefmt.cli.main import main
from corefmt.fills import PrefetchTuning
from corefmt.filters.blkdebug import BlkdebugStorage
from corefmt.ops.prefetch import Prefetcher
from corefmt.storage.simulated import SimDisk, SimFault, SimRequest
from tests.fvd.helpers import random_base

KiB, MiB = 1024, 1024 * 1024
SECTOR = 512
SIZE = MiB
EVENTS = events.ALL
#: Compact and not, over a base; each with a journal small enough to recycle.
OPTION_SETS = {
    "blocks-4k": "block_size=4096,journal_size=4096",
    "compact-64k-blocks": "compact_image=on,chunk_size=4096,journal_size=4096,"
                          "storage_grow_unit=65536",
    "compact-7680": "compact_image=on,chunk_size=8192,block_size=7680,journal_size=4096,"
                    "storage_grow_unit=65536",
    # Data in a file of its own: the journal's and the table's flushes do not
    # make it durable, only the data barrier does.
    "compact-data-file": "compact_image=on,chunk_size=4096,journal_size=4096,"
                         "storage_grow_unit=65536,data_file=fvd.data",
}
#: Which unflushed writes survive a power cut: a seed's random choice per
#: sector, or in order, the earlier ones lost (the newest write alone, or the
#: later half of them), which shows a flush missing between ordered writes.
SURVIVORS: tuple[int | str, ...] = (0, 1, "newest", "later-half")
#: The power goes before the k-th request after the event (0: at the event).
CUT_AFTER = (0, 1, 2, 3)
ROUNDS = 14
#: Writes and the rounds' reads stay below this; the close's fills above.
WORKLOAD_END = SIZE * 3 // 4
_names = itertools.count()


def _random_base(path: Path) -> bytes:
    return random_base(path, SIZE, 7)


@pytest.fixture
def sim_path() -> Iterator[Callable[[], str]]:
    sim = plugins.registry().storages["sim"]
    folder = f"sim:fvd-blkdebug-{next(_names)}/"
    numbers = itertools.count()

    def make() -> str:  # a directory each: the data file lands next to its image
        return f"{folder}{next(numbers)}/image"
    yield make
    for name in sim.names(folder):
        sim.forget(name)


def _disk(path: str) -> SimDisk:
    return plugins.registry().storages["sim"].disk(path)


def _machine(path: str) -> list[SimDisk]:
    """The image's disk and its data file's."""
    sim = plugins.registry().storages["sim"]
    return [sim.disk(name) for name in sim.names(path.rsplit("/", 1)[0] + "/")]


def _nth_occurrence(event: str, occurrence: int, action: str) -> dict:
    """blkdebug rules that act at the ``occurrence``-th ``event`` (1-based):
    the state counts the event's occurrences up to it (and stays past it)."""
    rules: dict = {"set-state": [{"event": event, "state": state, "new_state": state + 1}
                                 for state in range(1, occurrence + 1)]}
    if action == "error":
        rules["inject-error"] = [{"event": event, "state": occurrence, "errno": 5,
                                  "once": True}]
    return rules


def _lose_power(disk: SimDisk, survivors: int | str) -> None:
    """The disk loses power; its unflushed writes survive as ``survivors`` says."""
    if isinstance(survivors, int):
        disk.power_cut(random.Random(f"{survivors}:{disk.name}"))
        return
    with disk.lock:
        cache = list(disk.cache)
        image = bytearray(disk.durable)
    for op in cache[-1:] if survivors == "newest" else cache[len(cache) // 2:]:
        if op.data is not None:  # its sectors' state just after it
            end = op.offset + len(op.data)
            image.extend(bytes(max(0, end - len(image))))
            image[op.offset:end] = op.data
        del image[op.size_after:]
        image.extend(bytes(op.size_after - len(image)))
    disk.power_cut(random.Random(0))
    disk.crash_image = image


class PowerCut:
    """A fault policy for every disk of the machine: once blkdebug has seen
    the event's occurrence, the power goes before the ``after``-th request."""

    def __init__(self, machine: list[SimDisk], occurrence: int, after: int,
                 survivors: int | str):
        self.machine, self.state, self.after = machine, occurrence + 1, after
        self.survivors = survivors
        self.blkdebug: BlkdebugStorage | None = None
        self.seen = 0
        self.cut = False

    def __call__(self, request: SimRequest) -> SimFault | None:
        if self.cut or self.blkdebug is None or self.blkdebug.state != self.state:
            return None
        self.seen += 1
        if self.seen <= self.after:
            return None
        self.cut = True
        for disk in self.machine:
            _lose_power(disk, self.survivors)
        return SimFault(power_cut=0)  # the disk is dead already: its image stays


def _spec(path: str, rules: dict) -> dict:
    return {"driver": "fvd",
            "file": {"driver": "blkdebug", **rules,
                     "image": {"driver": "file", "filename": path}}}


class Model:
    """Per sector: what a read may return now, and after a power cut."""

    def __init__(self, base: bytes):
        sectors = [base[at:at + SECTOR] for at in range(0, len(base), SECTOR)]
        self.current: list[set[bytes]] = [{value} for value in sectors]
        self.durable: list[set[bytes]] = [{value} for value in sectors]

    def write(self, offset: int, data: bytes, ok: bool) -> None:
        for sector in range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)):
            start = sector * SECTOR
            lo, hi = max(offset, start), min(offset + len(data), start + SECTOR)
            new = {value[:lo - start] + data[lo - offset:hi - offset] + value[hi - start:]
                   for value in self.current[sector]}
            self.current[sector] = new if ok else self.current[sector] | new
            self.durable[sector] |= new

    def flushed(self) -> None:
        self.durable = [set(values) for values in self.current]

    def check(self, content: bytes, allowed: list[set[bytes]], what: str) -> None:
        bad = [sector for sector, values in enumerate(allowed)
               if content[sector * SECTOR:(sector + 1) * SECTOR] not in values]
        zeros = [sector for sector in bad if not any(content[sector * SECTOR:
                                                             (sector + 1) * SECTOR])]
        assert not bad, (f"{what}: {len(bad)} sectors hold no allowed state (first "
                         f"{bad[:8]}; reading zeros: {zeros[:8]})")


def _write(node, model: Model, offset: int, data: bytes) -> None:
    """A guest write, and what the model may expect of it."""
    try:
        node.write(offset, data)
    except CorefmtError:
        model.write(offset, data, ok=False)
        raise
    model.write(offset, data, ok=True)


def _workload(node, model: Model, rng: random.Random) -> None:
    """Partial-block writes (copy-on-write from the base), copy-on-read fills
    and a flush per round: enough commits to recycle the journal twice; then
    a fill of the last quarter, untouched so far, so that the close writes
    blocks only a fill put in the image (their chunks in no record); then a
    prefetch to the end (its completion writes the header) and writes after it."""
    for _ in range(ROUNDS):
        for _ in range(3):
            length = rng.randrange(1, 12) * SECTOR - rng.choice((0, 0, 100))
            offset = rng.randrange(0, WORKLOAD_END - length)
            _write(node, model, offset, rng.randbytes(length))
        start = rng.randrange(0, WORKLOAD_END - 64 * KiB)
        node.read(start, rng.randrange(1, 64 * KiB))  # copy-on-read fills
        node.flush()
        model.flushed()
    node.read(SIZE - 128 * KiB, 128 * KiB)
    # FVD's pipeline: a reader thread keeps a piece ahead of the store
    Prefetcher(node, PrefetchTuning(slots=2, bytes_per_prefetch=64 * KiB), throttle=False).run()
    for _ in range(2):
        offset = rng.randrange(0, SIZE - 8 * KiB)
        _write(node, model, offset, rng.randbytes(rng.randrange(1, 8 * KiB)))
    node.flush()
    model.flushed()


def _run(base: Path, path: str, options: str, rules: dict | None,
         cut: PowerCut | None = None) -> tuple[Model, CorefmtError | None, dict]:
    """Create the image, run the workload under ``rules`` (and ``cut``) up to
    its first error, close; returns the model, the error and the events seen."""
    corefmt.create(path, "fvd", SIZE, options=options, backing=str(base),
                   backing_format="raw")
    machine = _machine(path)
    for disk in machine:
        disk.sync()
    model = Model(base.read_bytes())
    node = corefmt.open(_spec(path, rules or {}), copy_on_read="sync")  # fills in turn
    blkdebug = node.layer().storage
    assert isinstance(blkdebug, BlkdebugStorage)
    if cut is not None:
        cut.machine, cut.blkdebug = machine, blkdebug
        for disk in machine:
            disk.policy = cut
    error: CorefmtError | None = None
    try:
        _workload(node, model, random.Random(options))
    except CorefmtError as failure:
        error = failure
    try:
        node.close()
    except CorefmtError as failure:
        error = error or failure
    else:
        if not _disk(path).dead:
            model.flushed()  # a successful close keeps everything
    for disk in machine:
        disk.policy = None
    return model, error, dict(blkdebug.events)


def _verify(path: str, model: Model, capsys, what: str) -> None:
    allowed = model.durable
    with corefmt.open(path, "fvd", read_only=True) as node:  # replays in memory
        model.check(node.read(0, SIZE), allowed, f"{what}, read-only")
    with corefmt.open(path, "fvd") as node:  # replays and writes it in place
        model.check(node.read(0, SIZE), allowed, f"{what}, read-write")
    capsys.readouterr()
    status = main(["check", "-f", "fvd", path])
    out = capsys.readouterr().out
    assert status in (0, 3), f"{what}: corefmt check exit {status}: {out}"  # clean or leaks


def _occurrences(count: int) -> list[int]:
    """First, second, middle, next to last and last."""
    return sorted({n for n in (1, 2, (count + 1) // 2, count - 1, count) if 1 <= n <= count})


def _traced(base: Path, path: str, options: str) -> dict:
    _, error, seen = _run(base, path, options, None)
    assert error is None, error
    # Recycling happened before the close (which writes table/bitmap once more).
    update = events.TABLE_UPDATE if "compact" in options else events.BITMAP_UPDATE
    assert seen.get(update, 0) >= 2, seen
    assert seen.get(events.CLOSE_FLUSH) == 1, seen
    return seen


#: The default run's share of the grid: the ordered survivors (which catch a
#: missing flush between ordered writes) and one random one, cut at the
#: event and one request after it; ``-m slow`` runs all of it.
SHORT_SURVIVORS: tuple[int | str, ...] = (0, "newest", "later-half")
SHORT_CUT_AFTER = (0, 1)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_a_power_cut_at_every_event_keeps_flushed_data(tmp_path, sim_path, capsys, options):
    _power_cuts(tmp_path, sim_path, capsys, options, SHORT_CUT_AFTER, SHORT_SURVIVORS)


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_a_power_cut_at_every_event_keeps_flushed_data_long(tmp_path, sim_path, capsys,
                                                            options):
    _power_cuts(tmp_path, sim_path, capsys, options, CUT_AFTER, SURVIVORS)


def _power_cuts(tmp_path, sim_path, capsys, options: str, cut_after: tuple[int, ...],
                survivor_kinds: tuple[int | str, ...]) -> None:
    base = tmp_path / "base.raw"
    _random_base(base)
    seen = _traced(base, sim_path(), options)
    missing = {events.TABLE_UPDATE, events.CHUNK_ALLOC} if "compact" not in options else set()
    assert set(EVENTS) - missing <= set(seen), set(EVENTS) - set(seen)
    for event in EVENTS:
        for occurrence, after, survivors in itertools.product(
                _occurrences(seen.get(event, 0)), cut_after, survivor_kinds):
            what = f"power cut {after} requests after {event} #{occurrence} ({survivors})"
            path = sim_path()
            cut = PowerCut([], occurrence, after, survivors)
            model, error, _ = _run(base, path, options,
                                   _nth_occurrence(event, occurrence, "powercut"), cut)
            if not cut.cut:
                assert error is None, (what, error)
                continue  # the close's last requests came first
            assert error is not None, what
            for disk in _machine(path):
                assert disk.dead, (what, disk.name)
                disk.restore(disk.crash_image or b"")
            _verify(path, model, capsys, what)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_an_io_error_at_every_event_fails_clearly_and_keeps_the_image(tmp_path, sim_path,
                                                                     capsys, options):
    base = tmp_path / "base.raw"
    _random_base(base)
    seen = _traced(base, sim_path(), options)
    for event in EVENTS:
        for occurrence in _occurrences(seen.get(event, 0)):
            what = f"EIO at {event} #{occurrence}"
            path = sim_path()
            model, error, _ = _run(base, path, options, _nth_occurrence(event, occurrence,
                                                                        "error"))
            # Every event is followed by a request of its own: the error reaches
            # the write, flush or close that caused it, as one clear line.
            assert error is not None, f"{what}: nothing failed"
            assert "\n" not in str(error) and "Input/output error" in str(error), (what, error)
            # The disk kept power: what the failed close did not write is only
            # unflushed, and a reopen sees the data or the state before it.
            model.durable = [durable | current for durable, current
                             in zip(model.durable, model.current, strict=True)]
            _verify(path, model, capsys, what)

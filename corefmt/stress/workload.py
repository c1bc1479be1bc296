"""Seeded workloads: batches of concurrent, overlapping requests.

Each batch runs at once, so its requests race; the generator keeps at most
``MAX_WRITERS_PER_SECTOR`` writers on any sector within a batch, which keeps
the model's set of possible orders small.

Over a base, prefetch joins in: PREFETCH fills a range from the chain
below while guest requests race it, and in a seeded share of runs one
batch near the end is a lone PREFETCH_ALL (the whole image, to completion,
where a driver may record that the base is no longer needed), followed by
ordinary batches: guest requests after completion must still work.

On an image that stores data compressed, COMPRESSED writes join in: whole
copy units (qcow2 clusters; the image's last one may be short) of mostly
compressible data, some of them through the two-phase ``prepare_write``
path convert -c takes. On an image with internal snapshots, lone batches
create and delete snapshots, so later writes must copy shared clusters.
Each kind is enabled by a flag: without them the random stream is consumed
as it always was.
"""

from __future__ import annotations

import random

import attrs

SECTOR_SIZE = 512
MAX_BATCH = 6
MAX_WRITERS_PER_SECTOR = 3
SMALL_MAX = 4096
LARGE_MAX = 128 * 1024
#: Share of requests aimed at a small hot range, so that requests overlap.
HOT_RANGE = 64 * 1024
HOT_SHARE = 0.4
#: Share of requests that straddle a copy-unit boundary (the driver's copy
#: granularity: cluster or block), leaving partial units on both sides, so
#: partial-cluster copy-on-write runs whatever the cluster size.
STRADDLE_SHARE = 0.3

READ, WRITE, ZERO, DISCARD, FLUSH = "read", "write", "zero", "discard", "flush"
PREFETCH, PREFETCH_ALL = "prefetch", "prefetch-all"
COMPRESSED = "compressed"
SNAPSHOT_CREATE, SNAPSHOT_DELETE = "snapshot-create", "snapshot-delete"
#: Requests that change the image.
WRITE_KINDS = frozenset({WRITE, ZERO, DISCARD, COMPRESSED})
#: Requests that carry data.
DATA_KINDS = frozenset({WRITE, COMPRESSED})
#: Internal snapshot operations: guest content is unchanged, each runs alone.
SNAPSHOT_KINDS = frozenset({SNAPSHOT_CREATE, SNAPSHOT_DELETE})
#: The kind the generator draws for either snapshot operation.
_SNAPSHOT = "snapshot"
#: Fills from below: they change nothing a guest can see.
PREFETCH_KINDS = frozenset({PREFETCH, PREFETCH_ALL})
KIND_WEIGHTS = {READ: 34, WRITE: 36, ZERO: 10, DISCARD: 8, FLUSH: 12}
#: Weight of PREFETCH among the kinds above (modest: the guest's requests
#: are the workload, prefetch races them).
PREFETCH_WEIGHT = 8
#: Share of PREFETCH ranges drawn up to PREFETCH_MAX, many copy units at once.
PREFETCH_LARGE_SHARE = 0.3
PREFETCH_MAX = 1024 * 1024
#: Share of runs with a whole-image prefetch, and how many ordinary requests
#: follow it (a few batches, with flushes among them).
PREFETCH_ALL_SHARE = 1 / 3
PREFETCH_ALL_AFTER = (6, 16)
#: Weight of COMPRESSED among the kinds, and its ranges: 1..COMPRESSED_UNITS
#: whole copy units, a share of them through ``prepare_write``.
COMPRESSED_WEIGHT = 10
COMPRESSED_UNITS = 4
TWO_PHASE_SHARE = 0.3
#: Compressed data: a short random pattern repeated (most), zeros with a few
#: random bytes, or random bytes (which do not compress: stored uncompressed).
PATTERN_SHARE, SPARSE_SHARE = 0.65, 0.15
PATTERN_MAX = 16
SPARSE_BYTES = 8
#: Weight of a snapshot operation among the kinds; at most MAX_SNAPSHOTS
#: exist (as generated: a failed create may leave fewer), creates are
#: preferred below that.
SNAPSHOT_WEIGHT = 8
MAX_SNAPSHOTS = 3
CREATE_SHARE = 0.4
#: A delete names snapshot ``pick % count`` of those the image lists then.
PICK_RANGE = 1 << 16


@attrs.frozen
class Op:
    """One guest request; ``tag`` names it to the simulated storage."""

    tag: int
    kind: str
    offset: int = 0
    length: int = 0
    data: bytes | None = attrs.field(default=None, repr=False)
    #: COMPRESSED: stored through ``prepare_write`` and the callable it returns.
    two_phase: bool = False
    #: SNAPSHOT_DELETE: which of the snapshots listed then (``pick % count``).
    pick: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def sectors(self) -> range:
        if self.length == 0:
            return range(0)
        return range(self.offset // SECTOR_SIZE, -(-self.end // SECTOR_SIZE))

    @property
    def snapshot_name(self) -> str:
        """The name a SNAPSHOT_CREATE gives its snapshot (unique in a run)."""
        return f"stress-{self.tag}"

    def describe(self) -> str:
        if self.kind in (FLUSH, PREFETCH_ALL):
            return f"op {self.tag} {self.kind}"
        if self.kind == SNAPSHOT_CREATE:
            return f"op {self.tag} {self.kind} {self.snapshot_name}"
        if self.kind == SNAPSHOT_DELETE:
            return f"op {self.tag} {self.kind} (pick {self.pick})"
        phases = " (two-phase)" if self.two_phase else ""
        return f"op {self.tag} {self.kind}{phases} {self.offset}+{self.length}"


def _straddle(rng: random.Random, size: int, granularity: int) -> tuple[int, int]:
    """A range that ends part-way into one copy unit and starts part-way into
    the one before (or, in a one-unit image, lies inside the unit)."""
    units = size // granularity
    if units < 2:
        offset = rng.randrange(0, max(1, size - 1))
        return offset, rng.randint(1, min(granularity, size - offset))
    boundary = rng.randrange(1, units) * granularity
    head = rng.randint(1, granularity - 1)
    tail = rng.randint(1, granularity - 1)
    return boundary - head, min(head + tail, size - (boundary - head))


def _extent(rng: random.Random, size: int, aligned: bool,
            granularity: int = SECTOR_SIZE) -> tuple[int, int]:
    """A request range: small or large, sector-aligned or not, often in the hot
    range, often straddling a copy-unit boundary."""
    if granularity > SECTOR_SIZE and rng.random() < STRADDLE_SHARE:
        offset, length = _straddle(rng, size, granularity)
        if aligned:
            offset -= offset % SECTOR_SIZE
            length = min(max(SECTOR_SIZE, length - length % SECTOR_SIZE), size - offset)
        return offset, length
    limit = SMALL_MAX if rng.random() < 0.6 else LARGE_MAX
    length = rng.randint(1, min(limit, size))
    window = min(size, HOT_RANGE) if rng.random() < HOT_SHARE else size
    offset = rng.randrange(0, max(1, window - length + 1))
    if aligned:
        offset -= offset % SECTOR_SIZE
        length = max(SECTOR_SIZE, length - length % SECTOR_SIZE)
        length = min(length, size - offset)
    return offset, length


def _prefetch_extent(rng: random.Random, size: int, granularity: int) -> tuple[int, int]:
    """A prefetch range: like a read's, or large (up to PREFETCH_MAX)."""
    if rng.random() >= PREFETCH_LARGE_SHARE:
        return _extent(rng, size, rng.random() < 0.5, granularity)
    length = rng.randint(1, min(PREFETCH_MAX, size))
    return rng.randrange(0, size - length + 1), length


def _prefetch_all_at(rng: random.Random, operations: int) -> int | None:
    """The tag of this run's whole-image prefetch, if it has one: near the end."""
    if operations < 1 or rng.random() >= PREFETCH_ALL_SHARE:
        return None
    return max(operations - 1 - rng.randint(*PREFETCH_ALL_AFTER), 0)


def _compressible(rng: random.Random, length: int) -> bytes:
    """Data for a compressed write: mostly compressible, some random."""
    draw = rng.random()
    if draw < PATTERN_SHARE:
        pattern = rng.randbytes(rng.randint(1, PATTERN_MAX))
        return (pattern * (length // len(pattern) + 1))[:length]
    if draw < PATTERN_SHARE + SPARSE_SHARE:
        data = bytearray(length)
        for _ in range(SPARSE_BYTES):
            data[rng.randrange(length)] = rng.randrange(1, 256)
        return bytes(data)
    return rng.randbytes(length)


def _compressed(rng: random.Random, tag: int, size: int, granularity: int) -> Op:
    """A compressed write of whole copy units (the last may be short: the
    image's end), often in the hot range."""
    units = -(-size // granularity)
    count = rng.randint(1, min(COMPRESSED_UNITS, units))
    window = min(units, max(1, HOT_RANGE // granularity)) if rng.random() < HOT_SHARE \
        else units
    first = rng.randrange(0, max(1, window - count + 1))
    offset = first * granularity
    length = min(count * granularity, size - offset)
    two_phase = rng.random() < TWO_PHASE_SHARE
    return Op(tag, COMPRESSED, offset, length, _compressible(rng, length), two_phase=two_phase)


@attrs.define
class _Snapshots:
    """How many snapshots the generated creates and deletes leave (if all succeed)."""

    count: int = 0

    def next(self, rng: random.Random, tag: int) -> Op:
        create = self.count == 0 or (self.count < MAX_SNAPSHOTS
                                     and rng.random() < CREATE_SHARE)
        if create:
            self.count += 1
            return Op(tag, SNAPSHOT_CREATE)
        self.count -= 1
        return Op(tag, SNAPSHOT_DELETE, pick=rng.randrange(PICK_RANGE))


def _request(rng: random.Random, kind: str, tag: int, size: int, granularity: int,
             writers: dict[int, int]) -> Op:
    """One request of a batch; a writer of sectors that have enough writers
    in the batch already becomes a read."""
    if kind == FLUSH:
        return Op(tag, FLUSH)
    if kind == PREFETCH:
        return Op(tag, PREFETCH, *_prefetch_extent(rng, size, granularity))
    if kind == COMPRESSED:
        op = _compressed(rng, tag, size, granularity)
        return op if _claim(writers, op) else Op(tag, READ, op.offset, op.length)
    offset, length = _extent(rng, size, kind == DISCARD or rng.random() < 0.5, granularity)
    if kind in WRITE_KINDS and not _claim(writers, Op(tag, kind, offset, length)):
        kind = READ
    data = rng.randbytes(length) if kind == WRITE else None
    return Op(tag, kind, offset, length, data)


def _batches(rng: random.Random, size: int, tag: int, stop: int, granularity: int,
             weights: dict[str, int], snapshots: _Snapshots | None = None
             ) -> list[list[Op]]:
    """Batches of ordinary requests with tags tag..stop-1; a snapshot
    operation ends the batch being drawn and runs alone after it."""
    kinds, chances = list(weights), list(weights.values())
    batches: list[list[Op]] = []
    while tag < stop:
        batch: list[Op] = []
        writers: dict[int, int] = {}
        for _ in range(min(rng.randint(1, MAX_BATCH), stop - tag)):
            kind = rng.choices(kinds, chances)[0]
            if kind == _SNAPSHOT:
                assert snapshots is not None
                if batch:
                    batches.append(batch)
                batch = [snapshots.next(rng, tag)]
                tag += 1
                break
            batch.append(_request(rng, kind, tag, size, granularity, writers))
            tag += 1
        batches.append(batch)
    return batches


def _claim(writers: dict[int, int], op: Op) -> bool:
    """Count ``op`` as a writer of its sectors, unless one has enough already."""
    span = op.sectors()
    if any(writers.get(sector, 0) >= MAX_WRITERS_PER_SECTOR for sector in span):
        return False
    for sector in span:
        writers[sector] = writers.get(sector, 0) + 1
    return True


def _weights(prefetch: bool, compressed: bool, snapshots: bool) -> dict[str, int]:
    """The kinds drawn: the old mix, plus each enabled new kind at the end
    (so a run with none of them draws exactly as before)."""
    weights = dict(KIND_WEIGHTS)
    if prefetch:
        weights[PREFETCH] = PREFETCH_WEIGHT
    if compressed:
        weights[COMPRESSED] = COMPRESSED_WEIGHT
    if snapshots:
        weights[_SNAPSHOT] = SNAPSHOT_WEIGHT
    return weights


def generate(rng: random.Random, size: int, operations: int,
             granularity: int = SECTOR_SIZE, prefetch: bool = False,
             compressed: bool = False, snapshots: bool = False) -> list[list[Op]]:
    """About ``operations`` requests in batches of 1..MAX_BATCH concurrent ones,
    sized around the image's copy granularity; ``prefetch`` (a chain) adds
    PREFETCH ops and, in some runs, a lone PREFETCH_ALL batch; ``compressed``
    adds COMPRESSED writes, ``snapshots`` lone snapshot creates and deletes.
    Without them the random stream is consumed as it always was: old seeds
    keep their workload."""
    weights = _weights(prefetch, compressed, snapshots)
    book = _Snapshots() if snapshots else None
    at = _prefetch_all_at(rng, operations) if prefetch else None
    if at is None:
        return _batches(rng, size, 0, operations, granularity, weights, book)
    return [*_batches(rng, size, 0, at, granularity, weights, book), [Op(at, PREFETCH_ALL)],
            *_batches(rng, size, at + 1, operations, granularity, weights, book)]

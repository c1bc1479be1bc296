"""Seeded workloads: batches of concurrent, overlapping requests.

Each batch runs at once, so its requests race; the generator keeps at most
``MAX_WRITERS_PER_SECTOR`` writers on any sector within a batch, which keeps
the model's set of possible orders small.

Over a base, prefetch joins in: PREFETCH fills a range from the chain
below while guest requests race it, and in a seeded share of runs one
batch near the end is a lone PREFETCH_ALL (the whole image, to completion,
where a driver may record that the base is no longer needed), followed by
ordinary batches: guest requests after completion must still work.
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
#: Requests that change the image.
WRITE_KINDS = frozenset({WRITE, ZERO, DISCARD})
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


@attrs.frozen
class Op:
    """One guest request; ``tag`` names it to the simulated storage."""

    tag: int
    kind: str
    offset: int = 0
    length: int = 0
    data: bytes | None = attrs.field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def sectors(self) -> range:
        if self.length == 0:
            return range(0)
        return range(self.offset // SECTOR_SIZE, -(-self.end // SECTOR_SIZE))

    def describe(self) -> str:
        if self.kind in (FLUSH, PREFETCH_ALL):
            return f"op {self.tag} {self.kind}"
        return f"op {self.tag} {self.kind} {self.offset}+{self.length}"


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


def _batches(rng: random.Random, size: int, tag: int, stop: int, granularity: int,
             weights: dict[str, int]) -> list[list[Op]]:
    """Batches of ordinary requests with tags tag..stop-1."""
    kinds, chances = list(weights), list(weights.values())
    batches: list[list[Op]] = []
    while tag < stop:
        batch: list[Op] = []
        writers: dict[int, int] = {}
        for _ in range(min(rng.randint(1, MAX_BATCH), stop - tag)):
            kind = rng.choices(kinds, chances)[0]
            if kind == FLUSH:
                batch.append(Op(tag, FLUSH))
                tag += 1
                continue
            if kind == PREFETCH:
                batch.append(Op(tag, PREFETCH, *_prefetch_extent(rng, size, granularity)))
                tag += 1
                continue
            offset, length = _extent(rng, size, kind == DISCARD or rng.random() < 0.5,
                                     granularity)
            if kind in WRITE_KINDS:
                span = range(offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE))
                if any(writers.get(s, 0) >= MAX_WRITERS_PER_SECTOR for s in span):
                    kind = READ
                else:
                    for sector in span:
                        writers[sector] = writers.get(sector, 0) + 1
            data = rng.randbytes(length) if kind == WRITE else None
            batch.append(Op(tag, kind, offset, length, data))
            tag += 1
        batches.append(batch)
    return batches


def generate(rng: random.Random, size: int, operations: int,
             granularity: int = SECTOR_SIZE, prefetch: bool = False) -> list[list[Op]]:
    """About ``operations`` requests in batches of 1..MAX_BATCH concurrent ones,
    sized around the image's copy granularity; ``prefetch`` (a chain) adds
    PREFETCH ops and, in some runs, a lone PREFETCH_ALL batch. Without it the
    random stream is consumed as it always was: old seeds keep their workload."""
    if not prefetch:
        return _batches(rng, size, 0, operations, granularity, KIND_WEIGHTS)
    weights = {**KIND_WEIGHTS, PREFETCH: PREFETCH_WEIGHT}
    at = _prefetch_all_at(rng, operations)
    if at is None:
        return _batches(rng, size, 0, operations, granularity, weights)
    return [*_batches(rng, size, 0, at, granularity, weights), [Op(at, PREFETCH_ALL)],
            *_batches(rng, size, at + 1, operations, granularity, weights)]

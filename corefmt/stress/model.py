"""The reference model: which contents each sector may hold.

Per 512-byte sector the model keeps the contents a read may return now
(``current``, usually one) and the contents the sector may hold after a
power cut (``durable``: its state at the last completed flush, or any state
it went through since). Requests of one batch race, so a sector written by
several of them may end in any order of their effects; a request that
failed may have landed, torn at a sector boundary, or not at all.
A compressed write is judged as a write. Prefetch and snapshot operations
change no sector: only whether they fail is judged (``snapshots`` keeps
what the snapshots hold).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs

from corefmt.stress.workload import (
    DATA_KINDS,
    DISCARD,
    FLUSH,
    READ,
    SECTOR_SIZE,
    WRITE_KINDS,
    Op,
)

_ZERO_SECTOR = bytes(SECTOR_SIZE)
#: Mismatch messages kept per check (the count is always exact).
MAX_MESSAGES = 5

SectorChange = Callable[[bytes], tuple[bytes, ...]]


@attrs.frozen
class Outcome:
    """How one request ended, as the workload saw it."""

    ok: bool
    error: str | None = None
    data: bytes | None = attrs.field(default=None, repr=False)
    #: Whether the simulated storage failed this request on purpose (or lost power).
    injected: bool = False
    #: A whole-image prefetch had the driver record that the base is no longer needed.
    self_contained: bool = False
    #: The name of the snapshot a snapshot operation created or deleted
    #: (None: a delete found none to delete).
    snapshot: str | None = None


@attrs.define
class Reach:
    """States of one sector over a batch: at its end, and at any moment of it."""

    final: tuple[bytes, ...]
    seen: frozenset[bytes]


def _dedupe(values: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(dict.fromkeys(values))


class ImageModel:
    """Allowed contents of every sector of one image, before and after a crash."""

    def __init__(self, initial: bytes):
        if len(initial) % SECTOR_SIZE:
            raise ValueError("model sizes are whole sectors")
        self.size = len(initial)
        self.below = [bytes(initial[i:i + SECTOR_SIZE])
                      for i in range(0, len(initial), SECTOR_SIZE)]
        self.current: list[tuple[bytes, ...]] = [(value,) for value in self.below]
        self.durable: list[set[bytes]] = [{value} for value in self.below]

    # -- effects of requests ------------------------------------------------------------
    def _change(self, op: Op, sector: int) -> SectorChange:
        base = sector * SECTOR_SIZE
        start, end = max(op.offset, base), min(op.end, base + SECTOR_SIZE)
        if op.kind == DISCARD:
            below = self.below[sector]
            # Discarded data is undefined: old, zeros, or the backing's again.
            return lambda value: _dedupe((value, _ZERO_SECTOR, below))
        if op.kind in DATA_KINDS:
            assert op.data is not None
            patch = op.data[start - op.offset:end - op.offset]
        else:
            patch = bytes(end - start)

        def apply(value: bytes) -> tuple[bytes, ...]:
            return (value[:start - base] + patch + value[end - base:],)
        return apply

    def _reach(self, sector: int, writers: Sequence[tuple[Op, bool]]) -> Reach:
        """Every order of the batch's writers on one sector (failed ones optional)."""
        changes = [self._change(op, sector) for op, _ in writers]
        required = sum(1 << i for i, (_, ok) in enumerate(writers) if ok)
        states = {(value, 0) for value in self.current[sector]}
        pending = list(states)
        while pending:
            value, mask = pending.pop()
            for index, change in enumerate(changes):
                if mask & (1 << index):
                    continue
                for result in change(value):
                    state = (result, mask | (1 << index))
                    if state not in states:
                        states.add(state)
                        pending.append(state)
        final = _dedupe(value for value, mask in sorted(states, key=lambda s: s[1])
                        if mask & required == required)
        return Reach(final, frozenset(value for value, _ in states))

    # -- batches ------------------------------------------------------------------------
    def apply_batch(self, ops: Sequence[Op], outcomes: Sequence[Outcome]) -> list[str]:
        """Check a finished batch's reads and errors; advance the model. Returns mismatches."""
        problems: list[str] = []
        injected = any(outcome.injected for outcome in outcomes)
        writers: dict[int, list[tuple[Op, bool]]] = {}
        for op, outcome in zip(ops, outcomes, strict=True):
            if outcome.ok and outcome.injected:
                problems.append(f"{op.describe()}: succeeded although the storage failed it")
            if not outcome.ok and not injected:
                problems.append(f"{op.describe()}: failed without an injected error: "
                                f"{outcome.error}")
            if op.kind in WRITE_KINDS:
                for sector in op.sectors():
                    writers.setdefault(sector, []).append((op, outcome.ok))
        reach = {sector: self._reach(sector, ops_here) for sector, ops_here in writers.items()}
        for op, outcome in zip(ops, outcomes, strict=True):
            if op.kind == READ and outcome.ok:
                assert outcome.data is not None
                problems.extend(self._check_read(op, outcome.data, reach))
        flushed = any(op.kind == FLUSH and outcome.ok
                      for op, outcome in zip(ops, outcomes, strict=True))
        for sector, states in reach.items():
            self.current[sector] = states.final
            self.durable[sector] |= states.seen
        if flushed:
            for sector, values in enumerate(self.current):
                extra = reach[sector].seen if sector in reach else ()
                self.durable[sector] = {*values, *extra}
        return problems

    def _check_read(self, op: Op, data: bytes, reach: dict[int, Reach]) -> list[str]:
        problems: list[str] = []
        for sector in op.sectors():
            base = sector * SECTOR_SIZE
            start, end = max(op.offset, base), min(op.end, base + SECTOR_SIZE)
            got = data[start - op.offset:end - op.offset]
            racing = sector in reach
            allowed = reach[sector].seen if racing else self.current[sector]
            matching = [value for value in allowed
                        if value[start - base:end - base] == got]
            if not matching:
                problems.append(f"{op.describe()}: bytes {start}..{end} match none of "
                                f"the {len(allowed)} allowed contents")
            elif not racing:
                self.current[sector] = tuple(matching)  # what the read saw settles it
        return problems

    # -- whole-image checks ---------------------------------------------------------------
    def check_current(self, content: bytes, what: str) -> list[str]:
        return self._check_all(content, [set(values) for values in self.current], what)

    def check_durable(self, content: bytes, what: str) -> list[str]:
        return self._check_all(content, self.durable, what)

    def _check_all(self, content: bytes, allowed: list[set[bytes]], what: str) -> list[str]:
        if len(content) != self.size:
            return [f"{what}: image is {len(content)} bytes, expected {self.size}"]
        bad = [sector for sector, values in enumerate(allowed)
               if content[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] not in values]
        return [f"{what}: sector {sector} (offset {sector * SECTOR_SIZE}) holds content "
                f"that no allowed state has" for sector in bad]

    def flushed(self) -> None:
        """A flush outside any batch succeeded (a close, which promises a
        durable image): what a read may return now survives a power cut."""
        for sector, values in enumerate(self.current):
            self.durable[sector] = set(values)

    def settle(self, content: bytes) -> None:
        """Content known to be on disk now (after a verified reopen) becomes the model."""
        for sector in range(len(self.current)):
            value = bytes(content[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE])
            self.current[sector] = (value,)
            self.durable[sector] = {value}

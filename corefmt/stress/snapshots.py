"""What the internal snapshots a stress run takes must hold, and whether
each may still exist.

A snapshot operation changes no sector the guest sees; what it changes is
sharing (refcounts, qcow2's COPIED flags), so the writes after it must copy
what a snapshot still holds. The book keeps, per snapshot, the contents
each sector may hold (the model's current ones when it was taken: a create
flushes first, so they are durable too) and whether it may exist:

- an operation that completed wrote and flushed the whole table from
  memory, so after it the image's list is the truth, on disk as well;
- one that failed (an injected error, a power cut) may or may not have
  reached the disk: its snapshot may exist or not, until the next completed
  operation writes the table again.

After the run the image is reopened: every snapshot it lists must be one
the book allows, and (where the driver can load one read-only) hold what
it held when it was taken.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from corefmt.driver import supports
from corefmt.stress.model import Outcome
from corefmt.stress.workload import SECTOR_SIZE, SNAPSHOT_CREATE, Op

#: The smallest refcount width (qemu's ``refcount-bits`` info key) the run
#: takes snapshots with: each snapshot adds a reference to every cluster,
#: and many compressed clusters may share a host cluster; a narrower one
#: refuses snapshots of a written image (qemu too: the count would overflow).
MIN_REFCOUNT_BITS = 16
#: Capabilities a stress run needs to create and delete snapshots.
SNAPSHOT_CAPABILITIES = ("snapshot_create", "snapshot_delete", "snapshot_list")

EXISTS, GONE = frozenset({True}), frozenset({False})
EITHER = EXISTS | GONE


def takes_snapshots(image: Any) -> bool:
    """Whether the run can create and delete internal snapshots on this open
    image: the driver has them, and the image (as its info says, in qemu's
    keys) has no external data file (qemu: no snapshots) and refcounts wide
    enough."""
    if image is None or not all(supports(image, name) for name in SNAPSHOT_CAPABILITIES):
        return False
    info = image.info()
    return "data-file" not in info and info.get("refcount-bits", MIN_REFCOUNT_BITS) \
        >= MIN_REFCOUNT_BITS


@attrs.define
class Snapshot:
    #: Per sector, the contents the snapshot may hold.
    content: list[frozenset[bytes]] = attrs.field(repr=False)
    #: Whether it may exist (True), may be gone (False), or either.
    present: frozenset[bool] = EXISTS


@attrs.define
class SnapshotBook:
    """The snapshots of one run, as the workload's outcomes allow them."""

    records: dict[str, Snapshot] = attrs.field(factory=dict)

    def apply(self, op: Op, outcome: Outcome, current: Sequence[tuple[bytes, ...]],
              listed: Sequence[str] | None) -> list[str]:
        """Advance after a lone snapshot operation; ``listed`` is the image's
        list of names after it (None: the image is gone). Returns mismatches."""
        name = outcome.snapshot
        if name is None:
            return []  # a delete that found no snapshot to delete
        if op.kind == SNAPSHOT_CREATE:
            self.records[name] = Snapshot([frozenset(values) for values in current],
                                          EXISTS if outcome.ok else EITHER)
        else:
            record = self.records.get(name)
            if record is None:
                return [f"{op.describe()}: deleted {name}, which the run never created"]
            record.present = GONE if outcome.ok else record.present | GONE
        if not outcome.ok or listed is None:
            return []
        for known, record in self.records.items():
            record.present = EXISTS if known in listed else GONE
        problems = [f"{op.describe()}: the image lists a snapshot {other} the run "
                    "never created" for other in listed if other not in self.records]
        if (name in listed) != (op.kind == SNAPSHOT_CREATE):
            state = "lists" if name in listed else "does not list"
            problems.append(f"{op.describe()}: it succeeded, but the image {state} {name}")
        return problems

    def check_listed(self, listed: Sequence[str], what: str) -> list[str]:
        """The snapshots a reopened image lists against those the run allows."""
        problems = [f"{what}: the image lists a snapshot {name} the run never created"
                    for name in listed if name not in self.records]
        for name, record in self.records.items():
            if (name in listed) not in record.present:
                state = "lists" if name in listed else "lost"
                problems.append(f"{what}: the image {state} snapshot {name}, which "
                                f"{'was deleted' if name in listed else 'was created'}")
        return problems

    def check_content(self, name: str, content: bytes, what: str) -> list[str]:
        """A snapshot read back holds what the guest saw when it was taken."""
        allowed = self.records[name].content
        size = len(allowed) * SECTOR_SIZE
        if len(content) != size:
            return [f"{what}: snapshot {name} reads {len(content)} bytes, expected {size}"]
        bad = [sector for sector, values in enumerate(allowed)
               if content[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] not in values]
        return [f"{what}: snapshot {name}, sector {sector} (offset {sector * SECTOR_SIZE}) "
                "holds content it did not have when it was taken" for sector in bad]


# -- check reports after an interrupted snapshot operation ------------------------------
#: A check's line (qemu-img's and corefmt's qcow2 check word them alike) for a
#: COPIED flag that disagrees with the stored refcount, and for a leak.
_COPIED_LINE = re.compile(r"OFLAG_COPIED (?:data|L2) cluster: (?:l1_index=\d+ l1_entry|l2_entry)"
                          r"=([0-9a-f]+) refcount=(\d+)")
_LEAK_LINE = re.compile(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)")
COPIED_FLAG = 1 << 63
ENTRY_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def harmless_copied_flags(lines: Iterable[str], cluster_size: int) -> int:
    """How many COPIED-flag corruptions in a check's lines are harmless.

    A snapshot operation changes refcounts and COPIED flags in separate
    writes, so whichever order it takes, a power cut (or failure) between
    them leaves flags that disagree with the stored refcounts (qemu's own
    order too). Harmless are: COPIED set on a cluster whose extra count is a
    leak (one real reference: writing it in place is right, and repairing
    the leak makes the flag agree), and COPIED clear on a cluster counted
    once (it only costs a copy on the next write). COPIED set on a cluster
    really shared is not: a write would change a snapshot."""
    lines = list(lines)
    references = {int(cluster): int(count) for line in lines
                  for cluster, count in _LEAK_LINE.findall(line)}
    harmless = 0
    for line in lines:
        for entry_text, refcount_text in _COPIED_LINE.findall(line):
            entry = int(entry_text, 16)
            cluster = (entry & ENTRY_OFFSET_MASK) // cluster_size
            if entry & COPIED_FLAG:
                harmless += references.get(cluster) == 1
            else:
                harmless += int(refcount_text) == 1
    return harmless

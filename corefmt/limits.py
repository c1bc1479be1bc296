"""What a driver tells the block layer about the requests it can take."""

from __future__ import annotations

import attrs


@attrs.frozen
class Limits:
    """Request limits of one open image (QEMU's BlockLimits).

    The block layer aligns and splits requests so a driver only ever sees
    what it declared: writes by read-modify-write to ``request_alignment``,
    write_zeroes and discard trimmed to their alignments (the unaligned
    edges of a zeroing become written zeros; of a discard, nothing),
    every request cut at ``max_transfer``. ``copy_granularity`` is the unit
    of copy-on-write inside the format (a cluster or block): copy-on-read
    widens its fills to it, and ``corefmt stress`` sizes requests around it
    so partial-unit writes are always exercised. It need not be a power of
    two (FVD's blocks may be 7680 bytes), only a multiple of the request
    alignment. ``allocation_granularity`` is the unit the format records
    as held by this layer (a cluster, an extended-L2 subcluster, an FVD
    block): writing part of one allocates all of it, the rest filled from
    the backing, so a safe rebase compares and writes whole units. None
    (the default, and what a driver that does not say gets) promises
    nothing: the rebase works in 512-byte sectors, as qemu's does.
    """

    request_alignment: int = 1
    zeroes_alignment: int = 1
    discard_alignment: int = 1
    #: Largest request the driver takes at once (None: no limit).
    max_transfer: int | None = None
    copy_granularity: int = 1
    allocation_granularity: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("request_alignment", "zeroes_alignment", "discard_alignment"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, not {value}")
        if self.copy_granularity < 1 or self.copy_granularity % self.request_alignment:
            raise ValueError(f"copy_granularity {self.copy_granularity} is not a multiple of "
                             f"request_alignment {self.request_alignment}")
        if self.allocation_granularity is not None and (
                self.allocation_granularity < 1
                or self.allocation_granularity % self.request_alignment):
            raise ValueError(f"allocation_granularity {self.allocation_granularity} is not a "
                             f"multiple of request_alignment {self.request_alignment}")
        if self.max_transfer is not None and (
                self.max_transfer < self.request_alignment
                or self.max_transfer % self.request_alignment):
            raise ValueError(f"max_transfer {self.max_transfer} is not a multiple of "
                             f"request_alignment {self.request_alignment}")

    @property
    def allocation_unit(self) -> int:
        """What a write into part of one allocates whole (1: nothing known)."""
        return self.allocation_granularity or 1

"""The optional interfaces format-specific verbs call, and their results.

A driver implements whichever it has; the core finds them per open image
(``Image.supports``) instead of assuming, and a verb run on an image
without the capability answers as qemu-img does. Result types carry
qemu-img's fields so ``--output=json`` can print its keys.

- ``Image.check(fix: CheckFix) -> CheckResult`` (``check -r leaks|all``);
  drivers written against ``check(repair: bool)`` keep working.
- ``FormatDriver.measure(size, options, source) -> MeasureResult``
  (``measure``: no output image exists yet, so it is the driver's).
- ``Image.amend(options, progress)`` with ``FormatDriver.amend_options``.
- ``Image.snapshot_list() / snapshot_create(name) / snapshot_apply(id_or_name)
  / snapshot_delete(id_or_name)`` (``snapshot -l/-c/-a/-d``).
- ``Image.bitmap_list() / bitmap_add(name, granularity) / bitmap_remove(name)
  / bitmap_clear(name) / bitmap_enable(name) / bitmap_disable(name)``.
- ``Image.set_backing(ref: BackingRef | None)`` (``rebase``, ``stream``):
  raises ``HeaderFull`` when the name does not fit (qemu's -ENOSPC).
- ``Image.make_empty()`` (``commit``): every cluster unallocated again.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import attrs

from corefmt.errors import CorefmtError


class CheckFix(enum.Flag):
    """What ``check`` may repair (qemu-img check -r)."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2
    ALL = LEAKS | ERRORS


@attrs.define
class CheckResult:
    """What a consistency check found, in qemu-img check's categories."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: list[str] = attrs.field(factory=list)
    #: Where the image's used space ends (qemu's image-end-offset), if known.
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.check_errors == 0

    def to_json(self) -> dict[str, Any]:
        """qemu-img check --output=json's keys (without filename/format)."""
        result: dict[str, Any] = {}
        for key, value in (("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("check-errors", self.check_errors),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value is not None:
                result[key] = value
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed)):
            if value:
                result[key] = value
        return result


@attrs.frozen
class MeasureResult:
    """qemu-img measure: bytes a new image needs now and fully allocated."""

    required: int
    fully_allocated: int
    #: Bytes persistent bitmaps need (qemu prints it only for formats with bitmaps).
    bitmaps: int | None = None


@attrs.frozen
class SnapshotInfo:
    """One internal snapshot (qemu-img snapshot -l / info's snapshot table)."""

    id: str
    name: str
    vm_state_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    icount: int | None = None
    #: The virtual disk size the snapshot was taken at (None: not recorded).
    disk_size: int | None = None


class SnapshotError(CorefmtError):
    """A snapshot operation a driver refuses, as qemu's -errno: ``code`` is
    the errno (qemu-img prints it per verb: "-95 (Operation not supported)",
    "Failed to load snapshot: ..."), ``problem`` the driver's own message
    where qemu has one ("Can't find snapshot", "Snapshot L1 table too large")."""

    def __init__(self, code: int, problem: str | None = None):
        self.code = code
        self.problem = problem
        super().__init__(problem or os.strerror(code))


class HeaderFull(CorefmtError):
    """``set_backing``: the new name does not fit in the image's header
    (qemu's -ENOSPC, 'No space left in the file header')."""


@attrs.frozen
class BitmapInfo:
    """One persistent dirty bitmap (info's format-specific ``bitmaps``)."""

    name: str
    granularity: int
    #: qemu's flag words: "in-use", "auto".
    flags: tuple[str, ...] = ()


def call_check(image: Any, fix: CheckFix) -> CheckResult:
    """Run an image's check with the old (``repair: bool``) or new signature."""
    from corefmt.driver import parameter_names

    method = image.check
    names = parameter_names(method)
    if names and names[0] == "repair":
        return method(bool(fix))
    return method(fix)

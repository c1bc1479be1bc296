"""Internal snapshots on any format that has them (qemu-img snapshot, and the
snapshot parts of info, convert -l and measure -l).

The driver does the work through its optional capability (``Image.snapshot_*``,
see corefmt.capabilities); this module finds the image under a node, holds
the node still while its tables change, and words refusals as qemu-img 7.2
does, errno and all ("Could not create snapshot 'x': -95 (Operation not
supported)"). A format without snapshots lists none, as qemu-img's does.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from typing import Any

import attrs

from corefmt.block.node import BlockNode
from corefmt.capabilities import SnapshotError, SnapshotInfo
from corefmt.driver import supports
from corefmt.errors import CorefmtError, OptionError
from corefmt.sizes import human_size

#: qemu-img's -l forms: ``snapshot.id=ID,snapshot.name=NAME`` (either), or a bare id or name.
OPTION_PREFIX = "snapshot."
OPTION_KEYS = ("snapshot.id", "snapshot.name")
#: bdrv_snapshot_dump's columns (qemu 7.2): header and row formats.
HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
SECONDS_PER_HOUR, SECONDS_PER_MINUTE = 3600, 60
NANOSECONDS, NANOSECONDS_PER_MS = 1_000_000_000, 1_000_000


class SnapshotRefused(CorefmtError):
    """A refusal qemu-img reports in several lines (``reports``; the last is the message)."""

    def __init__(self, reports: list[str]):
        super().__init__(reports[-1])
        self.reports = reports


@attrs.frozen
class SnapshotRef:
    """Which snapshot -l names: by id and/or name, or one string that is
    tried as an id first, then as a name."""

    id: str | None = None
    name: str | None = None
    id_or_name: str | None = None


def parse_snapshot_option(text: str) -> SnapshotRef:
    """convert/measure -l as qemu-img parses it."""
    if not text.startswith(OPTION_PREFIX):
        return SnapshotRef(id_or_name=text)
    values: dict[str, str] = {}
    for item in _split_options(text):
        key, _, value = item.partition("=")
        if key not in OPTION_KEYS:
            raise SnapshotRefused([f"Invalid parameter '{key}'",
                                   f"Failed in parsing snapshot param '{text}'"])
        values[key] = value
    return SnapshotRef(id=values.get(OPTION_KEYS[0]), name=values.get(OPTION_KEYS[1]))


def _split_options(text: str) -> list[str]:
    """QemuOpts' comma list (",," is a literal comma)."""
    items, current, index = [], [], 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1:index + 2] == ",":
                current.append(",")
                index += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[index])
        index += 1
    items.append("".join(current))
    return [item for item in items if item]


# -- the image under a node -------------------------------------------------------------
def _image(node: BlockNode) -> Any:
    return node.layer()._image  # type: ignore[attr-defined]


def list_snapshots(node: BlockNode) -> list[SnapshotInfo]:
    image = _image(node)
    if not supports(image, "snapshot_list"):
        return []
    return list(image.snapshot_list())


def _changing(node: BlockNode, action: str, name: str, call: Any) -> Any:
    """Run a driver's change with the node quiet (an exclusive tracked range
    over all of it) and its cached status invalidated after."""
    layer = node.layer()
    layer._check_writable()  # type: ignore[attr-defined]
    image = _image(node)
    if not supports(image, f"snapshot_{action}"):
        raise _refusal(action, name, SnapshotError(errno.ENOTSUP))
    tracker = layer._tracker  # type: ignore[attr-defined]
    try:
        with tracker.track(0, layer.virtual_size + 1, exclusive=True):
            return call(image)
    except SnapshotError as error:
        raise _refusal(action, name, error) from None
    finally:
        layer._changed()  # type: ignore[attr-defined]


def _refusal(action: str, name: str, error: SnapshotError) -> SnapshotRefused:
    """qemu-img snapshot's wording per action."""
    reason = os.strerror(error.code)
    if action == "create":
        notes = [error.problem] if error.problem else []
        return SnapshotRefused([*notes, f"Could not create snapshot '{name}': "
                                        f"-{error.code} ({reason})"])
    if action == "apply":
        notes = [error.problem] if error.problem else []
        return SnapshotRefused([*notes, f"Could not apply snapshot '{name}': "
                                        f"Failed to load snapshot: {reason}"])
    return SnapshotRefused([f"Could not delete snapshot '{name}': "
                            f"{error.problem or reason}"])


def create_snapshot(node: BlockNode, name: str) -> SnapshotInfo:
    """qemu-img snapshot -c: a new snapshot of the image's current state."""
    return _changing(node, "create", name, lambda image: image.snapshot_create(name))


def apply_snapshot(node: BlockNode, id_or_name: str) -> None:
    """qemu-img snapshot -a: the image's state becomes the snapshot's."""
    if not supports(_image(node), "snapshot_apply"):
        raise SnapshotRefused([f"Could not apply snapshot '{id_or_name}': Block driver does "
                               "not support snapshots"])
    _changing(node, "apply", id_or_name, lambda image: image.snapshot_apply(id_or_name))


def delete_snapshot(node: BlockNode, name: str) -> None:
    """qemu-img snapshot -d: the first snapshot of that *name* (qemu-img 7.2's
    bdrv_snapshot_find matches names only), deleted by its id; a format
    without snapshots has none to find."""
    found = next((info for info in list_snapshots(node) if info.name == name), None)
    if found is None:
        raise SnapshotRefused([f"Could not delete snapshot '{name}': snapshot not found"])
    _changing(node, "delete", name, lambda image: image.snapshot_delete(found.id))


def load_snapshot(node: BlockNode, ref: SnapshotRef | str) -> None:
    """Show a snapshot instead of the current state on a read-only node
    (qemu's bdrv_snapshot_load_tmp; convert -l, measure -l)."""
    if isinstance(ref, str):
        ref = parse_snapshot_option(ref)
    layer = node.layer()
    image = _image(node)
    if not supports(image, "snapshot_load"):
        raise OptionError(f"Failed to load snapshot: Block format '{layer.format_name}' used "
                          "by device '' does not support temporarily loading internal "
                          "snapshots")
    if not layer.read_only:
        raise OptionError("Failed to load snapshot: Device is not readonly")
    try:
        if ref.id_or_name is not None:
            try:
                image.snapshot_load(ref.id_or_name, None)
            except SnapshotError as error:
                if error.code != errno.ENOENT:
                    raise
                image.snapshot_load(None, ref.id_or_name)
        elif ref.id is None and ref.name is None:
            raise SnapshotError(errno.EINVAL, "snapshot_id and snapshot_name are both NULL")
        else:
            image.snapshot_load(ref.id, ref.name)
    except SnapshotError as error:
        raise OptionError(f"Failed to load snapshot: {error}") from None
    layer._invalidate_status()  # type: ignore[attr-defined]


# -- output -------------------------------------------------------------------------------
def table_lines(snapshots: Iterable[SnapshotInfo]) -> list[str]:
    """"Snapshot list:" and bdrv_snapshot_dump's table (qemu-img 7.2)."""
    return ["Snapshot list:", HEADER, *(_row(info) for info in snapshots)]


def _row(info: SnapshotInfo) -> str:
    date = time.strftime(DATE_FORMAT, time.localtime(info.date_sec))
    seconds = info.vm_clock_nsec // NANOSECONDS
    clock = (f"{seconds // SECONDS_PER_HOUR:02d}:"
             f"{seconds // SECONDS_PER_MINUTE % SECONDS_PER_MINUTE:02d}:"
             f"{seconds % SECONDS_PER_MINUTE:02d}."
             f"{info.vm_clock_nsec // NANOSECONDS_PER_MS % 1000:03d}")
    icount = "" if info.icount is None else str(info.icount)
    return (f"{info.id:<9} {info.name:<16} {human_size(info.vm_state_size):>8}{date:>20}"
            f"{clock:>13}{icount:>11}")


def info_json(info: SnapshotInfo) -> dict[str, Any]:
    """qemu's SnapshotInfo keys, in the order qemu-img info prints them."""
    entry: dict[str, Any] = {}
    if info.icount is not None:
        entry["icount"] = info.icount
    entry.update({"vm-clock-nsec": info.vm_clock_nsec % NANOSECONDS, "name": info.name,
                  "date-sec": info.date_sec, "date-nsec": info.date_nsec,
                  "vm-clock-sec": info.vm_clock_nsec // NANOSECONDS, "id": info.id,
                  "vm-state-size": info.vm_state_size})
    return entry


def from_json(entry: dict[str, Any]) -> SnapshotInfo:
    """A SnapshotInfo back from ``info_json``'s keys (info's human output)."""
    return SnapshotInfo(id=entry["id"], name=entry["name"],
                        vm_state_size=entry["vm-state-size"], date_sec=entry["date-sec"],
                        date_nsec=entry["date-nsec"],
                        vm_clock_nsec=entry["vm-clock-sec"] * NANOSECONDS
                        + entry["vm-clock-nsec"], icount=entry.get("icount"))

"""Mapping an image: where each guest range lives in the chain (qemu-img map)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError
from corefmt.extents import ChainExtent
from corefmt.ops.status_walk import chain_extents


def map_entries(node: BlockNode) -> Iterator[dict[str, Any]]:
    """qemu-img map --output=json entries, neighbours of one kind merged
    (status in growing windows: a petabyte of holes costs a few requests)."""
    pending: dict[str, Any] | None = None
    for extent in chain_extents(node):
        entry: dict[str, Any] = {
            "start": extent.offset,
            "length": extent.length,
            "depth": extent.depth,
            "present": extent.node is not None,
            "zero": extent.zero,
            "data": extent.data,
        }
        if extent.host_offset is not None and not extent.compressed:
            entry["offset"] = extent.host_offset  # qemu prints none for compressed data
        entry["_file"] = _host_file(extent)
        if pending is not None and _continues(pending, entry):
            pending["length"] += entry["length"]
            continue
        if pending is not None:
            yield pending
        pending = entry
    if pending is not None:
        yield pending


def _host_file(extent: ChainExtent) -> str | None:
    """The file ``offset`` points into: the layer's own, or its data file."""
    if extent.node is None:
        return None
    layer = extent.node.layer()
    child = layer.children.get(extent.host_child)
    if child is None:
        return layer.filename
    return child.filename if isinstance(child, BlockNode) else child.path


def _continues(previous: dict[str, Any], entry: dict[str, Any]) -> bool:
    keys = ("depth", "present", "zero", "data", "_file")
    if any(previous[key] != entry[key] for key in keys):
        return False
    if ("offset" in previous) != ("offset" in entry):
        return False
    return "offset" not in entry or previous["offset"] + previous["length"] == entry["offset"]


#: What qemu-img map prints for an empty image: its zero-initialised entry.
EMPTY_IMAGE_ENTRY: dict[str, Any] = {
    "start": 0, "length": 0, "depth": 0, "present": False, "zero": False, "data": False,
}


def format_json(entries: list[dict[str, Any]]) -> str:
    """Byte-for-byte qemu-img's layout: one entry a line, in a JSON list."""
    if not entries:
        entries = [EMPTY_IMAGE_ENTRY]
    lines = []
    for entry in entries:
        fields = [f'"start": {entry["start"]}', f'"length": {entry["length"]}',
                  f'"depth": {entry["depth"]}', f'"present": {_bool(entry["present"])}',
                  f'"zero": {_bool(entry["zero"])}', f'"data": {_bool(entry["data"])}']
        if "offset" in entry:
            fields.append(f'"offset": {entry["offset"]}')
        lines.append("{ " + ", ".join(fields) + "}")
    return "[" + ",\n".join(lines) + "]"


#: qemu-img map's refusal in its table, for data it cannot point at.
UNMAPPABLE = "File contains external, encrypted or compressed clusters."


def human_lines(entries: list[dict[str, Any]]) -> Iterator[str]:
    """qemu-img map's table, a line at a time: only ranges whose data is
    stored somewhere. Data with no place to name (compressed clusters)
    ends it with qemu-img's error, after the lines before it."""
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"
    for entry in entries:
        if not entry["data"]:
            continue
        if "offset" not in entry:
            raise CorefmtError(UNMAPPABLE)
        yield (f"{_hex(entry['start']):<16}{_hex(entry['length']):<16}"
               f"{_hex(entry['offset']):<16}{entry['_file']}")


def format_human(entries: list[dict[str, Any]]) -> str:
    """The whole table (CorefmtError where qemu-img refuses to print one)."""
    return "\n".join(human_lines(entries))


def _hex(value: int) -> str:
    return "0" if value == 0 else f"{value:#x}"


def _bool(value: bool) -> str:
    return "true" if value else "false"

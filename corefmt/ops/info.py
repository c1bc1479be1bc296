"""Facts about an image and its chain (qemu-img info)."""

from __future__ import annotations

import json
import re
from typing import Any

from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.ops import snapshot as snapshot_op
from corefmt.sizes import human_size


def node_info(node: BlockNode) -> dict[str, Any]:
    """qemu-img info --output=json's keys, in its order."""
    layer = node.layer()
    image = layer._image  # type: ignore[attr-defined]
    info: dict[str, Any] = {}
    snapshots = snapshot_op.list_snapshots(layer)
    if snapshots:  # qemu-img prints this key first
        info["snapshots"] = [snapshot_op.info_json(snapshot) for snapshot in snapshots]
    info.update({"virtual-size": node.virtual_size, "filename": node.filename})
    if image.cluster_size:
        info["cluster-size"] = image.cluster_size
    info["format"] = node.driver_name
    actual = layer.storage.allocated_size()
    if actual is not None:
        info["actual-size"] = actual
    specific = image.info()
    if specific:
        info["format-specific"] = {"type": layer.format_name, "data": specific}
    if image.backing is not None:
        info["backing-filename"] = image.backing.path
        if layer.backing is not None:
            info["full-backing-filename"] = layer.backing.filename
        else:  # opened without its chain, as qemu-img info does: where it would be
            info["full-backing-filename"] = plugins.registry().resolve(
                image.backing.path, layer.filename)
        if image.backing.format:
            info["backing-filename-format"] = image.backing.format
    info["dirty-flag"] = bool(image.dirty)
    return info


def chain_info(node: BlockNode) -> list[dict[str, Any]]:
    return [node_info(layer) for layer in node.chain()]


def format_json(info: dict[str, Any] | list[dict[str, Any]]) -> str:
    """json.dumps with indent 4, an empty list printed as qemu prints it
    (its brackets on two lines: info's bitmap "flags")."""
    return _EMPTY_LIST.sub(lambda match: f"{match[1]}{match[2]}[\n{match[1]}]{match[3]}",
                           json.dumps(info, indent=4))


_EMPTY_LIST = re.compile(r'^( *)("[^"\n]*": )\[\](,?)$', re.MULTILINE)


def format_human(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
    ]
    if "actual-size" in info:
        lines.append(f"disk size: {human_size(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        backing = info["backing-filename"]
        full = info.get("full-backing-filename")
        if full and full != backing:
            backing += f" (actual path: {full})"
        lines.append(f"backing file: {backing}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines += snapshot_op.table_lines(map(snapshot_op.from_json, info["snapshots"]))
    specific = info.get("format-specific")
    if specific and specific.get("data"):
        lines.append("Format specific information:")
        lines += _human_lines(specific["data"], 1)
    return "\n".join(lines)


def _human_lines(value: dict[str, Any] | list[Any], depth: int) -> list[str]:
    """qemu's dump_qdict/dump_qlist: '-' in keys as spaces, lists as [i],
    nested values one level (4 spaces) deeper under their key."""
    pad = "    " * depth
    items = (((key.replace("-", " "), item) for key, item in value.items())
             if isinstance(value, dict) else ((f"[{index}]", item)
                                              for index, item in enumerate(value)))
    lines = []
    for name, item in items:
        if isinstance(item, (dict, list)):
            lines.append(f"{pad}{name}:")
            lines += _human_lines(item, depth + 1)
        else:
            if isinstance(item, bool):
                item = "true" if item else "false"
            lines.append(f"{pad}{name}: {item}")
    return lines

"""Checking an image's consistency (qemu-img check), for formats that can."""

from __future__ import annotations

import json
from typing import Any

from corefmt.block.node import BlockNode
from corefmt.capabilities import CheckFix, CheckResult, call_check
from corefmt.driver import supports
from corefmt.errors import CorefmtError

#: qemu-img check's exit status.
EXIT_CLEAN = 0
EXIT_CHECK_ERRORS = 1
EXIT_CORRUPTIONS = 2
EXIT_LEAKS = 3
EXIT_NOT_SUPPORTED = 63
#: -r's words.
REPAIR_MODES = {"leaks": CheckFix.LEAKS, "all": CheckFix.ALL}


class CheckNotSupported(CorefmtError):
    """The format has no check (qemu-img exits 63)."""


def check_node(node: BlockNode, fix: CheckFix = CheckFix.NONE) -> CheckResult:
    """Run the image's own check; a format without one is refused as qemu-img does."""
    image = node.layer().image
    if image is None or not supports(image, "check"):
        raise CheckNotSupported("This image format does not support checks")
    return call_check(image, fix)


def exit_status(result: CheckResult) -> int:
    if result.check_errors:
        return EXIT_CHECK_ERRORS
    if result.corruptions:
        return EXIT_CORRUPTIONS
    if result.leaks:
        return EXIT_LEAKS
    return EXIT_CLEAN


def format_human(result: CheckResult | None, repaired: CheckResult | None = None) -> str:
    """qemu-img check's report (``repaired``: what the repairing pass fixed;
    ``result`` None: only that part, which qemu-img prints before it checks again)."""
    lines: list[str] = []
    if repaired is not None and (repaired.corruptions_fixed or repaired.leaks_fixed):
        lines += ["The following inconsistencies were found and repaired:", "",
                  f"    {repaired.leaks_fixed} leaked clusters",
                  f"    {repaired.corruptions_fixed} corruptions", "",
                  "Double checking the fixed image now..."]
    if result is None:
        return "\n".join(lines)
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines += ["", f"{result.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if result.leaks:
            lines += ["", f"{result.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if result.check_errors:
            lines += ["", f"{result.check_errors} internal errors have occurred during "
                      "the check."]
    total, allocated = result.total_clusters or 0, result.allocated_clusters or 0
    if total and allocated:
        fragmented = 100 * (result.fragmented_clusters or 0) / allocated
        compressed = 100 * (result.compressed_clusters or 0) / allocated
        lines.append(f"{allocated}/{total} = {100 * allocated / total:.2f}% allocated, "
                     f"{fragmented:.2f}% fragmented, {compressed:.2f}% compressed clusters")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines)


def format_json(result: CheckResult, node: BlockNode) -> str:
    document: dict[str, Any] = dict(result.to_json())
    document["filename"] = node.filename
    document["format"] = node.format_name
    return json.dumps(document, indent=4)

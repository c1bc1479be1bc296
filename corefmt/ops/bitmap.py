"""Operations on an image's persistent dirty bitmaps (qemu-img bitmap).

The format does the work through its capability methods
(corefmt.capabilities: ``bitmap_add``, ``bitmap_remove``, ...); this module
runs a list of actions in order, as qemu-img does, and words a refusal as
qemu-img does ("Operation add on bitmap b failed: ..."). Changes reach the
disk when the image closes; an action that fails stops the list, and what
came before it is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from corefmt.block.node import BlockNode
from corefmt.driver import supports
from corefmt.errors import CorefmtError

#: qemu-img bitmap's actions, as its options name them.
ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")
#: qemu-img's granularity is a uint32 (a larger -g wraps).
GRANULARITY_MASK = 0xFFFFFFFF


class BitmapOperationError(CorefmtError):
    """One action of a list failed (qemu-img exits 1)."""


@attrs.frozen
class BitmapAction:
    """One action; ``source`` is merge's source bitmap."""

    op: str = attrs.field(validator=attrs.validators.in_(ACTIONS))
    source: str | None = None


def as_action(value: str | tuple[str, str] | BitmapAction) -> BitmapAction:
    """``"add"``, ``("merge", "source")`` or a BitmapAction."""
    if isinstance(value, BitmapAction):
        return value
    if isinstance(value, str):
        return BitmapAction(value)
    return BitmapAction(*value)


def run_actions(node: BlockNode, name: str, actions: Sequence[BitmapAction], *,
                granularity: int | None = None, source: BlockNode | None = None) -> None:
    """Run ``actions`` on bitmap ``name`` of ``node``'s image, in order;
    ``granularity`` for add (None: the format's default), ``source`` the
    image merge reads its source bitmaps from (None: this one)."""
    image = node.layer().image
    source_image = source.layer().image if source is not None else None
    for action in actions:
        try:
            _run(image, node.filename, name, action, granularity, source_image)
        except CorefmtError as error:
            raise BitmapOperationError(f"Operation {action.op} on bitmap {name} failed: "
                                       f"{error}") from error


def _run(image: Any, filename: str, name: str, action: BitmapAction, granularity: int | None,
         source_image: Any) -> None:
    method = f"bitmap_{action.op}"
    if image is None or not supports(image, method):
        if action.op == "add":
            raise CorefmtError(f"Can't store persistent bitmaps to {filename}: "
                               "Operation not supported")
        raise CorefmtError(f"Dirty bitmap '{name}' not found")
    if action.op == "add":
        image.bitmap_add(name, granularity)
    elif action.op == "merge":
        image.bitmap_merge(name, action.source, source_image)
    else:
        getattr(image, method)(name)

"""Persistent dirty bitmaps exported as ``qemu:dirty-bitmap:NAME`` (qemu-nbd -B).

The bitmap is looked up from the top image down the chain, as qemu-nbd
does, so ``-s`` (a temporary overlay) still finds the image's bitmaps.
A bitmap is read live on every request: writes through a writable export
mark an enabled bitmap, and block status shows it at once.
"""

from __future__ import annotations

import bisect
from typing import Any

from corefmt.block.node import BlockNode
from corefmt.driver import supports
from corefmt.errors import CorefmtError

#: qemu's flag word of a bitmap left in use (an unclean close): not usable.
IN_USE = "in-use"


class DirtyBitmap:
    """One bitmap of one image in the chain, read through the format."""

    def __init__(self, name: str, image: Any):
        self.name = name
        self._image = image

    def runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, end, dirty) runs covering exactly ``offset``..``offset+length``."""
        ranges = self._image.bitmap_dirty_ranges(self.name)
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        position = offset
        first = max(bisect.bisect_right([start for start, _ in ranges], offset) - 1, 0)
        for start, size in ranges[first:]:
            if start >= end:
                break
            start, stop = max(start, offset), min(start + size, end)
            if stop <= start:
                continue
            if start > position:
                runs.append((position, start, False))
            runs.append((start, stop, True))
            position = stop
        if position < end:
            runs.append((position, end, False))
        return runs


def find_bitmap(node: BlockNode, name: str) -> DirtyBitmap:
    """The bitmap ``name`` of the first layer that has it, with qemu-nbd's refusals."""
    for layer in node.chain():
        image = getattr(layer, "image", None)
        if image is None or not supports(image, "bitmap_list"):
            continue
        for info in image.bitmap_list():
            if info.name != name:
                continue
            if IN_USE in info.flags:  # qemu-nbd words it so, without qemu-img's hint
                raise CorefmtError(f"Bitmap '{name}' is inconsistent and cannot be used")
            return DirtyBitmap(name, image)
    raise CorefmtError(f"Bitmap '{name}' is not found")

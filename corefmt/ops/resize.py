"""Changing an image's virtual size (qemu-img resize).

The checks are qemu-img 7.2's, in its order and with its words: the size is
parsed before the image is opened (``+N``/``-N`` relative, qemu's suffixes),
then the new size must be positive, preallocation is only for growing, and
shrinking needs ``shrink`` (as ``--shrink``: data past the new end is lost).
What a format can do (raw: any size, falloc/full; qcow2: multiples of 512,
every mode; FVD: growing only) is its driver's ``truncate``.
"""

from __future__ import annotations

import attrs

from corefmt.block.node import PREALLOCATION_OFF, BlockNode
from corefmt.errors import CorefmtError, OptionError, StorageError
from corefmt.ops.measure import OPTION_SIZE_HINT, MeasureError, strtosz

#: qemu-img resize --preallocation's words (PreallocMode).
PREALLOCATION_MODES = (PREALLOCATION_OFF, "metadata", "falloc", "full")
#: The largest size qemu's block layer takes (BDRV_MAX_LENGTH).
MAX_LENGTH = 2**63 - 2**30
U64 = 2**64
SHRINK_REFUSED = "Use the --shrink option to perform a shrink operation."
SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is "
                  "no important data there.")


class ShrinkRefused(MeasureError):
    """Shrinking without ``shrink``: qemu-img's error and its warning."""


@attrs.frozen
class SizeChange:
    """A parsed ``[+|-]SIZE``: ``sign`` 0 absolute, 1 grow by, -1 shrink by."""

    sign: int
    amount: int

    def target(self, current: int) -> int:
        """The new size as qemu-img computes it (its int64 arithmetic)."""
        if self.sign:
            return current + self.sign * self.amount
        return self.amount - U64 if self.amount >= U64 // 2 else self.amount


def parse_size_change(text: str) -> SizeChange:
    """``[+|-]SIZE`` as qemu-img resize takes it (its size option's messages)."""
    sign = {"+": 1, "-": -1}.get(text[:1], 0)
    body = text[1:] if sign else text
    try:
        amount = strtosz(body)
    except ValueError:
        raise OptionError("Parameter 'size' expects a non-negative number below 2^64\n"
                          + OPTION_SIZE_HINT) from None
    except Exception:  # measure's _Range: above 2**64 - 1
        raise OptionError(f"Value '{body}' is out of range for parameter 'size'") from None
    return SizeChange(sign, amount)


def check_preallocation(mode: str) -> str:
    if mode not in PREALLOCATION_MODES:
        raise OptionError(f"Invalid preallocation mode '{mode}'")
    return mode


def resize_node(node: BlockNode, change: SizeChange | str, *, shrink: bool = False,
                preallocation: str = PREALLOCATION_OFF) -> int:
    """Resize an open (writable) node; returns the new virtual size."""
    if isinstance(change, str):
        change = parse_size_change(change)
    current = node.virtual_size
    total = change.target(current)
    if total <= 0:
        raise OptionError("New image size must be positive")
    if total <= current and preallocation != PREALLOCATION_OFF:
        raise OptionError("Preallocation can only be used for growing images")
    if total < current and not shrink:
        raise ShrinkRefused(SHRINK_REFUSED, SHRINK_WARNING)
    if total > MAX_LENGTH:
        raise OptionError(f"offset({total}) exceeds maximum({MAX_LENGTH})")
    try:
        node.truncate(total, preallocation=preallocation)
    except StorageError as error:  # the file could not take the size: qemu's words
        reason = error.os_error.strerror or str(error.os_error)
        raise CorefmtError(f"Could not resize file: {reason}") from error
    return node.virtual_size

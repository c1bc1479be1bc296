"""Parsing and printing sizes the way qemu-img does (binary suffixes)."""

from __future__ import annotations

import math
import re

from corefmt.errors import OptionError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB
EiB = 1024 * PiB

SUFFIX_MULTIPLIERS = {
    "": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB, "e": EiB,
}
UNIT_NAMES = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
MAX_SIZE = 2**63 - 1
_IMG_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]?)\s*$")
#: qemu_strtosz also takes hex (no fraction): "0x10", "0x1k".
_HEX_SIZE_RE = re.compile(r"^\s*0[xX]([0-9a-fA-F]+)\s*([a-zA-Z]?)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """Turn '64k', '1.5G', '512' into bytes; refuse negatives and junk."""
    if isinstance(text, int):
        if text < 0:
            raise OptionError(f"Invalid {what} '{text}': must not be negative")
        return text
    match = _SIZE_RE.match(text) or _HEX_SIZE_RE.match(text)
    if not match:
        if text.strip().startswith("-"):
            raise OptionError(f"Invalid {what} '{text}': must not be negative")
        raise OptionError(
            f"Invalid {what} '{text}': expected a number with an optional "
            "k, M, G, T, P or E suffix"
        )
    number, suffix = match.groups()
    multiplier = SUFFIX_MULTIPLIERS.get(suffix.lower())
    if multiplier is None:
        raise OptionError(f"Invalid {what} '{text}': unknown suffix '{suffix}'")
    if match.re is _HEX_SIZE_RE:
        result = int(number, 16) * multiplier
    elif "." in number:
        value = float(number) * multiplier
        if value != int(value):
            raise OptionError(f"Invalid {what} '{text}': not a whole number of bytes")
        result = int(value)
    else:
        result = int(number) * multiplier
    if result > MAX_SIZE:
        raise OptionError(f"Invalid {what} '{text}': too large")
    return result


def human_size(value: int) -> str:
    """qemu-img's size_to_str: three significant digits, switching unit at 1000."""
    if value <= 0:
        return "0 B"
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    unit = min((exponent - 1) // 10, len(_IMG_PREFIXES) - 1)
    return f"{value / (1 << (unit * 10)):0.3g} {_IMG_PREFIXES[unit]}B"


def io_size(value: float) -> str:
    """qemu-io's cvtstr: '64 KiB' when whole, '1.500 KiB' otherwise."""
    for unit in range(len(UNIT_NAMES) - 1, 0, -1):
        if value >= 1 << (unit * 10):
            value = value / (1 << (unit * 10))
            name = UNIT_NAMES[unit]
            break
    else:
        name = UNIT_NAMES[0]
    if value == int(value):
        return f"{int(value)} {name}"
    return f"{value:.3f} {name}"

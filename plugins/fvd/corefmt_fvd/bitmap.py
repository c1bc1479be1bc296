"""FVD's copy-on-write bitmap: one bit per block of the base image, least
significant bit first; 1 = the block's data are in this image."""

from __future__ import annotations

import re

_NOT_ALL_SET = re.compile(b"[^\xff]")
_NOT_ALL_CLEAR = re.compile(b"[^\x00]")


class FvdBitmap:
    """Bits over the first ``base_size`` bytes; blocks need not be a power of
    two (7680 bytes works). Bits are only ever set."""

    def __init__(self, raw: bytes | bytearray, block_size: int, base_size: int):
        self.bits = bytearray(raw)
        self.block_size = block_size
        self.base_size = base_size
        self.blocks = -(-base_size // block_size)

    def copy(self) -> FvdBitmap:
        return FvdBitmap(self.bits, self.block_size, self.base_size)

    def block_of(self, offset: int) -> int:
        return offset // self.block_size

    def test(self, block: int) -> bool:
        return bool(self.bits[block >> 3] >> (block & 7) & 1)

    def set_blocks(self, first: int, end: int) -> None:
        """Set blocks [first, end)."""
        end = min(end, self.blocks)
        bits = self.bits
        while first < end and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (end - first) >> 3
        if whole:
            bits[first >> 3:(first >> 3) + whole] = b"\xff" * whole
            first += whole << 3
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def set_range(self, offset: int, length: int) -> None:
        """Set every block that overlaps [offset, offset+length), clipped to the base
        (and to its start: a negative block would index the bits from their end)."""
        end = min(offset + length, self.base_size)
        offset = max(offset, 0)
        if length > 0 and offset < end:
            self.set_blocks(offset // self.block_size, -(-end // self.block_size))

    def run_end(self, block: int, value: bool, limit: int) -> int:
        """The first block in [block, limit) whose bit is not ``value`` (limit if none)."""
        limit = min(limit, self.blocks)
        bits = self.bits
        want = 1 if value else 0
        while block < limit and block & 7:
            if (bits[block >> 3] >> (block & 7) & 1) != want:
                return block
            block += 1
        if block >= limit:
            return limit
        pattern = _NOT_ALL_SET if value else _NOT_ALL_CLEAR
        found = pattern.search(bits, block >> 3, -(-limit // 8))
        if found is None:
            return limit
        block = found.start() << 3
        while block < limit and (bits[block >> 3] >> (block & 7) & 1) == want:
            block += 1
        return min(block, limit)

    def all_set(self, first: int, end: int) -> bool:
        return self.run_end(first, True, end) >= min(end, self.blocks)

"""A compact image's one-level table: one u32 per virtual chunk, the
physical chunk that holds it, or EMPTY; bit 31 marks (in memory and in
journal records only) an allocation not yet durable."""

from __future__ import annotations

import array
import sys

from corefmt_fvd.layout import CHUNK_ID_MASK, DIRTY_BIT, EMPTY_ENTRY, PAGE, TABLE_ENTRY


def _little_endian(values: array.array) -> array.array:
    if sys.byteorder != "little":
        values.byteswap()
    return values


class ChunkTable:
    def __init__(self, raw: bytes, entries: int):
        values = array.array("I")
        values.frombytes(raw[:entries * TABLE_ENTRY.size])
        self.entries = _little_endian(values)
        if len(self.entries) < entries:
            self.entries.extend([EMPTY_ENTRY] * (entries - len(self.entries)))

    def __len__(self) -> int:
        return len(self.entries)

    def physical(self, chunk: int) -> int | None:
        """The physical chunk of virtual chunk ``chunk`` (None: EMPTY)."""
        entry = self.entries[chunk]
        return None if entry == EMPTY_ENTRY else entry & CHUNK_ID_MASK

    def dirty(self, chunk: int) -> bool:
        entry = self.entries[chunk]
        return entry != EMPTY_ENTRY and bool(entry & DIRTY_BIT)

    def assign(self, chunk: int, physical: int, dirty: bool = True) -> None:
        self.entries[chunk] = physical | (DIRTY_BIT if dirty else 0)

    def clean(self, chunk: int) -> None:
        if self.entries[chunk] != EMPTY_ENTRY:
            self.entries[chunk] &= CHUNK_ID_MASK

    def clean_all(self) -> None:
        for chunk, entry in enumerate(self.entries):
            if entry != EMPTY_ENTRY and entry & DIRTY_BIT:
                self.entries[chunk] = entry & CHUNK_ID_MASK

    def used(self) -> int:
        """Physical chunks handed out: the highest id plus one (no free list)."""
        ids = [entry & CHUNK_ID_MASK for entry in self.entries if entry != EMPTY_ENTRY]
        return max(ids) + 1 if ids else 0

    def pack(self) -> bytes:
        """The table region: DIRTY cleared, padded with 0xFF to a page."""
        values = array.array("I", (entry if entry == EMPTY_ENTRY else entry & CHUNK_ID_MASK
                                   for entry in self.entries))
        raw = _little_endian(values).tobytes()
        size = -(-len(raw) // PAGE) * PAGE
        return raw + b"\xff" * (size - len(raw))

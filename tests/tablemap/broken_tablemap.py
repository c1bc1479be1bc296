"""Deliberately broken tablemap variants: each skips one step the format's
crash safety or its use of the cache depends on, and a test proves the
tool meant to catch it does.

Imported only once the tablemap fixture has put the plugin on sys.path.
"""

from __future__ import annotations

from corefmt_tablemap.driver import ENTRY, L1_OFFSET, TableMapDriver, TableMapImage

from corefmt import PROBE_NO, hookimpl


class NoDirtyImage(TableMapImage):
    """Forgets ``mark_dirty`` after an L2 entry changes: an evicted table is
    dropped, not written back, and its new entries are lost."""

    def _set_l2(self, handle, j: int, host: int) -> None:
        ENTRY.pack_into(handle.data, j * ENTRY.size, host)


class L1FirstImage(TableMapImage):
    """Writes a new L1 entry straight to the image file, past the L1 cache and
    its dependency on the L2 cache: it may land before the table it points at."""

    def _set_l1(self, i: int, table: int) -> None:
        self.storage.write(L1_OFFSET + i * ENTRY.size, ENTRY.pack(table))
        self.l1[i] = table


class NoBarrierImage(TableMapImage):
    """Sets no data-file barrier: an L2 table may reach the disk pointing at a
    data block that is still in the data file's volatile cache."""

    def _order_data_before_l2(self) -> None:
        pass


class _Variant(TableMapDriver):
    def __init__(self, name: str, image_class: type[TableMapImage]):
        self.name = name
        self.image_class = image_class

    def probe(self, head: bytes, path) -> int:
        return PROBE_NO  # only ever opened by name


VARIANTS = {"tablemap-nodirty": NoDirtyImage, "tablemap-l1first": L1FirstImage,
            "tablemap-nobarrier": NoBarrierImage}


@hookimpl
def corefmt_register(registry) -> None:
    for name, image_class in VARIANTS.items():
        registry.add_format(_Variant(name, image_class))

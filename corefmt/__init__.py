"""corefmt: virtual-disk image formats with a generic block layer.

The Python API::

    import corefmt
    corefmt.create("disk.raw", "raw", "1G")
    with corefmt.open("disk.raw") as disk:
        disk.write(0, b"hello")
        data = disk.read(0, 5)
        with disk.io() as f:          # io.RawIOBase view
            f.seek(512); f.read(16)
    corefmt.convert("disk.raw", "copy.raw", target_format="raw")
"""

from __future__ import annotations

from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.driver import BackingRef, FormatDriver, Image, ImageContext
from corefmt.errors import CorefmtError
from corefmt.extents import ChainExtent, Extent
from corefmt.hookspecs import hookimpl
from corefmt.ops.compare import CompareResult, compare_nodes
from corefmt.ops.convert import convert
from corefmt.ops.create import create

__all__ = [
    "BackingRef",
    "BlockNode",
    "ChainExtent",
    "CompareResult",
    "CorefmtError",
    "Extent",
    "FormatDriver",
    "Image",
    "ImageContext",
    "compare",
    "convert",
    "create",
    "hookimpl",
    "open",
]


def open(path: str, format: str | None = None, *, read_only: bool = False,
         backing: bool = True, copy_on_read: bool = False, direct: bool = False) -> BlockNode:
    """Open an image with its backing chain; use it as a context manager."""
    return open_chain(path, format, read_only=read_only, backing=backing,
                      copy_on_read=copy_on_read, direct=direct)


def compare(a: str, b: str, *, a_format: str | None = None, b_format: str | None = None,
            strict: bool = False) -> CompareResult:
    """Compare two images' guest-visible content (qemu-img compare)."""
    with open_chain(a, a_format, read_only=True) as first, \
            open_chain(b, b_format, read_only=True) as second:
        return compare_nodes(first, second, strict=strict)

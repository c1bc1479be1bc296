"""QEMU's block-stream job as a command, for any format: copy into an image
everything it reads from its chain above BASE, then point it at BASE (or,
without BASE, at nothing).

The copy is a prefetch restricted to what the layers above BASE decide
(``Prefetcher(above=base)``): fills go through ``copy_up`` (a guest write
that got there first wins), are made durable every 64 MiB, and a rerun
copies only what is still missing. The reference changes only after the
fills are flushed (``ops.backing``), so an interrupted stream shows the
same guest data at every point, before and after the switch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.chain import open_chain, version_of
from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError
from corefmt.ops.backing import change_backing, drop_backing, find_layer, reference_to
from corefmt.ops.prefetch import Prefetcher
from corefmt.registry import Registry

ProgressFn = Callable[[int, int], None]


class StreamError(CorefmtError):
    """The stream was refused or failed (exit status 1)."""


@attrs.define
class StreamResult:
    #: Bytes copied into the image by this run.
    copied: int = 0
    #: What the image now records as its backing (None: no backing).
    backing: str | None = None
    #: The image had no backing file: nothing to do.
    had_backing: bool = True


def stream_node(node: BlockNode, base_name: str | None = None, *,
                progress: ProgressFn | None = None) -> StreamResult:
    """Stream into an image opened read-write with its chain."""
    top = node.layer()
    below = top.backing
    if below is None:
        if base_name:
            raise StreamError(f"Did not find '{base_name}' in the backing chain of "
                              f"'{top.filename}'")
        return StreamResult(had_backing=False)
    base = None
    if base_name:
        base = find_layer(top, base_name)
        if base is None:
            raise StreamError(f"Did not find '{base_name}' in the backing chain of "
                              f"'{top.filename}'")
    status = Prefetcher(top, throttle=False, progress=progress, above=base).run()
    if base is None:
        drop_backing(top)
        return StreamResult(copied=status.copied)
    reference = reference_to(base, top)
    if base is not below.layer():
        change_backing(top, reference, base.format_name, identity=version_of(base))
    return StreamResult(copied=status.copied, backing=reference)


def stream(image: str | Mapping[str, Any], format: str | None = None, *,
           base: str | None = None, progress: ProgressFn | None = None,
           allow_protocols: Collection[str] = (),
           registry: Registry | None = None) -> StreamResult:
    """Copy what the image reads from its chain above ``base`` into it, then
    make ``base`` its backing file (None: no backing file)."""
    with open_chain(image, format, read_only=False, registry=registry or plugins.registry(),
                    allow_protocols=allow_protocols) as node:
        return stream_node(node, base, progress=progress)

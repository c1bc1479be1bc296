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

#: The release (pyproject.toml reads it from here; ``corefmt --version`` prints it).
__version__ = "0.1.0"

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from corefmt import sync
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.capabilities import (
    BitmapInfo,
    CheckFix,
    CheckResult,
    MeasureResult,
    SnapshotError,
    SnapshotInfo,
)
from corefmt.driver import (
    PROBE_CERTAIN,
    PROBE_FALLBACK,
    PROBE_NO,
    BackingRef,
    CreateContext,
    FormatDriver,
    Image,
    ImageContext,
)
from corefmt.errors import (
    BackingChainError,
    CorefmtError,
    ImageError,
    InvalidRequest,
    NotSupported,
    OptionError,
    RangeError,
    ReadOnlyError,
    StorageError,
    UnknownFormatError,
)
from corefmt.extents import ChainExtent, Extent
from corefmt.filters import Filter, FilterContext, FilterDriver, StorageFilterDriver
from corefmt.flags import RequestFlags
from corefmt.hookspecs import hookimpl
from corefmt.limits import Limits
from corefmt.options import NoOptions, choice, option, to_bool, to_size
from corefmt.plugins import PluginWarning
from corefmt.storage import Storage, StorageDriver

if TYPE_CHECKING:
    from corefmt.cache import MetadataCache, TableHandle
    from corefmt.fills import FillPolicy, PrefetchTuning
    from corefmt.ops.commit import CommitResult
    from corefmt.ops.compare import CompareResult
    from corefmt.ops.convert import convert
    from corefmt.ops.create import create
    from corefmt.ops.prefetch import PrefetchStatus
    from corefmt.ops.stream import StreamResult

#: Names imported on first use: a command imports only what it uses.
_LAZY = {"MetadataCache": "corefmt.cache", "TableHandle": "corefmt.cache",
         "FillPolicy": "corefmt.fills", "PrefetchTuning": "corefmt.fills",
         "PrefetchStatus": "corefmt.ops.prefetch", "CompareResult": "corefmt.ops.compare",
         "compare_nodes": "corefmt.ops.compare",
         "convert": "corefmt.ops.convert", "create": "corefmt.ops.create"}

__all__ = [
    "PROBE_CERTAIN",
    "PROBE_FALLBACK",
    "PROBE_NO",
    "BackingChainError",
    "BackingRef",
    "BitmapInfo",
    "BlockNode",
    "ChainExtent",
    "CheckFix",
    "CheckResult",
    "CompareResult",
    "CorefmtError",
    "CreateContext",
    "Extent",
    "FillPolicy",
    "Filter",
    "FilterContext",
    "FilterDriver",
    "FormatDriver",
    "Image",
    "ImageContext",
    "ImageError",
    "InvalidRequest",
    "Limits",
    "MeasureResult",
    "MetadataCache",
    "NoOptions",
    "NotSupported",
    "OptionError",
    "PluginWarning",
    "PrefetchStatus",
    "PrefetchTuning",
    "RangeError",
    "ReadOnlyError",
    "RequestFlags",
    "SnapshotError",
    "SnapshotInfo",
    "Storage",
    "StorageDriver",
    "StorageError",
    "StorageFilterDriver",
    "TableHandle",
    "UnknownFormatError",
    "bench",
    "bitmap",
    "choice",
    "commit",
    "compare",
    "convert",
    "create",
    "hookimpl",
    "open",
    "option",
    "prefetch",
    "rebase",
    "resize",
    "snapshot_apply",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_list",
    "stream",
    "sync",
    "to_bool",
    "to_size",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corefmt' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def open(image: str | Mapping[str, Any], format: str | None = None, *,
         read_only: bool = False, backing: bool = True, copy_on_read: bool | str = False,
         prefetch: bool = False,
         direct: bool = False, options: Mapping[str, Any] | None = None,
         allow_protocols: Collection[str] = (), force_share: bool = False) -> BlockNode:
    """Open an image with its graph; use it as a context manager.

    ``image`` is a filename, a ``json:{...}`` name or a spec dict with
    qemu's keys (``{"driver": "copy-on-read", "file": {...}}``); ``options``
    are the format's open options (raw: ``offset``, ``size``). Names read
    from images (backing and data files) may only name local files or the
    protocol the image is on, unless ``allow_protocols`` lists others.
    ``force_share`` takes no image locks (read-only use, qemu-img -U).
    ``copy_on_read`` copies what reads fetch from below into the image
    (True: as the image asks, FVD asynchronously; or "sync"/"async");
    ``prefetch`` fills the whole image from below in the background while
    it is in use (``node.filter.prefetcher`` reports and stops it). A
    read-write open of an overlay that records no version of its remote
    base records the one it meets (trust on first use).
    """
    return open_chain(image, format, read_only=read_only, backing=backing,
                      copy_on_read=copy_on_read, prefetch=prefetch, direct=direct,
                      options=options,
                      allow_protocols=allow_protocols, force_share=force_share,
                      record_base_version=True)


def prefetch(image: str | Mapping[str, Any], format: str | None = None, *,
             progress: Callable[[int, int], None] | None = None, throttle: bool = True,
             options: Mapping[str, Any] | None = None) -> PrefetchStatus:
    """Copy everything the image reads from its backing chain into it
    (``corefmt prefetch``). Resumable: fills are durable every 64 MiB, and a
    rerun copies only what is still missing. When done, a format that can
    record it (FVD) no longer needs its base."""
    from corefmt.ops.prefetch import prefetch as prefetch_node

    with open_chain(image, format, options=options) as node:
        return prefetch_node(node, throttle=throttle, progress=progress)


def rebase(image: str | Mapping[str, Any], backing: str | None,
           backing_format: str | None = None, format: str | None = None, *,
           unsafe: bool = False, progress: Callable[[int, int], None] | None = None,
           compress: bool = False) -> int:
    """Change the image's backing file (qemu-img rebase). Safe by default:
    what the old and new chains show differently is copied into the image
    first (returns the bytes copied); ``unsafe`` only rewrites the
    reference; ``backing`` None or "" leaves the image without one."""
    from corefmt.ops.rebase import rebase as rebase_image

    return rebase_image(image, backing, backing_format, format=format, unsafe=unsafe,
                        progress=progress, compress=compress)


def commit(image: str | Mapping[str, Any], format: str | None = None, *,
           base: str | None = None, drop: bool = False, rate_limit: int = 0,
           progress: Callable[[int, int], None] | None = None) -> CommitResult:
    """Write the image's data into its backing file, or into ``base`` deeper
    in the chain (qemu-img commit), then empty the image unless ``drop``
    (``base`` implies ``drop``; a format that cannot be emptied keeps its
    data: ``result.not_emptiable``)."""
    from corefmt.ops.commit import commit as commit_image

    return commit_image(image, format, base=base, drop=drop, rate_limit=rate_limit,
                        progress=progress)


def stream(image: str | Mapping[str, Any], format: str | None = None, *,
           base: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> StreamResult:
    """Copy what the image reads from its chain above ``base`` into it, then
    make ``base`` its backing file (None: none; QEMU's block-stream).
    Resumable: an interrupted run loses no guest data, a rerun goes on."""
    from corefmt.ops.stream import stream as stream_image

    return stream_image(image, format, base=base, progress=progress)


def bench(image: str | Mapping[str, Any], format: str | None = None, *,
          count: int = 75000, depth: int = 64, offset: int = 0, buffer_size: int = 4096,
          step: int = 0, write: bool = False, pattern: int = 0, flush_interval: int = 0,
          drain: bool = True, cache: str = "writeback", force_share: bool = False) -> Any:
    """qemu-img bench's requests through corefmt's stack (``corefmt bench``):
    ``count`` requests of ``buffer_size`` bytes, ``depth`` in flight, from
    ``offset`` every ``step`` bytes (0: the buffer size), wrapping at the
    image size; writes of the ``pattern`` byte with a flush every
    ``flush_interval`` requests. Returns a BenchResult (elapsed seconds of
    the request loop, requests, flushes, bytes)."""
    from corefmt.ops.bench import open_for_bench, run_bench

    node, mode = open_for_bench(image, format, write=write, cache=cache,
                                force_share=force_share)
    with node:
        return run_bench(node, count=count, depth=depth, offset=offset,
                         buffer_size=buffer_size, step=step, write=write, pattern=pattern,
                         flush_interval=flush_interval, drain=drain,
                         writethrough=mode.writethrough)


def bitmap(image: str | Mapping[str, Any], name: str,
           actions: Sequence[str | tuple[str, str]], format: str | None = None, *,
           granularity: int | None = None, source_file: str | None = None,
           source_format: str | None = None) -> None:
    """Change persistent dirty bitmap ``name`` (``corefmt bitmap``): actions
    "add", "remove", "clear", "enable", "disable" or ("merge", SOURCE), run in
    order on one read-write open; merge reads SOURCE from ``source_file`` if
    given. Stored when the image closes (a failing action keeps the ones
    before it)."""
    from corefmt.ops.bitmap import as_action, run_actions

    steps = [as_action(action) for action in actions]
    with open_chain(image, format, backing=False) as node:
        if source_file is None:
            run_actions(node, name, steps, granularity=granularity)
            return
        with open_chain(source_file, source_format, read_only=True, backing=False) as source:
            run_actions(node, name, steps, granularity=granularity, source=source)


def compare(a: str, b: str, *, a_format: str | None = None, b_format: str | None = None,
            strict: bool = False) -> CompareResult:
    """Compare two images' guest-visible content (qemu-img compare)."""
    from corefmt.ops.compare import compare_nodes

    with open_chain(a, a_format, read_only=True) as first, \
            open_chain(b, b_format, read_only=True) as second:
        return compare_nodes(first, second, strict=strict)


def resize(image: str | Mapping[str, Any], size: int | str, format: str | None = None, *,
           shrink: bool = False, preallocation: str = "off") -> int:
    """Set the virtual size (qemu-img resize): an int, or qemu's text
    ("10G", "+1G", "-512M"). Shrinking needs ``shrink`` (data past the new
    end is lost); returns the new virtual size."""
    from corefmt.ops.resize import SizeChange, check_preallocation, resize_node

    change = SizeChange(0, size) if isinstance(size, int) else size
    with open_chain(image, format) as node:
        return resize_node(node, change, shrink=shrink,
                           preallocation=check_preallocation(preallocation))


def snapshot_list(image: str | Mapping[str, Any], format: str | None = None, *,
                  force_share: bool = False) -> list[SnapshotInfo]:
    """The image's internal snapshots (qemu-img snapshot -l); none for a
    format without them."""
    from corefmt.ops.snapshot import list_snapshots

    with open_chain(image, format, read_only=True, force_share=force_share) as node:
        return list_snapshots(node)


def snapshot_create(image: str | Mapping[str, Any], name: str,
                    format: str | None = None) -> SnapshotInfo:
    """Take an internal snapshot of the image's current state (qemu-img
    snapshot -c; names need not be unique, each gets a new id)."""
    from corefmt.ops.snapshot import create_snapshot

    with open_chain(image, format) as node:
        return create_snapshot(node, name)


def snapshot_apply(image: str | Mapping[str, Any], id_or_name: str,
                   format: str | None = None) -> None:
    """Revert the image to a snapshot, by id or else by name (qemu-img snapshot -a)."""
    from corefmt.ops.snapshot import apply_snapshot

    with open_chain(image, format) as node:
        apply_snapshot(node, id_or_name)


def snapshot_delete(image: str | Mapping[str, Any], name: str,
                    format: str | None = None) -> None:
    """Delete the first snapshot of that name, freeing what only it used
    (qemu-img snapshot -d, which in qemu 7.2 matches names, not ids)."""
    from corefmt.ops.snapshot import delete_snapshot

    with open_chain(image, format) as node:
        delete_snapshot(node, name)

"""Opening the node an NBD export serves, with qemu-nbd's open options:
``--cache``/``--aio`` (corefmt's cache modes, as bench's -t), ``-C`` and
``-s`` (a temporary qcow2 overlay that takes every write).

The overlay lives in a fresh directory under the temp dir (TMPDIR), which
goes when the export closes. The image below it is named in the overlay's
open spec with its format, so it is opened as given and never probed again,
whatever it is (raw, qcow2, FVD, a json: or --image-opts graph).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from corefmt.block.chain import KEY_BACKING, KEY_DRIVER, KEY_FILE, KEY_FILENAME, open_chain, to_spec
from corefmt.block.imagespec import is_json_filename
from corefmt.block.node import BlockNode
from corefmt.errors import OptionError
from corefmt.ops.bench import AIO_MODES, CACHE_MODES, NATIVE_AIO, NATIVE_NEEDS_DIRECT, CacheMode
from corefmt.ops.create import create

#: qemu-nbd's defaults.
DEFAULT_CACHE = "writeback"
DEFAULT_AIO = "threads"
#: The overlay's format and file name inside its directory (qemu-nbd: a temporary qcow2).
SNAPSHOT_FORMAT = "qcow2"
SNAPSHOT_FILE = "snapshot.qcow2"
SNAPSHOT_DIR_PREFIX = "corefmt-nbd-snapshot-"

Image = str | Mapping[str, Any]


def cache_mode(cache: str, aio: str, image: Image) -> CacheMode:
    """The cache mode for qemu-nbd's --cache/--aio, refused in its words."""
    mode = CACHE_MODES.get(cache)
    if mode is None:
        raise OptionError(f"Invalid cache mode `{cache}'")
    if aio not in AIO_MODES:
        raise OptionError(f"Invalid aio mode '{aio}'")
    if aio == NATIVE_AIO and not mode.direct:  # corefmt has one engine; native's rule stays
        raise OptionError(f"Failed to blk_new_open '{_name(image)}': {NATIVE_NEEDS_DIRECT}")
    return mode


@contextlib.contextmanager
def open_for_export(image: Image, format: str | None = None, *, read_only: bool = False,
                    copy_on_read: bool = False, snapshot: bool = False,
                    cache: str = DEFAULT_CACHE, aio: str = DEFAULT_AIO,
                    allow_protocols: Collection[str] = ()) -> Iterator[tuple[BlockNode,
                                                                             CacheMode]]:
    """The node to export and its cache mode; with ``snapshot`` the overlay
    over ``image`` and, once closed, the overlay removed."""
    mode = cache_mode(cache, aio, image)
    options = {"cache": {"no-flush": True}} if mode.no_flush else None
    common: dict[str, Any] = dict(copy_on_read=copy_on_read, direct=mode.direct,
                                  options=options, allow_protocols=allow_protocols,
                                  record_base_version=True)
    if not snapshot:
        with open_chain(image, format, read_only=read_only, **common) as node:
            yield node, mode
        return
    directory = tempfile.mkdtemp(prefix=SNAPSHOT_DIR_PREFIX)
    try:
        spec = _snapshot_spec(image, format, os.path.join(directory, SNAPSHOT_FILE),
                              allow_protocols)
        with open_chain(spec, SNAPSHOT_FORMAT, read_only=read_only, **common) as node:
            yield node, mode
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _snapshot_spec(image: Image, format: str | None, overlay: str,
                   allow_protocols: Collection[str]) -> dict[str, Any]:
    """Create the overlay and return its open spec, the image as its backing."""
    with open_chain(image, format, read_only=True, allow_protocols=allow_protocols) as base:
        size, probed = base.virtual_size, base.format_name
    below = to_spec(image, format)
    below.setdefault(KEY_DRIVER, probed)  # a filter graph keeps its own top driver
    path = image if isinstance(image, str) and not is_json_filename(image) else None
    # The header names the image too (for a person looking at the overlay);
    # the open spec's backing is what is used.
    create(overlay, SNAPSHOT_FORMAT, size, backing=os.path.abspath(path) if path else None,
           backing_format=probed if path else None, unsafe=True)
    return {KEY_DRIVER: SNAPSHOT_FORMAT, KEY_FILE: {KEY_FILENAME: overlay},
            KEY_BACKING: below}


def _name(image: Image) -> str:
    if isinstance(image, str):
        return image
    file = image.get(KEY_FILE, {})
    return file.get(KEY_FILENAME, "") if isinstance(file, Mapping) else str(file)

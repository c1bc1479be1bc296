"""Rewriting an image's backing reference, for any format (rebase, stream).

A format that can rename its backing image implements the optional
``Image.set_backing(ref)`` (``ref``: a ``BackingRef``, or None for no
backing); it must be durable when it returns. The core calls it only
after the layer's data is flushed: a new reference must never reach the
disk before the data that makes the switch invisible to a guest, or a
crash in between shows the new backing's bytes where the copied ones
should be.

Dropping the reference of a format that records completion itself
(FVD's all_data_in_fvd_img, ``mark_self_contained``) needs every byte in
the layer first: what it does not hold yet is filled from below.

Messages are qemu-img rebase's (bdrv_change_backing_file's errors).
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

from corefmt.capabilities import HeaderFull
from corefmt.credentials import without_credentials
from corefmt.driver import BackingRef, supports
from corefmt.errors import CorefmtError, InvalidRequest, NotSupported, OptionError

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode
    from corefmt.ops.prefetch import ProgressFn

#: qemu's strerror texts for bdrv_change_backing_file's failures.
NOT_SUPPORTED = "Operation not supported"
INVALID = "Invalid argument"
HEADER_FULL = "No space left in the file header"
FORMAT_NEEDED = "backing format must be specified"


def same_file(path: str) -> str:
    """What makes two names the same image (real path of a local file)."""
    return os.path.realpath(path) if os.path.exists(path) else path


class BackingChangeError(CorefmtError):
    """The backing reference could not be rewritten (nothing was written)."""


def _refusal(path: str | None, reason: str) -> BackingChangeError:
    return BackingChangeError(f"Could not change the backing file to '{path or ''}': {reason}")


def change_backing(node: BlockNode, path: str | None, format: str | None, *,
                   require_format: bool = True, identity: str | None = None) -> None:
    """Record ``path`` (as given: a relative name stays relative to the
    image) and ``format`` as the layer's backing, or no backing when
    ``path`` is empty. The layer's data is flushed first. ``identity`` is
    the new backing's version where it is remote (``version_of``)."""
    layer = node.layer()
    image = getattr(layer, "image", None)
    if format and not path:
        raise _refusal(path, INVALID)  # a format without a file makes no sense
    if require_format and path and not format:
        raise _refusal(path, FORMAT_NEEDED)
    if image is None or not supports(image, "set_backing"):
        raise _refusal(path, NOT_SUPPORTED)
    layer.flush()  # the copied data is durable before the reference relies on it
    reference = BackingRef(without_credentials(path), format or None, identity) if path else None
    try:
        image.set_backing(reference)
    except HeaderFull:
        raise _refusal(path, HEADER_FULL) from None
    except NotSupported:
        raise _refusal(path, NOT_SUPPORTED) from None
    except (InvalidRequest, OptionError, ValueError):
        raise _refusal(path, INVALID) from None


def drop_backing(node: BlockNode, progress: ProgressFn | None = None) -> None:
    """No backing any more: a format that records completion (FVD) is filled
    with what it still reads from below and marked self-contained first."""
    layer = node.layer()
    image = getattr(layer, "image", None)
    if layer.backing is not None and image is not None \
            and supports(image, "mark_self_contained"):
        from corefmt.ops.prefetch import Prefetcher

        Prefetcher(layer, throttle=False, progress=progress).run()
    change_backing(layer, None, None)


def find_layer(node: BlockNode | None, name: str) -> BlockNode | None:
    """The layer below ``node``'s top that ``name`` means (qemu's
    bdrv_find_backing_image): the name an image records for its backing,
    or a path naming the same file from the current directory or from the
    directory of the image above it. None if no layer is."""
    if node is None:
        return None
    layers = node.chain()
    wanted = same_file(name)
    for holder, below in itertools.pairwise(layers):
        recorded = getattr(getattr(getattr(holder, "image", None), "backing", None), "path",
                           None)
        here = same_file(os.path.join(os.path.dirname(holder.filename), name))
        if name == recorded or same_file(below.filename) in (wanted, here):
            return below
    return None


def reference_to(base: BlockNode, holder: BlockNode) -> str:
    """The name ``holder`` should record for ``base``: the one the layer just
    above ``base`` records when it means the same file from ``holder``'s
    directory, else a path relative to ``holder``'s directory."""
    layers = holder.chain()
    target = base.layer()
    above = next((layer for layer, below in itertools.pairwise(layers)
                  if below is target), None)
    recorded = getattr(getattr(getattr(above, "image", None), "backing", None), "path", None)
    here = os.path.dirname(holder.filename)
    if recorded and (os.path.isabs(recorded)
                     or os.path.dirname(above.filename) == here):
        return recorded
    if ":" in target.filename.split("/", 1)[0]:
        return target.filename  # a protocol's name (sim:, memory:) is used as it is
    return os.path.relpath(target.filename, here or ".")

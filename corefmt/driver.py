"""What a format driver implements: a FormatDriver and the Image it opens.

Required Image methods are abstract here. Optional capabilities are plain
methods a driver may add; the block layer asks ``Image.supports`` (per open
image: a qcow2 v2 image has no zero clusters, a v3 one does) and emulates
what is missing where it can:

- ``write_zeroes(offset, length, unmap[, flags])``: without it, zeros are written.
- ``discard(offset, length)``: without it, discard does nothing.
- ``truncate(size)``: without it, resizing is refused.
- ``check(fix) -> CheckResult``, ``amend``, snapshots, bitmaps: see
  ``corefmt.capabilities``.
- ``set_backing(ref)``: rewrite the backing reference (rebase).
- ``prepare_write(offset, data, flags) -> callable``: do the part of a
  write that needs no lock now (qcow2 compresses there) and return what
  stores it; the block layer calls it from ``BlockNode.prepare_write``.

A method may also decline one request by raising ``NotSupported``; the
core then emulates it (zeros written, discard skipped) as if the method
did not exist.

Drivers written before request flags existed (``write(offset, data)``)
keep working: the core passes ``flags`` only to methods that take it.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from corefmt.capabilities import CheckResult
from corefmt.extents import Extent
from corefmt.limits import Limits
from corefmt.options import NoOptions
from corefmt.storage.base import Storage

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

__all__ = [
    "PROBE_CERTAIN", "PROBE_FALLBACK", "PROBE_NO", "BackingRef", "CheckResult",
    "CreateContext", "FormatDriver", "Image", "ImageContext", "has_capability",
]

#: Probe scores: the highest wins; raw answers the fallback score.
PROBE_NO = 0
PROBE_FALLBACK = 1
PROBE_CERTAIN = 100

#: Child roles a driver may open besides its ``file`` (DESIGN: node graph).
CHILD_DATA_FILE = "data_file"
CHILD_BACKING = "backing"


@attrs.frozen
class BackingRef:
    """A backing image reference: always a path plus (where recorded) a format.

    ``identity`` is the version of a remote backing (``Storage.version_token()``)
    when the reference was made: the core refuses the backing once it is
    another version. Formats that cannot record it leave it None (no check).
    """

    path: str
    format: str | None = None
    identity: str | None = None


def version_record(path: str, identity: str | None) -> bytes | None:
    """``BackingRef.identity`` as a format stores it: the backing name it is
    for, a NUL, the version. Tied to the name, so a record left behind by a
    tool that renamed the backing is stale, not evidence. None: no record."""
    if identity is None or not path:
        return None
    return path.encode() + b"\0" + identity.encode()


def recorded_version(record: bytes, path: str) -> str | None:
    """The version a ``version_record`` holds, if it was made for ``path``."""
    name, separator, identity = record.partition(b"\0")
    if not separator or name != path.encode():
        return None
    return identity.decode("utf-8", "replace")


def _no_child(role: str, path: str, **_: Any) -> Any:
    from corefmt.errors import CorefmtError

    raise CorefmtError(f"this image was opened without a node graph: cannot open its {role} "
                       f"'{path}'")


def _no_event(event: str) -> None:
    """Events go nowhere when no node is listening."""


@attrs.frozen
class ImageContext:
    """What an Image may use besides its storage.

    ``read_below(offset, length)`` returns the data the backing chain shows
    for a range (zeros where there is none): what a driver needs for the
    copy-on-write of a partial cluster, whatever the backing format is.
    ``open_child(role, path, format=None)`` opens another child of this
    image (``data_file``): a Storage when ``format`` is None, else a node of
    that format; the path resolves against the image's directory.
    ``emit(event)`` names a point in the driver's update sequence
    (``l2_update``, ``journal_write``...) for fault injection and tracing.
    ``options`` is the driver's open options (``FormatDriver.open_options``).
    ``probed`` says the user named no format and the registry guessed it.
    """

    path: str | None
    read_only: bool
    read_below: Callable[[int, int], bytes]
    options: Any = attrs.field(factory=NoOptions)
    open_child: Callable[..., Any] = _no_child
    emit: Callable[[str], None] = _no_event
    #: The format was probed, not given: raw then guards its first sector.
    probed: bool = False
    #: Opened by ``check``: repair nothing on your own at open (check will
    #: report it), and a read-write open for repair may take an image that is
    #: otherwise refused read-write (qemu's BDRV_O_CHECK).
    for_check: bool = False


@attrs.frozen
class CreateContext:
    """What ``FormatDriver.create`` may use besides its storage (optional
    ``context`` keyword argument: drivers that do not take it still work).

    ``backing`` is the opened backing chain, read-only (None without one):
    FVD records its size and searches it for zero regions; a format may take
    its size from it. ``create_child(role, path, format=None)`` creates a
    child (``data_file``) and returns it opened read-write, as
    ``open_child`` does.
    """

    path: str | None
    backing: BlockNode | None = None
    create_child: Callable[..., Any] = _no_child


class Image(abc.ABC):
    """An open image of one format, without its backing chain."""

    #: Bytes; what a guest sees.
    virtual_size: int
    #: The backing reference recorded in the image (None: no backing).
    backing: BackingRef | None = None
    #: Writes are split/merged to this alignment by the block layer.
    request_alignment: int = 1
    #: Allocation unit, if the format has one (reported by ``info``).
    cluster_size: int | None = None

    def __init__(self, storage: Storage, context: ImageContext):
        self.storage = storage
        self.context = context

    @abc.abstractmethod
    def block_status(self, offset: int, length: int) -> Extent:
        """The status of the run that starts at ``offset`` (length <= ``length``)."""

    @abc.abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> None:
        """Read a range this image reported as allocated data: inside one run
        of extents of one kind (neighbours merged), at most ``max_transfer``
        long. Reads are not aligned for the driver (only writes are): a
        driver whose storage needs alignment gets it from the storage."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write an aligned range inside the image (a driver may add a
        ``flags: RequestFlags`` keyword to see FUA, FILL, COMPRESSED)."""

    @property
    def limits(self) -> Limits:
        """Request limits; the default derives them from ``request_alignment``
        and ``cluster_size`` (copy-on-write happens per cluster)."""
        alignment = max(self.request_alignment, 1)
        granularity = max(self.cluster_size or alignment, alignment)
        return Limits(request_alignment=alignment, zeroes_alignment=alignment,
                      discard_alignment=alignment, copy_granularity=granularity)

    def supports(self, capability: str) -> bool:
        """Whether this open image has an optional capability; the default is
        whether the method exists (override to answer per image). One name is
        not a method: ``write_compressed``, answered True by a driver whose
        ``write`` stores data compressed when given RequestFlags.COMPRESSED."""
        return has_capability(self, capability)

    def has_zero_init(self) -> bool:
        """Whether a freshly created image reads as zeros everywhere
        (convert then skips writing zeros; qemu's bdrv_has_zero_init)."""
        return True

    @property
    def dirty(self) -> bool:
        """Whether the image was not closed cleanly (info's dirty-flag)."""
        return False

    def flush(self) -> None:
        """Make every completed write durable."""
        self.storage.flush()

    def close(self) -> None:
        """Write back what is cached and release the storage."""
        self.storage.close()

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``info`` (qemu-img's format-specific data)."""
        return {}


class FormatDriver(abc.ABC):
    """Creates, probes and opens images of one format."""

    name: str = ""
    #: attrs class of create options (validated at construction).
    create_options: type = NoOptions
    #: attrs class of open options (``--image-opts``/``json:`` keys, API ``options=``).
    open_options: type = NoOptions
    #: attrs class of ``amend`` options; None: the format cannot amend.
    amend_options: type | None = None
    #: Amend options that rename the backing image besides qemu's generic
    #: ``backing_file``/``backing_fmt`` (FVD's ``base_img``): amend then opens
    #: the image without its chain, so a moved backing can be named again.
    amend_backing_options: tuple[str, ...] = ()
    #: Whether images of this format can have a backing image.
    supports_backing: bool = False
    #: Whether the format records the backing file's format (qcow v1 cannot:
    #: then ``create -b`` needs no ``-F`` and the backing is probed on open).
    records_backing_format: bool = True
    #: Whether the format can store data compressed (``convert -c`` refuses
    #: other formats before it creates anything; an image may still decline
    #: one, through ``Image.supports("write_compressed")``).
    supports_compression: bool = False
    #: ``-o`` option strings ``corefmt stress --matrix`` tests the format with
    #: ("" = defaults); a driver lists the variants worth racing and crashing.
    stress_option_sets: tuple[str, ...] = ("",)

    def probe(self, head: bytes, path: str | None) -> int:
        """How sure this driver is that ``head`` starts one of its images."""
        return PROBE_NO

    @abc.abstractmethod
    def create(self, storage: Storage, size: int, options: Any,
               backing: BackingRef | None) -> None:
        """Lay out a new, empty image of ``size`` bytes on ``storage`` (a driver
        may add a ``context: CreateContext`` keyword)."""

    @abc.abstractmethod
    def open(self, storage: Storage, context: ImageContext) -> Image:
        """Open an existing image; raise ImageError for anything impossible."""


def has_capability(image: Any, name: str) -> bool:
    """Whether an image implements an optional method."""
    return callable(getattr(image, name, None))


def supports(image: Any, name: str) -> bool:
    """``image.supports(name)`` for Images, the method test for anything else."""
    answer = getattr(image, "supports", None)
    return bool(answer(name)) if callable(answer) else has_capability(image, name)


@functools.lru_cache(maxsize=1024)
def _parameters_of(function: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return (), True
    names = tuple(name for name, parameter in signature.parameters.items()
                  if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                  and name != "self")
    takes_any = any(parameter.kind is parameter.VAR_KEYWORD
                    for parameter in signature.parameters.values())
    return names, takes_any


def parameter_names(method: Callable[..., Any]) -> tuple[str, ...]:
    """A (bound) method's parameter names, worked out once per function."""
    return _parameters_of(getattr(method, "__func__", method))[0]


def accepts_keyword(method: Callable[..., Any], name: str) -> bool:
    """Whether a driver method takes keyword ``name`` (newer contract) or not."""
    names, takes_any = _parameters_of(getattr(method, "__func__", method))
    return takes_any or name in names


def declares_keyword(method: Callable[..., Any], name: str) -> bool:
    """Whether a method names keyword ``name`` itself: for keywords only some
    drivers know, which a wrapper taking ``**kwargs`` would pass on to one
    that does not."""
    names, _ = _parameters_of(getattr(method, "__func__", method))
    return name in names

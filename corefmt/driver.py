"""What a format driver implements: a FormatDriver and the Image it opens.

Required Image methods are abstract here. Optional capabilities are plain
methods a driver may add; the block layer discovers them with
``has_capability`` and emulates what is missing where it can:

- ``write_zeroes(offset, length, unmap)``: without it, zeros are written.
- ``discard(offset, length)``: without it, discard does nothing.
- ``truncate(size)``: without it, resizing is refused.
- ``check(repair) -> CheckResult``: consistency check.
- ``set_backing(ref)``: rewrite the backing reference (rebase).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import attrs

from corefmt.extents import Extent
from corefmt.options import NoOptions
from corefmt.storage.base import Storage

#: Probe scores: the highest wins; raw answers the fallback score.
PROBE_NO = 0
PROBE_FALLBACK = 1
PROBE_CERTAIN = 100


@attrs.frozen
class BackingRef:
    """A backing image reference: always a path plus (where recorded) a format."""

    path: str
    format: str | None = None


@attrs.frozen
class ImageContext:
    """What an Image may use besides its storage.

    ``read_below(offset, length)`` returns the data the backing chain shows
    for a range (zeros where there is none): what a driver needs for the
    copy-on-write of a partial cluster, whatever the backing format is.
    """

    path: str | None
    read_only: bool
    read_below: Callable[[int, int], bytes]


@attrs.define
class CheckResult:
    """What a consistency check found (qemu-img check's categories)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: list[str] = attrs.field(factory=list)

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.check_errors == 0


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
        """Read a range this image reported as allocated data."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write an aligned range inside the image."""

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
    #: Whether images of this format can have a backing image.
    supports_backing: bool = False
    #: ``-o`` option strings ``corefmt stress --matrix`` tests the format with
    #: ("" = defaults); a driver lists the variants worth racing and crashing.
    stress_option_sets: tuple[str, ...] = ("",)

    def probe(self, head: bytes, path: str | None) -> int:
        """How sure this driver is that ``head`` starts one of its images."""
        return PROBE_NO

    @abc.abstractmethod
    def create(self, storage: Storage, size: int, options: Any,
               backing: BackingRef | None) -> None:
        """Lay out a new, empty image of ``size`` bytes on ``storage``."""

    @abc.abstractmethod
    def open(self, storage: Storage, context: ImageContext) -> Image:
        """Open an existing image; raise ImageError for anything impossible."""


def has_capability(image: Image, name: str) -> bool:
    """Whether an image implements an optional method."""
    return callable(getattr(image, name, None))

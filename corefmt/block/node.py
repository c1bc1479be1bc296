"""BlockNode: one node of a block graph, and the request interface every
node has (image nodes here, filter nodes in ``filter_node``).

A node has named children, as in QEMU's graph: ``file`` (the Storage an
image lives on), ``backing`` (the node below it in the chain), ``data_file``
(an external data file: a Storage or a node of any format) and, for a
filter, ``filtered``. The node, not the driver, owns the chain: reads are
split by merged block status, and a range that a lower layer holds is read
through that layer's own request path (its tracked requests, hooks and the
filters on the edge), never from its Image directly.
"""

from __future__ import annotations

import abc
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from corefmt.block.tracked import RequestTracker
from corefmt.errors import CorefmtError, RangeError, ReadOnlyError
from corefmt.extents import ChainExtent, Extent
from corefmt.flags import RequestFlags
from corefmt.limits import Limits

if TYPE_CHECKING:
    import pluggy

    from corefmt.block.status_cache import ChainStatusCache
    from corefmt.fileview import ImageIO
    from corefmt.storage.base import Storage

#: Child roles (QEMU's names).
ROLE_FILE = "file"
ROLE_BACKING = "backing"
ROLE_DATA_FILE = "data_file"
ROLE_FILTERED = "filtered"
#: truncate's default: the grown part is neither reserved nor written (qemu's
#: PREALLOC_MODE_OFF); "metadata", "falloc" and "full" where a format has them.
PREALLOCATION_OFF = "off"


class BlockNode(abc.ABC):
    """A node of the graph; the Python API's image object.

    Subclasses implement the requests; this base holds the graph, range
    checks, hooks and lifetime.
    """

    _tracker: RequestTracker
    _status_cache: ChainStatusCache | None = None

    def __init__(self, *, filename: str, read_only: bool,
                 hooks: pluggy.HookRelay | None = None, node_name: str | None = None):
        self.filename = filename
        self.read_only = read_only
        self.node_name = node_name
        self.children: dict[str, BlockNode | Storage] = {}
        self._hooks = hooks
        self._tracker = RequestTracker()
        self._overlays: weakref.WeakSet[BlockNode] = weakref.WeakSet()
        self._closed = False
        self._close_lock = threading.Lock()
        #: Bumped whenever what this node's merged status shows may have
        #: changed (here or below); cached status is valid for one generation.
        self.status_generation = 0

    # -- graph ------------------------------------------------------------------
    @property
    def backing(self) -> BlockNode | None:
        """The node below this one (possibly a filter over the next layer)."""
        child = self.children.get(ROLE_BACKING)
        return child if isinstance(child, BlockNode) else None

    def set_backing(self, backing: BlockNode | None) -> None:
        previous = self.backing
        if previous is not None:
            previous._overlays.discard(self)
        if backing is None:
            self.children.pop(ROLE_BACKING, None)
        else:
            self.children[ROLE_BACKING] = backing
            backing._overlays.add(self)
        if previous is not None:
            # Only a re-pointed chain can have cached status that depends on it.
            self._invalidate_status()

    def add_child(self, role: str, child: BlockNode | Storage) -> None:
        if role in self.children:
            raise CorefmtError(f"{self.filename}: already has a {role} child")
        self.children[role] = child
        if isinstance(child, BlockNode):
            child._overlays.add(self)

    def layer(self) -> BlockNode:
        """The image node this node shows (filters are not layers)."""
        return self

    def chain(self) -> list[BlockNode]:
        """The image layers from this node down, top first (filters skipped)."""
        nodes: list[BlockNode] = []
        node: BlockNode | None = self.layer()
        while node is not None:
            nodes.append(node)
            below = node.backing
            node = below.layer() if below is not None else None
        return nodes

    def graph_nodes(self) -> Iterator[BlockNode]:
        """Every node reachable from here (children before... any order), once."""
        seen: set[int] = set()
        pending: list[BlockNode] = [self]
        while pending:
            node = pending.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            pending.extend(child for child in node.children.values()
                           if isinstance(child, BlockNode))

    @property
    def format_name(self) -> str:
        """The format of the image this node shows."""
        return self.layer().driver_name

    @property
    @abc.abstractmethod
    def driver_name(self) -> str:
        """This node's own driver: a format or a filter (qemu's ``driver``)."""

    @property
    @abc.abstractmethod
    def virtual_size(self) -> int: ...

    @property
    def limits(self) -> Limits:
        return Limits()

    @property
    def request_alignment(self) -> int:
        return self.limits.request_alignment

    def _invalidate_status(self) -> None:
        """A change here: cached status here and in every node above is stale
        (a new generation; nothing computed before it is inserted after)."""
        self.status_generation += 1
        if not self._overlays:  # the top of a chain: nothing above (every write)
            return
        self.status_generation -= 1  # the walk below counts this node once
        pending: list[BlockNode] = [self]
        seen: set[int] = set()
        while pending:
            node = pending.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            node.status_generation += 1
            pending.extend(node._overlays)

    # -- requests (subclasses) ------------------------------------------------
    def own_status(self, offset: int, length: int) -> list[Extent]:
        return self.layer().own_status(offset, length)

    @abc.abstractmethod
    def block_status(self, offset: int, length: int) -> list[ChainExtent]:
        ...

    @abc.abstractmethod
    def readinto(self, offset: int, buf: bytearray | memoryview,
                 flags: RequestFlags = RequestFlags.NONE) -> None:
        ...

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              flags: RequestFlags = RequestFlags.NONE) -> None:
        ...

    def prepare_write(self, offset: int, data: bytes | bytearray | memoryview,
                      flags: RequestFlags = RequestFlags.NONE) -> Callable[[], None]:
        """Split a write into the work that needs no lock and the rest: the
        first is done now, on the caller's thread; the returned callable
        does the rest. convert -c compresses on all its workers this way and
        stores the clusters in guest order. By default nothing is prepared:
        the callable is the whole write."""
        return functools.partial(self.write, offset, data, flags)

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     flags: RequestFlags = RequestFlags.NONE) -> None:
        ...

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        ...

    @abc.abstractmethod
    def flush(self) -> None:
        ...

    @abc.abstractmethod
    def truncate(self, size: int, preallocation: str = PREALLOCATION_OFF) -> None:
        """Set the virtual size; ``preallocation`` as qemu's for the grown part."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def read_below(self, offset: int, length: int) -> bytes:
        """What the chain below this layer holds (zeros where nothing does)."""
        buf = bytearray(length)
        below = self.layer().backing
        if below is not None:
            available = max(0, min(offset + length, below.virtual_size) - offset)
            if available:
                below.readinto(offset, memoryview(buf)[:available])
        return bytes(buf)

    def block_status_above(self, base: BlockNode | None, offset: int, length: int
                           ) -> list[ChainExtent]:
        """Status over the layers above ``base`` (see ImageNode)."""
        return self.layer().block_status_above(base, offset, length)

    def is_allocated_above(self, base: BlockNode | None, offset: int, length: int
                           ) -> list[tuple[int, int, bool]]:
        return self.layer().is_allocated_above(base, offset, length)

    def reopen(self, read_only: bool) -> None:
        """Switch this node, the filters below it and the layer it shows to
        read-only or read-write."""
        layer = self.layer()
        layer.reopen(read_only)
        node: BlockNode = self
        while node is not layer:  # each filter on the way down
            node.read_only = read_only
            node = node.children[ROLE_FILTERED]  # type: ignore[assignment]

    def copy_up(self, offset: int, length: int, data: bytes | memoryview | None = None) -> int:
        """Copy what the chain below holds into this layer where it is still
        unallocated (copy-on-read, prefetch); returns the bytes written."""
        return self.layer().copy_up(offset, length, data)

    def persist_fills(self) -> None:
        """Make the fills so far durable (see ImageNode)."""
        self.layer().persist_fills()

    def mark_self_contained(self) -> bool:
        """Record that the layer holds all its data (see ImageNode)."""
        return self.layer().mark_self_contained()

    # -- checks -----------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise RangeError(f"{self.filename}: negative offset or length ({offset}, {length})")
        size = self.virtual_size
        if offset + length > size:
            raise RangeError(
                f"{self.filename}: request at offset {offset} length {length} is beyond "
                f"the end of the image ({size} bytes)"
            )

    def _observe(self, operation: str, offset: int, length: int) -> None:
        hooks = self._hooks
        if hooks is not None and hooks.corefmt_observe_request.get_hookimpls():
            hooks.corefmt_observe_request(node=self, operation=operation,
                                          offset=offset, length=length)

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Close this node and every node below it (flushing writable ones)."""
        first_error: BaseException | None = None
        for node in list(self.graph_nodes()):
            try:
                node._close_one()
            except BaseException as error:  # close the rest, then report the first
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def _close_one(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._tracker.wait_idle()  # requests in flight finish first
            self._closed = True
        self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Free what this node holds itself (children are closed separately)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def io(self) -> ImageIO:
        """A file-like (io.RawIOBase) view of the guest-visible bytes."""
        from corefmt.fileview import ImageIO

        return ImageIO(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.driver_name} {self.filename!r}>"

"""The ``sim`` storage driver: a simulated disk for stress, race and crash tests.

A ``SimDisk`` holds durable bytes plus a volatile write cache (the writes
since the last flush, in completion order). A fault policy, consulted on
every request, may fail it with an errno (EIO, ENOSPC), tear a write at a
sector boundary, or cut the power. A power cut keeps, for every sector, one
of the states it went through since the last flush (a seed chooses which):
the weakest ordering a disk with a volatile cache allows, so format drivers
that rely on unflushed ordering are caught.

A failed flush either fails before touching the cache (a later flush saves
everything) or, as a failed fsync may on Linux, drops the dirty data: each
sector it held keeps one of its states since the last flush on the medium
and is marked clean, so no later flush writes it (the page cache still
serves it to reads). Since nothing can say which writes were lost, a
``SimStorage`` then fails every later flush of that open (qemu's answer to
the same problem: no flush may claim durability for data that is gone).

Concurrent requests complete in another order than they were issued when a
``gate`` is installed: every request first waits there, and a scheduler
(the stress runner's) decides which waiting request completes next. The
request takes effect only once through the gate, so the order is the
scheduler's, not the OS's.

Paths look like ``sim:NAME``; requests are attributed to whatever tag the
calling thread set with ``request_tag`` (the stress runner tags each
workload operation), so faults hit chosen operations whatever the thread
interleaving.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from corefmt.errors import CorefmtError, StorageError
from corefmt.storage.base import Storage, StorageDriver

PREFIX = "sim:"
SECTOR_SIZE = 512
#: Tag of requests made outside any ``request_tag`` block.
NO_TAG = -1
#: Request kinds that carry data and so can be torn.
_WRITE_KINDS = frozenset({"write", "zero", "discard"})

_local = threading.local()


@contextlib.contextmanager
def request_tag(tag: int) -> Iterator[None]:
    """Attribute the storage requests this thread makes to ``tag``."""
    previous = getattr(_local, "tag", NO_TAG)
    _local.tag = tag
    try:
        yield
    finally:
        _local.tag = previous


def current_tag() -> int:
    return getattr(_local, "tag", NO_TAG)


@attrs.frozen
class SimRequest:
    """One storage request as the fault policy sees it."""

    disk: str
    kind: str  # read, write, zero, truncate, flush
    offset: int
    length: int
    tag: int
    #: How many requests this tag made on this disk before (0 = its first).
    index: int


@attrs.frozen
class SimFault:
    """What the policy wants done to one request."""

    #: Fail the request with this errno (after applying ``tear_sectors``).
    error: int | None = None
    #: For a failing write: how many of its leading sectors still land.
    tear_sectors: int = 0
    #: Cut the power before this request; the value seeds the crash choice.
    power_cut: int | None = None
    #: For a failing flush: drop the dirty data (the value seeds which sector
    #: states reach the medium) instead of leaving the cache as it was.
    drop_cache: int | None = None


FaultPolicy = Callable[[SimRequest], SimFault | None]
#: Called with the request's kind before every request; returns when it may complete.
RequestGate = Callable[[str], None]


@attrs.define
class _CachedOp:
    """One unflushed change: a write (``data``) or a resize (``data`` None).

    A write keeps the whole sectors it touched as they were just after it
    (a page cache writes back pages, not bytes), so replaying the cache onto
    a medium that lost earlier writes gives only states the sectors had.
    """

    offset: int
    data: bytes | None
    size_after: int


class SimDisk:
    """A simulated device: durable bytes, a volatile cache, a fault policy."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.durable = bytearray()
        self.current = bytearray()
        self.cache: list[_CachedOp] = []
        self.policy: FaultPolicy | None = None
        self.gate: RequestGate | None = None
        self.alignment = SECTOR_SIZE
        self.dead = False
        self.crash_image: bytearray | None = None
        self.errors_injected = 0
        #: Tags of the requests that failed on purpose (policy or lost data).
        self.injected_tags: set[int] = set()
        #: Failed flushes that dropped the dirty data (see the module docstring).
        self.cache_drops = 0
        self.requests = 0
        self._per_tag: dict[int, int] = {}

    # -- requests ---------------------------------------------------------------------
    def _begin(self, kind: str, offset: int, length: int) -> SimFault | None:
        """Pass the gate; consult the policy; cut the power; raise if the disk is gone."""
        gate = self.gate
        if gate is not None:
            gate(kind)
        tag = current_tag()
        with self.lock:
            if self.dead:
                raise OSError(errno.EIO, "simulated device lost power")
            index = self._per_tag.get(tag, 0)
            self._per_tag[tag] = index + 1
            self.requests += 1
        policy = self.policy
        fault = policy(SimRequest(self.name, kind, offset, length, tag, index)) if policy else None
        if fault is None:
            return None
        if fault.power_cut is not None:
            self.power_cut(random.Random(fault.power_cut))
            raise OSError(errno.EIO, "simulated power cut")
        if fault.error is not None and kind not in _WRITE_KINDS:
            if kind == "flush" and fault.drop_cache is not None:
                self._drop_cache(random.Random(fault.drop_cache))
            self._inject(fault.error)
        return fault

    def _inject(self, error: int, message: str | None = None) -> None:
        with self.lock:
            self.errors_injected += 1
            self.injected_tags.add(current_tag())
        raise OSError(error, message or os.strerror(error))

    def _drop_cache(self, rng: random.Random) -> None:
        """A failed fsync: the dirty data is marked clean, some of it on the medium."""
        with self.lock:
            self.durable = surviving_content(self.durable, self.cache, rng)
            self.cache.clear()
            self.cache_drops += 1

    def read(self, offset: int, buf: memoryview) -> None:
        self._begin("read", offset, len(buf))
        with self.lock:
            self._check_alive()
            data = self.current
            available = max(0, min(len(buf), len(data) - offset))
            buf[:available] = data[offset:offset + available]
        if available < len(buf):
            buf[available:] = bytes(len(buf) - available)

    def write(self, offset: int, data: bytes, kind: str = "write") -> None:
        fault = self._begin(kind, offset, len(data))
        if fault is not None and fault.error is not None:
            torn = self._torn_length(offset, len(data), fault.tear_sectors)
            if torn:
                self._apply_write(offset, data[:torn])
            self._inject(fault.error)
        self._apply_write(offset, data)

    @staticmethod
    def _torn_length(offset: int, length: int, sectors: int) -> int:
        """Bytes of a write up to its ``sectors``-th sector boundary."""
        if sectors <= 0:
            return 0
        boundary = (offset // SECTOR_SIZE + sectors) * SECTOR_SIZE
        return max(0, min(length, boundary - offset))

    def _apply_write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self._check_alive()
            end = offset + len(data)
            if end > len(self.current):
                self.current.extend(bytes(end - len(self.current)))
            self.current[offset:end] = data
            first = offset - offset % SECTOR_SIZE
            last = min(-(-end // SECTOR_SIZE) * SECTOR_SIZE, len(self.current))
            self.cache.append(_CachedOp(first, bytes(self.current[first:last]),
                                        len(self.current)))

    def truncate(self, size: int) -> None:
        self._begin("truncate", size, 0)
        with self.lock:
            self._check_alive()
            old = len(self.current)
            if size < old:
                del self.current[size:]
            else:
                self.current.extend(bytes(size - old))
            self.cache.append(_CachedOp(min(size, old), None, size))

    def grow(self, size: int) -> int:
        """Extend to ``size`` if shorter, in one step with respect to writes
        (which extend under the same lock): a write past ``size`` landing
        between a size check and a truncate would be cut off. The size before."""
        self._begin("truncate", size, 0)
        with self.lock:
            self._check_alive()
            old = len(self.current)
            if size > old:
                self.current.extend(bytes(size - old))
                self.cache.append(_CachedOp(old, None, size))
            return old

    def flush(self, drops_seen: int | None = None) -> None:
        """Write the cache back; with ``drops_seen`` (the opener's count of
        dropped caches), fail if a flush dropped the cache since."""
        self._begin("flush", 0, 0)
        with self.lock:
            self._check_alive()
            lost = drops_seen is not None and drops_seen != self.cache_drops
            if not lost:
                # Only dirty sectors are written: data a failed flush dropped stays lost.
                self.durable = _replay(self.durable, self.cache)
                self.cache.clear()
        if lost:
            self._inject(errno.EIO, "an earlier flush failed and dropped unwritten data")

    def _check_alive(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "simulated device lost power")

    # -- harness ----------------------------------------------------------------------
    def sync(self) -> None:
        """Make everything durable without going through the policy."""
        with self.lock:
            self.durable = bytearray(self.current)
            self.cache.clear()

    def size(self) -> int:
        with self.lock:
            return len(self.current)

    def power_cut(self, rng: random.Random) -> bytearray:
        """Lose power now: later requests fail; ``crash_image`` is what survives."""
        with self.lock:
            if self.dead and self.crash_image is not None:
                return self.crash_image
            self.dead = True
            self.crash_image = surviving_content(self.durable, self.cache, rng)
            return self.crash_image

    def restore(self, content: bytes) -> None:
        """Power back on with ``content`` as the whole (durable) disk."""
        with self.lock:
            self.durable = bytearray(content)
            self.current = bytearray(content)
            self.cache.clear()
            self.dead = False
            self.crash_image = None
            self._per_tag.clear()


def _replay(durable: bytearray, cache: list[_CachedOp]) -> bytearray:
    """The medium after writing back the cache (equal to the current bytes
    unless a failed flush dropped dirty data), written back in place: no
    copy of the whole medium per flush (FVD grows storage by 100 MiB)."""
    result = durable
    for op in cache:
        if op.data is not None:
            end = op.offset + len(op.data)
            if end > len(result):
                result.extend(bytes(end - len(result)))
            result[op.offset:end] = op.data
        if op.size_after < len(result):
            del result[op.size_after:]
        else:
            result.extend(bytes(op.size_after - len(result)))
    return result


def _op_sectors(op: _CachedOp, width: int) -> range:
    """Sectors an unflushed op changes (a shrink zeroes what it cuts off)."""
    end = op.offset + len(op.data) if op.data is not None else max(op.offset, width)
    if end <= op.offset:
        return range(0)
    return range(op.offset // SECTOR_SIZE, -(-end // SECTOR_SIZE))


def surviving_content(durable: bytes, cache: list[_CachedOp], rng: random.Random) -> bytearray:
    """Durable bytes plus, per sector, one seed-chosen state from the cache.

    Every sector independently ends in its durable state or in the state
    after any one of the unflushed ops that touched it: writes are kept,
    dropped, torn at sector boundaries and reordered in every way a
    volatile cache allows. The size is one of the sizes the disk had.
    """
    width = max([len(durable), *(op.size_after for op in cache),
                 *(op.offset + len(op.data) for op in cache if op.data is not None)])
    width = -(-width // SECTOR_SIZE) * SECTOR_SIZE
    touched: dict[int, int] = {}
    for op in cache:
        for sector in _op_sectors(op, width):
            touched[sector] = touched.get(sector, 0) + 1
    target = {sector: rng.randint(0, count) for sector, count in touched.items()}
    work = bytearray(durable) + bytes(width - len(durable))
    result = bytearray(work)
    seen: dict[int, int] = {}
    live_size = len(durable)
    for op in cache:
        if op.data is not None:
            work[op.offset:op.offset + len(op.data)] = op.data
        else:
            work[op.offset:] = bytes(width - op.offset)
        live_size = op.size_after
        for sector in _op_sectors(op, width):
            seen[sector] = seen.get(sector, 0) + 1
            if seen[sector] == target[sector]:
                start = sector * SECTOR_SIZE
                result[start:start + SECTOR_SIZE] = work[start:start + SECTOR_SIZE]
    sizes = [len(durable), *(op.size_after for op in cache)]
    size = sizes[rng.randrange(len(sizes))] if cache else live_size
    del result[size:]
    return result


class SimStorage(Storage):
    """One open of a SimDisk; errors surface as StorageError like a real file."""

    def __init__(self, path: str, disk: SimDisk, read_only: bool):
        super().__init__(path, read_only)
        self.disk = disk
        self.request_alignment = disk.alignment
        #: Dropped caches seen at open: a later drop fails this open's flushes.
        self._drops_at_open = disk.cache_drops

    def _call(self, operation: str, function: Callable[..., Any], *args: object) -> Any:
        try:
            return function(*args)
        except OSError as error:
            raise StorageError(self.path, operation, error) from error

    def size(self) -> int:
        return self.disk.size()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self._call("read", self.disk.read, offset, memoryview(buf).cast("B"))

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        self._call("write", self.disk.write, offset, bytes(data))

    def _truncate(self, size: int) -> None:
        self._call("truncate", self.disk.truncate, size)

    def _grow(self, size: int) -> int:
        return self._call("truncate", self.disk.grow, size)

    def _zero_range(self, offset: int, length: int) -> bool:
        self._call("write_zeroes", self.disk.write, offset, bytes(length), "zero")
        return True

    def _punch_hole(self, offset: int, length: int) -> bool:
        self._call("discard", self.disk.write, offset, bytes(length), "discard")
        return True

    def zero_before_write(self, offset: int, length: int) -> bool:
        """A zeroing the disk caches, tears and fails like any write (so power
        cuts and injected errors reach it); past the end nothing, the size
        kept, as fallocate's KEEP_SIZE."""
        self._check_writable()
        inside = min(offset + length, self.disk.size()) - offset
        if inside > 0:
            self._call("write_zeroes", self.disk.write, offset, bytes(inside), "zero")
        return True

    def flush(self) -> None:
        if not self.read_only:
            self._call("flush", self.disk.flush, self._drops_at_open)

    def allocated_size(self) -> int | None:
        return self.disk.size()


class SimStorageDriver(StorageDriver):
    """Opens ``sim:NAME`` disks; the stress runner reaches them through ``disk``."""

    name = "sim"
    prefix = PREFIX

    def __init__(self) -> None:
        self._disks: dict[str, SimDisk] = {}
        self._lock = threading.Lock()

    def disk(self, path: str) -> SimDisk:
        with self._lock:
            found = self._disks.get(path)
        if found is None:
            raise CorefmtError(f"Could not open '{path}': No such simulated disk")
        return found

    def open(self, path: str, *, read_only: bool, direct: bool = False) -> SimStorage:
        return SimStorage(path, self.disk(path), read_only)

    def create(self, path: str) -> SimStorage:
        with self._lock:
            disk = self._disks.setdefault(path, SimDisk(path))
        disk.restore(b"")
        return SimStorage(path, disk, False)

    def exists(self, path: str) -> bool:
        with self._lock:
            return path in self._disks

    def forget(self, path: str) -> None:
        with self._lock:
            self._disks.pop(path, None)

    def names(self, prefix: str) -> list[str]:
        """Disks whose names start with ``prefix`` (an image and its data files)."""
        with self._lock:
            return sorted(name for name in self._disks if name.startswith(prefix))

    def resolve(self, path: str, relative_to: str | None) -> str:
        """A relative name resolves in the directory of the disk naming it,
        as files do: names are flat, a ``/`` in one makes the directory
        (``data`` of ``sim:run/top`` is ``sim:run/data``)."""
        if path.startswith(PREFIX):
            return path
        if relative_to and relative_to.startswith(PREFIX) and "/" in relative_to:
            return relative_to[:relative_to.rindex("/") + 1] + path
        return PREFIX + path

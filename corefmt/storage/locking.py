"""Image locking: the OFD byte-range locks QEMU's file-posix driver takes.

Why these exact bytes: qemu (and libvirt) decide whether two users of one
image may coexist by them, so taking the same ones makes corefmt and qemu
refuse each other exactly as two qemu processes do. Every user holds a read
lock on byte ``PERM_BASE + bit`` for each permission it uses, and on byte
``SHARED_BASE + bit`` for each it does *not* share; an open is refused when
another open file description holds the shared byte of a permission it
wants, or the permission byte of one it will not share (QEMU tests this by
asking whether a write lock could be taken: F_OFD_GETLK with F_WRLCK).

Which permissions (measured on qemu-io/qemu-img 7.2 with /proc/locks):

* a passthrough format (raw): consistent read, plus write if read-write;
  everything shared. A raw window (``offset``/``size``) also unshares resize.
* a format with metadata: consistent read, plus write and resize if
  read-write; write and resize are never shared.
* force-share (-U), read-only only: consistent read, everything shared.
* a file being created (qemu's raw_co_create): write and resize, resize
  unshared, taken before the file is truncated.

Locks belong to open file descriptions, so closing the storage's descriptor
releases them. Only local files (FileStorage) are locked; a kernel without
OFD locks means no locking (qemu's ``locking=auto``).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import errno
import fcntl
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from corefmt.errors import CorefmtError
from corefmt.storage.base import Storage, StorageDriver
from corefmt.storage.file import FileStorage, FileStorageDriver

#: Linux fcntl commands for open-file-description locks.
F_OFD_GETLK = 36
F_OFD_SETLK = 37
#: struct flock (64-bit Linux): l_type, l_whence, l_start, l_len, l_pid, padding.
FLOCK = struct.Struct("@hhqqi4x")
#: qemu's RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE (libvirt owns byte 0).
PERM_BASE = 100
SHARED_BASE = 200
#: qemu's hint after a refused lock.
IN_USE_HINT = "Is another process using the image [{path}]?"
#: Formats whose file is the disk itself (qemu's BDRV_CHILD_FILTERED child).
PASSTHROUGH_FORMATS = frozenset({"raw"})
#: errnos meaning the kernel or file system has no OFD locks.
_NO_OFD_LOCKS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class Perm(enum.IntFlag):
    """qemu's BLK_PERM_* bits; bit i is lock byte BASE + i."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
#: qemu's bdrv_perm_names, in bit order (the order qemu checks them in).
PERM_NAMES: dict[Perm, str] = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


@attrs.frozen
class Permissions:
    """What a user of an image does (``perm``) and lets others do (``shared``)."""

    perm: Perm
    shared: Perm

    @property
    def unshared(self) -> Perm:
        return PERM_ALL & ~self.shared

    def covers(self, other: Permissions) -> bool:
        """Whether holding these locks already excludes all ``other`` excludes."""
        return (other.perm & ~self.perm) == 0 and (other.unshared & ~self.unshared) == 0

    def union(self, other: Permissions) -> Permissions:
        return Permissions(self.perm | other.perm, self.shared & other.shared)


FORCE_SHARE = Permissions(Perm.CONSISTENT_READ, PERM_ALL)
CREATE = Permissions(Perm.WRITE | Perm.RESIZE, PERM_ALL & ~Perm.RESIZE)
NOTHING = Permissions(Perm(0), PERM_ALL)


class ImageLockError(CorefmtError):
    """Another process uses the image in a way this open cannot coexist with."""


def image_permissions(driver: Any, options: Any, read_only: bool) -> Permissions:
    """What an image node asks of its file: qemu-io's (its BlockBackend
    shares everything, so the format's rules for its file child decide)."""
    writing = Perm(0) if read_only else Perm.WRITE
    if driver.name in PASSTHROUGH_FORMATS:
        windowed = getattr(options, "offset", 0) or getattr(options, "size", None) is not None
        shared = PERM_ALL & ~Perm.RESIZE if windowed else PERM_ALL
        return Permissions(Perm.CONSISTENT_READ | writing, shared)
    resizing = Perm(0) if read_only else Perm.RESIZE
    return Permissions(Perm.CONSISTENT_READ | writing | resizing,
                       PERM_ALL & ~(Perm.WRITE | Perm.RESIZE))


# -- the fcntl calls ----------------------------------------------------------------
def _flock(fd: int, command: int, lock_type: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel wrote back."""
    request = FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0)
    answer = fcntl.fcntl(fd, command, request)
    return FLOCK.unpack(answer)[0]


def _bytes(perms: Permissions) -> set[int]:
    held = {PERM_BASE + bit for bit in range(len(PERM_NAMES)) if perms.perm & (1 << bit)}
    held |= {SHARED_BASE + bit for bit in range(len(PERM_NAMES)) if perms.unshared & (1 << bit)}
    return held


def _apply(fd: int, path: str, old: Permissions, new: Permissions) -> None:
    """Lock the bytes ``new`` needs and unlock those only ``old`` had."""
    old_bytes, new_bytes = _bytes(old), _bytes(new)
    for byte in sorted(new_bytes - old_bytes):
        try:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
        except OSError as error:
            detail = "" if error.errno in (errno.EAGAIN, errno.EACCES) else f": {error.strerror}"
            raise CorefmtError(f"{path}: Failed to lock byte {byte}{detail}") from error
    for byte in sorted(old_bytes - new_bytes):
        with contextlib.suppress(OSError):  # unlocking cannot conflict
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)


def _taken_elsewhere(fd: int, byte: int) -> str | None:
    """Whether another open file description holds a lock on ``byte``: ""
    if so, the reason if the kernel could not tell, else None."""
    try:
        taken = _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
    except OSError as error:
        return f": {error.strerror}"
    return "" if taken else None


def _conflict(fd: int, wanted: Permissions) -> str | None:
    """qemu's raw_check_lock_bytes: the first refusal, or None."""
    for bit, name in PERM_NAMES.items():
        if wanted.perm & bit:
            why = _taken_elsewhere(fd, SHARED_BASE + bit.bit_length() - 1)
            if why is not None:
                return f'Failed to get "{name}" lock{why}'
    for bit, name in PERM_NAMES.items():
        if wanted.unshared & bit:
            why = _taken_elsewhere(fd, PERM_BASE + bit.bit_length() - 1)
            if why is not None:
                return f'Failed to get shared "{name}" lock{why}'
    return None


def _ofd_locks_work(fd: int) -> bool:
    """False where the kernel has no OFD locks; other errors show when the
    locks are taken (as qemu's "Failed to lock byte")."""
    try:
        _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, 0)
    except OSError as error:
        return error.errno not in _NO_OFD_LOCKS
    return True


def _acquire(fd: int, path: str, old: Permissions, new: Permissions, prefix: str) -> None:
    """Take ``new`` (from ``old``) on ``fd`` and check it; on a conflict put
    ``old`` back and raise qemu's message."""
    _apply(fd, path, old, old.union(new))
    refusal = _conflict(fd, new)
    if refusal is None:
        _apply(fd, path, old.union(new), new)
        return
    _apply(fd, path, old.union(new), old)
    raise ImageLockError(f"{prefix}{refusal}. {IN_USE_HINT.format(path=path)}")


# -- locks of open storages -----------------------------------------------------------
@attrs.define(eq=False)
class FileLock:
    """The lock bytes one FileStorage's descriptor holds. It refers to the
    storage weakly: it is the value of a weak-keyed map keyed by it."""

    storage_ref: weakref.ref[FileStorage]
    force_share: bool
    held: Permissions = NOTHING

    @property
    def fd(self) -> int:
        """The descriptor, or -1 once the storage is closed or gone."""
        storage = self.storage_ref()
        return -1 if storage is None else storage.fd

    @property
    def path(self) -> str:
        storage = self.storage_ref()
        return (storage.path if storage is not None else None) or ""

    def wanted(self, permissions: Permissions, read_only: bool) -> Permissions:
        return FORCE_SHARE if self.force_share and read_only else permissions

    def file_id(self) -> tuple[int, int]:
        info = os.fstat(self.fd)
        return info.st_dev, info.st_ino


#: Storages (and storage filters over them) whose locks corefmt manages.
_locks: weakref.WeakKeyDictionary[Storage, FileLock] = weakref.WeakKeyDictionary()


def track(storage: Storage, *, force_share: bool, inner: Storage | None = None) -> None:
    """Manage ``storage``'s locks (a local file, or a filter over ``inner``).
    Nothing is locked yet: the format node decides what it needs."""
    if inner is not None:
        lock = _lock_of(inner)
        if lock is not None:
            with contextlib.suppress(TypeError):  # an unhashable filter: unlocked
                _locks[storage] = lock
        return
    if isinstance(storage, FileStorage) and _ofd_locks_work(storage.fd):
        _locks[storage] = FileLock(weakref.ref(storage), force_share)


def _lock_of(storage: Storage) -> FileLock | None:
    try:
        return _locks.get(storage)
    except TypeError:  # an unhashable storage class: never tracked
        return None


def lock_image(storage: Storage, driver: Any, options: Any, read_only: bool) -> None:
    """Take what an image node of ``driver`` needs of its file; refuse, before
    the format driver opens it, if another process forbids that."""
    lock = _lock_of(storage)
    if lock is None:
        return
    wanted = lock.wanted(image_permissions(driver, options, read_only), read_only)
    guard = _guards.get().get(lock.file_id())
    if guard is not None:
        guard.need(wanted)
        guard.deferred.append((lock, wanted))
        return
    _acquire(lock.fd, lock.path, lock.held, wanted, f"Could not open '{lock.path}': ")
    lock.held = wanted


# -- guards: locks held across a close and reopen -------------------------------------
@attrs.define(eq=False)
class _Guard:
    """A descriptor of its own that holds a file's locks while the storage
    that needs them is closed and opened again (reopen, create then open).

    Opens of the same file inside the guard do not check (they would see the
    guard's own locks as another user's): the guard checks for them, and they
    take their locks when it ends, before it lets go."""

    fd: int
    path: str
    held: Permissions
    deferred: list[tuple[FileLock, Permissions]] = attrs.Factory(list)

    def need(self, wanted: Permissions, prefix: str | None = None) -> None:
        if self.held.covers(wanted):
            return
        union = self.held.union(wanted)
        where = f"Could not open '{self.path}': " if prefix is None else prefix
        _acquire(self.fd, self.path, self.held, union, where)
        self.held = union

    def release(self) -> None:
        try:
            for lock, wanted in self.deferred:
                if lock.fd >= 0:  # still open
                    _apply(lock.fd, self.path, lock.held, wanted)
                    lock.held = wanted
        finally:
            os.close(self.fd)


#: The guards of this context (thread), by file identity (st_dev, st_ino).
_guards: contextvars.ContextVar[Mapping[tuple[int, int], _Guard]] = contextvars.ContextVar(
    "corefmt_lock_guards", default=MappingProxyType({}))


@contextlib.contextmanager
def _guarding(file_id: tuple[int, int], guard: _Guard) -> Iterator[_Guard]:
    token = _guards.set(MappingProxyType({**_guards.get(), file_id: guard}))
    try:
        yield guard
    finally:
        _guards.reset(token)
        guard.release()


@contextlib.contextmanager
def reopening(storage: Storage, driver: Any, options: Any, read_only: bool) -> Iterator[None]:
    """Around closing an image's storage and opening it in the other mode:
    the new mode is checked first (a refusal changes nothing), and the file
    is never unlocked in between."""
    lock = _lock_of(storage)
    if lock is None or lock.fd < 0:
        yield
        return
    file_id = lock.file_id()
    outer = _guards.get().get(file_id)
    wanted = lock.wanted(image_permissions(driver, options, read_only), read_only)
    if outer is not None:
        outer.need(wanted)
        yield
        return
    # A dup shares the open file description, and so its locks.
    guard = _Guard(os.dup(lock.fd), lock.path, lock.held)
    try:
        guard.need(wanted)
    except BaseException:
        os.close(guard.fd)
        raise
    with _guarding(file_id, guard):
        yield


@contextlib.contextmanager
def creating(path: str, storage_driver: StorageDriver) -> Iterator[None]:
    """Around creating an image over ``path``: an existing local file is
    locked for writing and resizing before anything truncates it, so an
    image another process uses is refused unchanged (qemu's raw_co_create)."""
    if not isinstance(storage_driver, FileStorageDriver):
        yield
        return
    local = path.removeprefix("file:")
    prefix = f"{local}: "
    try:
        fd = os.open(local, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        yield  # nothing there to lose, or the driver reports why it cannot create
        return
    guard = None
    try:
        info = os.fstat(fd)
        file_id = (info.st_dev, info.st_ino)
        outer = _guards.get().get(file_id)
        if outer is None and _ofd_locks_work(fd):
            guard = _Guard(fd, local, NOTHING)
            guard.need(CREATE, prefix=prefix)
        elif outer is not None:
            outer.need(CREATE, prefix=prefix)
    except BaseException:
        os.close(fd)
        raise
    if guard is None:
        os.close(fd)
        yield
        return
    with _guarding(file_id, guard):
        yield


__all__ = ["CREATE", "FORCE_SHARE", "PERM_ALL", "PERM_NAMES", "FileLock", "ImageLockError",
           "Perm", "Permissions", "creating", "image_permissions", "lock_image", "reopening",
           "track"]

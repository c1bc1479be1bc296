"""The ``file`` storage driver: a host file or block device.

Uses pread/pwrite (preadv into caller buffers), fdatasync, Linux fallocate
for holes and zero ranges, SEEK_DATA/SEEK_HOLE for sparseness and optional
O_DIRECT. Every kernel feature that may be missing degrades to a slower
path with the same results.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading

from corefmt.block.align import aligned_range, write_unaligned
from corefmt.errors import CorefmtError, StorageError
from corefmt.storage.base import Storage, StorageDriver

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
DIRECT_IO_ALIGNMENT = 4096
SECTOR_SIZE = 512
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)
#: linux/fs.h: inode flags (nocow) and the fsxattr interface (extent size hint).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_EXTSIZE = 0x00000800
#: struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 pad bytes.
FSXATTR = struct.Struct("=IIIII8x")
INODE_FLAGS = struct.Struct("=l")


def _load_fallocate():
    try:
        # The process's own symbols include libc's; find_library would spawn
        # ldconfig/gcc subprocesses on every start.
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


class FileStorage(Storage):
    """A file opened with one descriptor shared by all threads."""

    def __init__(self, path: str, fd: int, read_only: bool, direct: bool):
        super().__init__(path, read_only)
        self.fd = fd
        self.direct = direct
        self.request_alignment = DIRECT_IO_ALIGNMENT if direct else 1
        # Which fallocate modes this file system refuses (learnt on first use).
        self._no_punch = self._no_zero_range = self._no_prealloc = _fallocate is None
        self._no_seek_data = False
        self._size_lock = threading.Lock()
        self._direct_lock = threading.Lock()
        # The file's length, kept here: every request checks it, and an fstat
        # per request costs more than the bookkeeping. Other processes must
        # not resize an image this one has open (as with qemu).
        self._known_size = self._stat().st_size

    # -- helpers --------------------------------------------------------------
    def _error(self, operation: str, error: OSError) -> StorageError:
        return StorageError(self.path, operation, error)

    def _stat(self) -> os.stat_result:
        try:
            return os.fstat(self.fd)
        except OSError as error:
            raise self._error("stat", error) from error

    def size(self) -> int:
        return self._known_size

    def _grew_to(self, end: int) -> None:
        if end > self._known_size:
            with self._size_lock:
                self._known_size = max(self._known_size, end)

    def allocated_size(self) -> int | None:
        return self._stat().st_blocks * SECTOR_SIZE

    # -- reads ----------------------------------------------------------------
    def set_creation_hints(self, *, nocow: bool = False, extent_size_hint: int = 0) -> None:
        """Set FS_NOCOW_FL and the XFS/ext4 extent size hint while the file is
        empty; a file system that refuses either is left as it is (as qemu)."""
        import fcntl

        if nocow:
            with contextlib.suppress(OSError):
                flags = bytearray(fcntl.ioctl(self.fd, FS_IOC_GETFLAGS,
                                              bytes(INODE_FLAGS.size)))
                (value,) = INODE_FLAGS.unpack(flags)
                fcntl.ioctl(self.fd, FS_IOC_SETFLAGS, INODE_FLAGS.pack(value | FS_NOCOW_FL))
        if extent_size_hint:
            with contextlib.suppress(OSError):
                fields = list(FSXATTR.unpack(fcntl.ioctl(self.fd, FS_IOC_FSGETXATTR,
                                                         bytes(FSXATTR.size))))
                fields[0] |= FS_XFLAG_EXTSIZE
                fields[1] = extent_size_hint
                fcntl.ioctl(self.fd, FS_IOC_FSSETXATTR, FSXATTR.pack(*fields))

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        aligned = offset % DIRECT_IO_ALIGNMENT == 0 and len(view) % DIRECT_IO_ALIGNMENT == 0
        if self.direct and not aligned:
            start, end = aligned_range(offset, len(view), DIRECT_IO_ALIGNMENT)
            bounce = mmap.mmap(-1, end - start)
            try:
                self._preadv_full(start, memoryview(bounce))
                view[:] = bounce[offset - start: offset - start + len(view)]
            finally:
                bounce.close()
            return
        if self.direct:
            self._direct_readinto(offset, view)
            return
        self._preadv_full(offset, view)

    def _direct_readinto(self, offset: int, view: memoryview) -> None:
        # O_DIRECT needs an aligned buffer address too; mmap memory is page-aligned.
        bounce = mmap.mmap(-1, len(view))
        try:
            self._preadv_full(offset, memoryview(bounce))
            view[:] = bounce
        finally:
            bounce.close()

    def _preadv_full(self, offset: int, view: memoryview) -> None:
        done = 0
        total = len(view)
        while done < total:
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as error:
                raise self._error(f"read of {total} bytes at offset {offset}", error) from error
            if got == 0 or (self.direct and got < total - done):
                done += got
                view[done:] = bytes(total - done)  # past end of file
                return
            done += got

    # -- writes ---------------------------------------------------------------
    def _write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self.direct:
            self._pwrite_full(offset, view)
            return
        with self._direct_lock:
            size_before = self.size()
            write_unaligned(offset, view, DIRECT_IO_ALIGNMENT, self.read, self._direct_write)
            # Aligned blocks may run past the requested end: keep the logical size.
            wanted = max(size_before, offset + len(view))
            if self.size() > wanted:
                self._truncate(wanted)

    def _direct_write(self, offset: int, data: bytes | memoryview) -> None:
        bounce = mmap.mmap(-1, len(data))
        try:
            bounce[:] = data
            self._pwrite_full(offset, memoryview(bounce))
        finally:
            bounce.close()

    def _pwrite_full(self, offset: int, view: memoryview) -> None:
        done = 0
        total = len(view)
        while done < total:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except InterruptedError:
                continue
            except OSError as error:
                self._grew_to(self._stat().st_size)  # a partial write may have grown it
                raise self._error(f"write of {total} bytes at offset {offset}", error) from error
        self._grew_to(offset + total)

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as error:
            raise self._error(f"truncate to {size} bytes", error) from error
        with self._size_lock:
            self._known_size = size

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            raise self._error("flush", error) from error

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate is None:
            return False
        while True:
            if _fallocate(self.fd, mode, offset, length) == 0:
                return True
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code in _UNSUPPORTED:
                return False
            failure = OSError(code, os.strerror(code))
            raise self._error(f"fallocate({mode:#x}) at offset {offset}", failure)

    def _punch_hole(self, offset: int, length: int) -> bool:
        if self._no_punch:
            return False
        ok = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_punch = not ok
        return ok

    def _zero_range(self, offset: int, length: int) -> bool:
        if self._no_zero_range:
            return False
        ok = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_zero_range = not ok
        return ok

    def preallocate(self, offset: int, length: int) -> bool:
        self._check_writable()
        if self._no_prealloc or length <= 0:
            return False
        ok = self._fallocate(0, offset, length)
        self._no_prealloc = not ok
        if ok:
            self._grew_to(offset + length)  # mode 0 extends the file
        return ok

    # -- sparseness -----------------------------------------------------------
    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        file_size = self.size()
        if offset >= file_size:
            return False, length
        is_data, run_end = self._probe_run(offset, file_size)
        if not is_data and run_end >= file_size:
            run_end = offset + length  # the hole runs on past the end of the file
        return is_data, min(run_end, offset + length) - offset

    def _probe_run(self, position: int, file_size: int) -> tuple[bool, int]:
        """Is ``position`` in data or a hole, and where does that run end?"""
        if self._no_seek_data:
            return True, file_size
        try:
            data_start = os.lseek(self.fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return False, file_size  # only a hole until the end
            if error.errno in _UNSUPPORTED:
                self._no_seek_data = True
                return True, file_size
            raise self._error(f"SEEK_DATA at offset {position}", error) from error
        if data_start > position:
            return False, data_start
        try:
            hole_start = os.lseek(self.fd, position, os.SEEK_HOLE)
        except OSError as error:
            if error.errno in _UNSUPPORTED or error.errno == errno.ENXIO:
                return True, file_size
            raise self._error(f"SEEK_HOLE at offset {position}", error) from error
        return True, max(hole_start, position + 1)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class FileStorageDriver(StorageDriver):
    name = "file"
    prefix = None

    def open(self, path: str, *, read_only: bool, direct: bool = False) -> FileStorage:
        if path.startswith("file:"):
            path = path[len("file:"):]
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        use_direct = False
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
                use_direct = True
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise _open_error(path, error) from error
                # This file system has no O_DIRECT (tmpfs): same results, page cache.
                fd = self._plain_open(path, flags)
        else:
            fd = self._plain_open(path, flags)
        return FileStorage(path, fd, read_only, use_direct)

    @staticmethod
    def _plain_open(path: str, flags: int) -> int:
        try:
            return os.open(path, flags)
        except OSError as error:
            raise _open_error(path, error) from error

    def create(self, path: str) -> FileStorage:
        if path.startswith("file:"):
            path = path[len("file:"):]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise _open_error(path, error) from error
        return FileStorage(path, fd, False, False)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def resolve(self, path: str, relative_to: str | None) -> str:
        if os.path.isabs(path) or not relative_to or ":" in path.split("/")[0]:
            return path
        return os.path.join(os.path.dirname(relative_to), path)


def _open_error(path: str, error: OSError) -> CorefmtError:
    if error.errno == errno.ENOENT:
        return CorefmtError(f"Could not open '{path}': No such file or directory")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CorefmtError(f"Could not open '{path}': Permission denied")
    if error.errno == errno.EISDIR:
        return CorefmtError(f"Could not open '{path}': Is a directory")
    return CorefmtError(f"Could not open '{path}': {error.strerror}")

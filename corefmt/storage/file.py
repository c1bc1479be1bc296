"""The ``file`` storage driver: a host file or block device.

Uses pread/pwrite (preadv into caller buffers), fdatasync, Linux fallocate
for holes and zero ranges, SEEK_DATA/SEEK_HOLE for sparseness and optional
O_DIRECT. Every kernel feature that may be missing degrades to a slower
path with the same results.

A block device (or another special file) has no st_size and cannot be
resized: its size comes from BLKGETSIZE64 (else a seek to its end), a
truncate within it changes nothing, it is zeroed with fallocate or
BLKZEROOUT on whole logical blocks, and it is never assumed to read as
zeros after create (it keeps its old content).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator

from corefmt import sync
from corefmt.block.align import align_down, align_up, aligned_range, write_unaligned
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
#: linux/fs.h block device ioctls: size in bytes (u64), logical block size
#: (int), and discard / zero-out of a {u64 start, u64 length} byte range.
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
DEVICE_SIZE = struct.Struct("=Q")
LOGICAL_BLOCK_SIZE = struct.Struct("=i")
BLOCK_RANGE = struct.Struct("=QQ")


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


@contextlib.contextmanager
def _page_aligned(length: int) -> Iterator[memoryview]:
    """Page-aligned memory for O_DIRECT (mmap memory is). The view is released
    before the map is closed, and a map still exported (a view kept by a
    traceback) is left to the collector: the I/O error propagates, never a
    BufferError in its place."""
    bounce = mmap.mmap(-1, length)
    view = memoryview(bounce)
    try:
        yield view
    finally:
        view.release()
        with contextlib.suppress(BufferError):
            bounce.close()


class FileStorage(Storage):
    """A file opened with one descriptor shared by all threads."""

    def __init__(self, path: str, fd: int, read_only: bool, direct: bool):
        super().__init__(path, read_only)
        self.fd = fd
        self.direct = direct
        #: Held by every change of the size (truncate, growth, writes past the
        #: end, O_DIRECT read-modify-write): a growth never cuts off what
        #: another thread wrote beyond it.
        self._resize_lock = sync.RLock()  # visible to the stress scheduler
        self._flush_failed = False
        info = self._stat()
        #: A regular file; anything else (a block device) has a fixed size.
        self.regular = stat.S_ISREG(info.st_mode)
        self.is_block_device = stat.S_ISBLK(info.st_mode)
        #: What the device zeroes and discards in (and O_DIRECT needs there).
        self.block_size = self._logical_block_size() if self.is_block_device else SECTOR_SIZE
        self._direct_alignment = (max(self.block_size, SECTOR_SIZE) if self.is_block_device
                                  else DIRECT_IO_ALIGNMENT)
        # Unaligned O_DIRECT requests are read-modify-written here, where the
        # file's size is known: alignment padding added above would be written
        # past the end and grow the file (a 5000-byte disk would become 8192).
        self.request_alignment = 1
        # Which fallocate modes this file system refuses (learnt on first use).
        self._no_punch = self._no_zero_range = self._no_prealloc = _fallocate is None
        self._no_zero_hint = _fallocate is None
        self._no_seek_data = not self.regular  # devices are all data
        self._no_blkzeroout = self._no_blkdiscard = not self.is_block_device
        # The file's length, kept here: every request checks it, and an fstat
        # per request costs more than the bookkeeping. Other processes must
        # not resize an image this one has open (as with qemu). It changes
        # only under self._resize_lock.
        self._known_size = info.st_size if self.regular else self._device_size()
        #: The last data/hole run probed, (start, end, is_data), kept only on a
        #: read-only file (a base: nothing here changes it): a chain's reads ask
        #: about the same long run once per request otherwise.
        self._last_run: tuple[int, int, bool] | None = None

    # -- helpers --------------------------------------------------------------
    def _error(self, operation: str, error: OSError) -> StorageError:
        return StorageError(self.path, operation, error)

    def _stat(self) -> os.stat_result:
        try:
            return os.fstat(self.fd)
        except OSError as error:
            raise self._error("stat", error) from error

    def _device_size(self) -> int:
        """A device reports no st_size: ask the kernel (BLKGETSIZE64), else
        seek to the end (qemu's raw_getlength)."""
        if self.is_block_device:
            with contextlib.suppress(OSError):
                answer = fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(DEVICE_SIZE.size))
                return DEVICE_SIZE.unpack(answer)[0]
        try:
            return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as error:
            if error.errno == errno.ESPIPE:
                return 0  # a pipe or socket: no size to know
            raise self._error("seek to the end", error) from error

    def _logical_block_size(self) -> int:
        try:
            answer = fcntl.ioctl(self.fd, BLKSSZGET, bytes(LOGICAL_BLOCK_SIZE.size))
        except OSError:
            return SECTOR_SIZE
        return LOGICAL_BLOCK_SIZE.unpack(answer)[0] or SECTOR_SIZE

    def size(self) -> int:
        return self._known_size

    def has_zero_init(self) -> bool:
        return self.regular  # a new file is empty; a device keeps what it held

    def allocated_size(self) -> int | None:
        return self._stat().st_blocks * SECTOR_SIZE

    # -- reads ----------------------------------------------------------------
    def set_creation_hints(self, *, nocow: bool = False, extent_size_hint: int = 0) -> None:
        """Set FS_NOCOW_FL and the XFS/ext4 extent size hint while the file is
        empty; a file system that refuses either is left as it is (as qemu).
        A device gets neither: its driver would read the ioctls as its own."""
        if not self.regular:
            return
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
        if not self.direct:
            self._preadv_full(offset, view)
            return
        # O_DIRECT needs an aligned buffer address too: read into page-aligned memory.
        start, end = aligned_range(offset, len(view), self._direct_alignment)
        with _page_aligned(end - start) as bounce:
            self._preadv_full(start, bounce)
            view[:] = bounce[offset - start: offset - start + len(view)]

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
        end = offset + len(view)
        if not self.direct and end <= self._known_size:
            self._pwrite_full(offset, view)  # inside the file: its size cannot change
            return
        # Growing the file, or O_DIRECT's read-modify-write of whole blocks
        # (which may write past the end): one at a time, and never leaving the
        # file longer than asked for, nor longer than it was if the write fails.
        with self._resize_lock:
            before = self._known_size
            try:
                if self.direct:
                    write_unaligned(offset, view, self._direct_alignment, self.read,
                                    self._direct_write)
                else:
                    self._pwrite_full(offset, view)
            except CorefmtError:
                self._restore_size(before)
                raise
            wanted = max(before, end)
            if self.direct and self.regular and align_up(end, self._direct_alignment) > wanted:
                self._ftruncate(wanted)  # the padding of the last block is not the file's
            self._known_size = wanted

    def _direct_write(self, offset: int, data: bytes | memoryview) -> None:
        with _page_aligned(len(data)) as bounce:
            bounce[:] = data
            self._pwrite_full(offset, bounce)

    def _pwrite_full(self, offset: int, view: memoryview) -> None:
        done = 0
        total = len(view)
        while done < total:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except InterruptedError:
                continue
            except OSError as error:
                raise self._error(f"write of {total} bytes at offset {offset}", error) from error

    def _restore_size(self, size: int) -> None:
        """After a failed write: cut off what it added past ``size`` (a partial
        write may have grown the file). The write's error is the one to report."""
        if not self.regular:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_size > size:
                os.ftruncate(self.fd, size)
        self._known_size = size

    def _ftruncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as error:
            raise self._error(f"truncate to {size} bytes", error) from error

    def _truncate(self, size: int) -> None:
        with self._resize_lock:
            if not self.regular:
                # A device keeps its size (qemu): up to it there is nothing to
                # do, and it is never truncated (O_TRUNC and ftruncate included).
                if size > self._known_size:
                    raise CorefmtError(f"{self.path}: Device is too small ({self._known_size} "
                                       f"bytes, {size} needed)")
                return
            self._ftruncate(size)
            self._known_size = size

    def _grow(self, size: int) -> int:
        with self._resize_lock:
            current = self._known_size
            if size > current:
                self._truncate(size)
            return current

    def flush(self) -> None:
        """fdatasync. After one fails, Linux may have dropped the dirty pages
        and a later fdatasync would succeed without them: every later flush
        of this open fails too (as qemu's file driver does)."""
        if self.read_only:
            return
        if self._flush_failed:
            raise self._error("flush", OSError(errno.EIO, "an earlier flush failed, data "
                                                          "may have been lost"))
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            self._flush_failed = True
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
        if not self.regular:
            # On a device, fallocate punches by a discard that must read back as
            # zeros (the kernel refuses it otherwise), on whole logical blocks.
            return self._device_blocks(offset, length, self._device_punch)
        ok = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_punch = not ok
        return ok

    def _device_punch(self, offset: int, length: int) -> bool:
        ok = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_punch = not ok
        return ok

    def _zero_range(self, offset: int, length: int) -> bool:
        if not self.regular:
            return self._device_blocks(offset, length, self._device_zero)
        if self._no_zero_range:
            return False
        ok = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_zero_range = not ok
        return ok

    def zero_before_write(self, offset: int, length: int) -> bool:
        self._check_writable()
        if not self.regular or self._no_zero_hint or length <= 0:
            return False  # a device would write the zeros (BLKZEROOUT): no gain
        ok = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_zero_hint = not ok  # its own flag: write_zeroes keeps its zero range
        return ok

    def _device_zero(self, offset: int, length: int) -> bool:
        """Zero whole blocks of a device: BLKZEROOUT (the kernel writes the
        zeros itself if the device has no command for it), else fallocate's
        zero range (the same request, where the ioctl is missing)."""
        if not self._no_blkzeroout:
            if self._block_ioctl(BLKZEROOUT, "BLKZEROOUT", offset, length):
                return True
            self._no_blkzeroout = True
        if self._no_zero_range:
            return False
        ok = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        self._no_zero_range = not ok
        return ok

    def _device_blocks(self, offset: int, length: int,
                       zero_blocks: Callable[[int, int], bool]) -> bool:
        """Zero a device range: the whole logical blocks in it with
        ``zero_blocks`` (the kernel refuses unaligned ranges), the partial
        blocks at its ends with zero bytes. False if ``zero_blocks`` declines."""
        start, end = align_up(offset, self.block_size), align_down(offset + length, self.block_size)
        if end > start:
            if not zero_blocks(start, end - start):
                return False
        else:
            start = end = offset + length
        if start > offset:
            self.write_zero_bytes(offset, start - offset)
        if offset + length > end:
            self.write_zero_bytes(end, offset + length - end)
        return True

    def _block_ioctl(self, request: int, name: str, offset: int, length: int) -> bool:
        """A BLKZEROOUT/BLKDISCARD of a byte range; False if the device has none."""
        try:
            fcntl.ioctl(self.fd, request, BLOCK_RANGE.pack(offset, length))
        except OSError as error:
            if error.errno in _UNSUPPORTED:
                return False
            raise self._error(f"{name} of {length} bytes at offset {offset}", error) from error
        return True

    def discard(self, offset: int, length: int) -> None:
        """A device is told with BLKDISCARD (a hint: what it reads back
        afterwards is up to the device); a file gets a hole."""
        if self.regular:
            super().discard(offset, length)
            return
        self._check_writable()
        start = align_up(offset, self.block_size)
        end = align_down(min(offset + length, self._known_size), self.block_size)
        if end > start and not self._no_blkdiscard:
            self._no_blkdiscard = not self._block_ioctl(BLKDISCARD, "BLKDISCARD",
                                                        start, end - start)

    def preallocate(self, offset: int, length: int) -> bool:
        self._check_writable()
        if length <= 0:
            return False
        if not self.regular:
            return offset + length <= self._known_size  # a device is all allocated
        if self._no_prealloc:
            return False
        with self._resize_lock:  # mode 0 extends the file
            ok = self._fallocate(0, offset, length)
            self._no_prealloc = not ok
            if ok:
                self._known_size = max(self._known_size, offset + length)
        return ok

    # -- sparseness -----------------------------------------------------------
    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        file_size = self.size()
        if offset >= file_size:
            return False, length
        last = self._last_run
        if last is not None and last[0] <= offset < last[1]:
            is_data, run_end = last[2], last[1]
        else:
            is_data, run_end = self._probe_run(offset, file_size)
            if self.read_only:
                self._last_run = (offset, run_end, is_data)
        if not is_data and run_end >= file_size:
            run_end = offset + length  # the hole runs on past the end of the file
        return is_data, min(run_end, offset + length) - offset

    def _probe_run(self, position: int, file_size: int) -> tuple[bool, int]:
        """Is ``position`` in data or a hole, and where does that run end?
        One or two lseeks answer a whole run, however long."""
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
        return _storage(path, fd, read_only, use_direct)

    @staticmethod
    def _plain_open(path: str, flags: int) -> int:
        try:
            return os.open(path, flags)
        except OSError as error:
            raise _open_error(path, error) from error

    def create(self, path: str) -> FileStorage:
        """A new, empty file; an existing device is opened as it is (a device
        cannot be truncated, and O_TRUNC on one is not defined)."""
        if path.startswith("file:"):
            path = path[len("file:"):]
        flags = os.O_RDWR | os.O_CLOEXEC
        if not _is_special_file(path):
            flags |= os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as error:
            raise _open_error(path, error) from error
        return _storage(path, fd, False, False)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def resolve(self, path: str, relative_to: str | None) -> str:
        if os.path.isabs(path) or not relative_to or ":" in path.split("/")[0]:
            return path
        return os.path.join(os.path.dirname(relative_to), path)


def _storage(path: str, fd: int, read_only: bool, direct: bool) -> FileStorage:
    """A FileStorage on ``fd``, which is closed again if that fails."""
    try:
        return FileStorage(path, fd, read_only, direct)
    except BaseException:
        os.close(fd)
        raise


def _is_special_file(path: str) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a directory."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _open_error(path: str, error: OSError) -> CorefmtError:
    if error.errno == errno.ENOENT:
        return CorefmtError(f"Could not open '{path}': No such file or directory")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CorefmtError(f"Could not open '{path}': Permission denied")
    if error.errno == errno.EISDIR:
        return CorefmtError(f"Could not open '{path}': Is a directory")
    return CorefmtError(f"Could not open '{path}': {error.strerror}")

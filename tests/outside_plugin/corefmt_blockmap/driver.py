"""blockmap: header, a flat table of u64 host offsets (one per block, 0 =
unallocated), then data blocks appended at the end of the file.

Header (big endian): magic 'BLKMAP01', u64 virtual size, u32 block size,
u32 backing path length, u32 backing format length, then the two strings;
the table starts at TABLE_OFFSET.
"""

from __future__ import annotations

import struct

import attrs

from corefmt import BackingRef, Extent, FormatDriver, Image, ImageContext, sync
from corefmt.driver import PROBE_CERTAIN, PROBE_NO
from corefmt.errors import ImageError
from corefmt.options import choice, option

MAGIC = b"BLKMAP01"
HEADER = struct.Struct(">8sQIII")
TABLE_OFFSET = 4096
ENTRY = struct.Struct(">Q")
ALIGNMENT = 512


@attrs.frozen
class BlockMapOptions:
    block_size: int = option(4096, "allocation unit", converter=int,
                             validator=choice(4096, 65536))


class BlockMapImage(Image):
    def __init__(self, storage, context: ImageContext):
        super().__init__(storage, context)
        file_size = storage.size()
        magic, size, block_size, path_len, fmt_len = HEADER.unpack(storage.read(0, HEADER.size))
        self._check_header(file_size, magic, size, block_size, path_len, fmt_len)
        names = storage.read(HEADER.size, path_len + fmt_len)
        if path_len:
            self.backing = BackingRef(self._name(names[:path_len], "backing file name"),
                                      self._name(names[path_len:], "backing format") or None)
        self.virtual_size = size
        self.block_size = block_size
        self.cluster_size = block_size
        self.request_alignment = ALIGNMENT
        count = -(-size // block_size)
        raw = storage.read(TABLE_OFFSET, count * ENTRY.size)
        self.table = [ENTRY.unpack_from(raw, i * ENTRY.size)[0] for i in range(count)]
        self._check_table(file_size)
        # New blocks go after every block the table knows, never at the file's
        # end: after a crash the file may be shorter than what the table uses.
        self.next_free = max([self._data_start(), *(h + block_size for h in self.table if h)])
        self.lock = sync.Lock()

    # Every value read from the file is checked before it sizes a read or a
    # list, or places a write: a damaged image is refused, never trusted.
    def _check_header(self, file_size: int, magic: bytes, size: int, block_size: int,
                      path_len: int, fmt_len: int) -> None:
        path = self.context.path
        if file_size < HEADER.size:
            raise ImageError(path, "header", 0,
                             f"file is {file_size} bytes, shorter than the header")
        if magic != MAGIC:
            raise ImageError(path, "header", 0, "bad magic")
        if block_size not in (4096, 65536):
            raise ImageError(path, "header", 16, f"bad block size {block_size}")
        if path_len + fmt_len > TABLE_OFFSET - HEADER.size:
            raise ImageError(path, "header", 20, "backing name too long")
        table_end = TABLE_OFFSET + -(-size // block_size) * ENTRY.size
        if table_end > file_size:
            raise ImageError(path, "table", TABLE_OFFSET,
                             f"the table for virtual size {size} ends at {table_end}, "
                             f"past the end of the file ({file_size} bytes)")

    def _name(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ImageError(self.context.path, "header", HEADER.size,
                             f"{what} is not UTF-8") from None

    def _check_table(self, file_size: int) -> None:
        data_start = self._data_start()
        owner: dict[int, int] = {}
        for index, host in enumerate(self.table):
            if not host:
                continue
            where = TABLE_OFFSET + index * ENTRY.size
            if host % self.block_size or host < data_start:
                raise ImageError(self.context.path, "table entry", where,
                                 f"block {index} points at {host:#x}, not a data block")
            if host + self.block_size > file_size:
                raise ImageError(self.context.path, "table entry", where,
                                 f"block {index} at {host:#x} lies past the end of the file")
            if host in owner:
                raise ImageError(self.context.path, "table entry", where,
                                 f"block {index} shares {host:#x} with block {owner[host]}")
            owner[host] = index

    def block_status(self, offset: int, length: int) -> Extent:
        index = offset // self.block_size
        allocated = self.table[index] != 0
        end = offset + length
        run_end = min(end, (index + 1) * self.block_size)
        while run_end < end and (self.table[run_end // self.block_size] != 0) == allocated:
            run_end = min(end, run_end + self.block_size)
        return Extent(offset, run_end - offset, data=allocated, zero=False, allocated=allocated)

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            position = offset + done
            index, inside = divmod(position, self.block_size)
            step = min(self.block_size - inside, len(buf) - done)
            self.storage.readinto(self.table[index] + inside, buf[done:done + step])
            done += step

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            position = offset + done
            index, inside = divmod(position, self.block_size)
            step = min(self.block_size - inside, len(view) - done)
            with self.lock:
                host = self.table[index]
                if host == 0:
                    block_start = index * self.block_size
                    block = bytearray(self.context.read_below(block_start, self.block_size))
                    block[inside:inside + step] = view[done:done + step]
                    host = self.next_free
                    self.next_free += self.block_size
                    self.storage.write(host, block)
                    self.storage.flush()  # the data is durable before the entry points at it
                    self.storage.write(TABLE_OFFSET + index * ENTRY.size, ENTRY.pack(host))
                    self.table[index] = host
                    done += step
                    continue
            self.storage.write(host + inside, view[done:done + step])
            done += step

    def _data_start(self) -> int:
        table_end = TABLE_OFFSET + len(self.table) * ENTRY.size
        return -(-table_end // self.block_size) * self.block_size


class BlockMapDriver(FormatDriver):
    name = "blockmap"
    create_options = BlockMapOptions
    supports_backing = True

    def probe(self, head: bytes, path) -> int:
        return PROBE_CERTAIN if head.startswith(MAGIC) else PROBE_NO

    def create(self, storage, size: int, options: BlockMapOptions,
               backing: BackingRef | None) -> None:
        path = (backing.path if backing else "").encode()
        fmt = ((backing.format or "") if backing else "").encode()
        storage.write(0, HEADER.pack(MAGIC, size, options.block_size, len(path), len(fmt)))
        storage.write(HEADER.size, path + fmt)
        count = -(-size // options.block_size)
        storage.write_zeroes(TABLE_OFFSET, max(count * ENTRY.size, 1))

    def open(self, storage, context: ImageContext) -> BlockMapImage:
        return BlockMapImage(storage, context)

"""The NBD wire format: constants named as the protocol document names them,
and the fixed-size messages as struct layouts with pack/unpack.

Only the fixed newstyle handshake and the compact (non-extended) headers are
here: that is what this server speaks. Every number is big-endian on the wire.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

# -- magics -------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle, also prefixes every option
NBD_REP_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: The IANA port for NBD.
NBD_DEFAULT_PORT = 10809
#: Strings (export names, messages) may not be longer than this.
NBD_MAX_STRING_SIZE = 4096
#: The reserved zero bytes after NBD_OPT_EXPORT_NAME's reply (without NO_ZEROES).
EXPORT_NAME_ZEROES = 124


# -- handshake flags (server) and client flags ------------------------------------
class HandshakeFlags(enum.IntFlag):
    NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_NO_ZEROES = 1 << 1


class ClientFlags(enum.IntFlag):
    NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_C_NO_ZEROES = 1 << 1


# -- transmission flags -----------------------------------------------------------------
class TransmissionFlags(enum.IntFlag):
    NBD_FLAG_HAS_FLAGS = 1 << 0
    NBD_FLAG_READ_ONLY = 1 << 1
    NBD_FLAG_SEND_FLUSH = 1 << 2
    NBD_FLAG_SEND_FUA = 1 << 3
    NBD_FLAG_ROTATIONAL = 1 << 4
    NBD_FLAG_SEND_TRIM = 1 << 5
    NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
    NBD_FLAG_SEND_DF = 1 << 7
    NBD_FLAG_CAN_MULTI_CONN = 1 << 8
    NBD_FLAG_SEND_RESIZE = 1 << 9
    NBD_FLAG_SEND_CACHE = 1 << 10
    NBD_FLAG_SEND_FAST_ZERO = 1 << 11


# -- options --------------------------------------------------------------------------
class Option(enum.IntEnum):
    NBD_OPT_EXPORT_NAME = 1
    NBD_OPT_ABORT = 2
    NBD_OPT_LIST = 3
    NBD_OPT_PEEK_EXPORT = 4
    NBD_OPT_STARTTLS = 5
    NBD_OPT_INFO = 6
    NBD_OPT_GO = 7
    NBD_OPT_STRUCTURED_REPLY = 8
    NBD_OPT_LIST_META_CONTEXT = 9
    NBD_OPT_SET_META_CONTEXT = 10


NBD_REP_FLAG_ERROR = 1 << 31


class Reply(enum.IntEnum):
    NBD_REP_ACK = 1
    NBD_REP_SERVER = 2
    NBD_REP_INFO = 3
    NBD_REP_META_CONTEXT = 4
    NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
    NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
    NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
    NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
    NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
    NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
    NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
    NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9


class Info(enum.IntEnum):
    NBD_INFO_EXPORT = 0
    NBD_INFO_NAME = 1
    NBD_INFO_DESCRIPTION = 2
    NBD_INFO_BLOCK_SIZE = 3


# -- transmission ---------------------------------------------------------------------
class Command(enum.IntEnum):
    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7


class CommandFlags(enum.IntFlag):
    NBD_CMD_FLAG_FUA = 1 << 0
    NBD_CMD_FLAG_NO_HOLE = 1 << 1
    NBD_CMD_FLAG_DF = 1 << 2
    NBD_CMD_FLAG_REQ_ONE = 1 << 3
    NBD_CMD_FLAG_FAST_ZERO = 1 << 4


NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15


class ReplyType(enum.IntEnum):
    NBD_REPLY_TYPE_NONE = 0
    NBD_REPLY_TYPE_OFFSET_DATA = 1
    NBD_REPLY_TYPE_OFFSET_HOLE = 2
    NBD_REPLY_TYPE_BLOCK_STATUS = 5
    NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT | 1
    NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT | 2


class Error(enum.IntEnum):
    """Error values on the wire (the protocol's, not the host's errno)."""

    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108


# -- metadata contexts ----------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
#: qemu's context for a dirty bitmap: this prefix, then the bitmap's name.
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
#: A dirty-bitmap descriptor's flag for a range the bitmap marks.
NBD_STATE_DIRTY = 1 << 0

# -- struct layouts -------------------------------------------------------------------
SERVER_GREETING = struct.Struct(">QQH")       # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")         # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # NBD_REP_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")      # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")           # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")      # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
INFO_TYPE = struct.Struct(">H")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
REQUEST = struct.Struct(">IHHQQI")            # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")          # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")    # magic, flags, type, handle, length
OFFSET = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")            # offset, hole size
ERROR_CHUNK = struct.Struct(">IH")            # error, message length
BLOCK_DESCRIPTOR = struct.Struct(">II")       # length, status flags


class OptionHeader(NamedTuple):
    magic: int
    option: int
    length: int

    @classmethod
    def unpack(cls, data: bytes) -> OptionHeader:
        return cls(*OPTION_HEADER.unpack(data))

    def pack(self) -> bytes:
        return OPTION_HEADER.pack(*self)


class Request(NamedTuple):
    magic: int
    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @classmethod
    def unpack(cls, data: bytes) -> Request:
        return cls(*REQUEST.unpack(data))

    def pack(self) -> bytes:
        return REQUEST.pack(*self)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(NBD_REP_MAGIC, option, reply, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)


def structured_header(handle: int, type: int, length: int, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC,
                                 NBD_REPLY_FLAG_DONE if done else 0, type, handle, length)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    text = message.encode("utf-8", "replace")[:NBD_MAX_STRING_SIZE]
    body = ERROR_CHUNK.pack(error, len(text)) + text
    return structured_header(handle, ReplyType.NBD_REPLY_TYPE_ERROR, len(body), True) + body


def hole_chunk(handle: int, offset: int, length: int, done: bool) -> bytes:
    return structured_header(handle, ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE, OFFSET_HOLE.size,
                             done) + OFFSET_HOLE.pack(offset, length)


def data_chunk_header(handle: int, offset: int, length: int, done: bool) -> bytes:
    """The header of an OFFSET_DATA chunk; ``length`` data bytes follow it."""
    return structured_header(handle, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA,
                             OFFSET.size + length, done) + OFFSET.pack(offset)


def none_chunk(handle: int) -> bytes:
    return structured_header(handle, ReplyType.NBD_REPLY_TYPE_NONE, 0, True)


def block_status_chunk(handle: int, context_id: int, descriptors: list[tuple[int, int]],
                       done: bool) -> bytes:
    body = U32.pack(context_id) + b"".join(BLOCK_DESCRIPTOR.pack(length, flags)
                                           for length, flags in descriptors)
    return structured_header(handle, ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS, len(body),
                             done) + body


def string_with_length(text: str) -> bytes:
    """A u32 length and the UTF-8 bytes, as names appear inside option data."""
    raw = text.encode()
    return U32.pack(len(raw)) + raw

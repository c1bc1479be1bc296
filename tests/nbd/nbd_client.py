"""A minimal NBD client for the tests: raw protocol steps, so a test can
also send what no well-behaved client would."""

from __future__ import annotations

import socket
import struct

from corefmt.nbd import protocol as p
from corefmt.nbd.protocol import Command, Info, Option, Reply, ReplyType

TIMEOUT = 10.0


class Client:
    def __init__(self, address: tuple[str, int] | str):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(address)
        self.handle = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def recv(self, length: int) -> bytes:
        data = b""
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {length} bytes")
            data += chunk
        return data

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake -------------------------------------------------------------------
    def greeting(self, client_flags: int = 3) -> int:
        magic, opt, flags = p.SERVER_GREETING.unpack(self.recv(p.SERVER_GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(p.CLIENT_FLAGS.pack(client_flags))
        return flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(p.OptionHeader(p.IHAVEOPT, option, len(data)).pack() + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack(
            self.recv(p.OPTION_REPLY_HEADER.size))
        assert magic == p.NBD_REP_MAGIC
        return option, reply, self.recv(length)

    def replies(self) -> list[tuple[int, bytes]]:
        """Option replies up to the final one (an ACK or an error)."""
        found = []
        while True:
            _, reply, data = self.option_reply()
            found.append((reply, data))
            if reply != Reply.NBD_REP_INFO and reply not in (Reply.NBD_REP_SERVER,
                                                             Reply.NBD_REP_META_CONTEXT):
                return found

    def go(self, name: str = "", structured: bool = True,
           contexts: tuple[str, ...] = (p.BASE_ALLOCATION,)) -> tuple[int, int]:
        """Negotiate the usual way; (size, transmission flags)."""
        self.greeting()
        if structured:
            self.option(Option.NBD_OPT_STRUCTURED_REPLY)
            assert self.replies()[-1][0] == Reply.NBD_REP_ACK
            if contexts:
                self.option(Option.NBD_OPT_SET_META_CONTEXT, meta_context_data(name, contexts))
                assert self.replies()[-1][0] == Reply.NBD_REP_ACK
        self.option(Option.NBD_OPT_GO, info_data(name, [Info.NBD_INFO_BLOCK_SIZE]))
        replies = self.replies()
        assert replies[-1][0] == Reply.NBD_REP_ACK, replies
        for reply, data in replies:
            if reply == Reply.NBD_REP_INFO and p.INFO_TYPE.unpack(data[:2])[0] == 0:
                _, size, flags = p.INFO_EXPORT.unpack(data)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT")

    # -- transmission ---------------------------------------------------------------
    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"") -> int:
        self.handle += 1
        self.sock.sendall(p.Request(p.NBD_REQUEST_MAGIC, flags, command, self.handle, offset,
                                    length).pack() + data)
        return self.handle

    def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        """(handle, error, data): data only for a successful read."""
        magic, error, handle = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.NBD_SIMPLE_REPLY_MAGIC, hex(magic)
        return handle, error, self.recv(length) if not error else b""

    def any_reply(self) -> tuple[int, int, list[tuple[int, bytes]]]:
        """One whole reply: (handle, error, [(chunk type, body)...]); for a simple
        reply the list is empty (only for commands without data)."""
        head = self.recv(4)
        (magic,) = struct.unpack(">I", head)
        if magic == p.NBD_SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv(12))
            return handle, error, []
        assert magic == p.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks, error = [], 0
        while True:
            flags, kind, handle, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            chunks.append((kind, body))
            if kind & p.NBD_REPLY_TYPE_ERROR_BIT:
                error = p.ERROR_CHUNK.unpack(body[:6])[0]
            if flags & p.NBD_REPLY_FLAG_DONE:
                return handle, error, chunks
            head = self.recv(4)
            assert struct.unpack(">I", head)[0] == p.NBD_STRUCTURED_REPLY_MAGIC

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[bytes, list[int]]:
        """A structured read: (bytes, the chunk types it came in)."""
        self.request(Command.NBD_CMD_READ, offset, length, flags)
        _, error, chunks = self.any_reply()
        assert not error, error
        buf, kinds = bytearray(length), []
        for kind, body in chunks:
            kinds.append(kind)
            if kind == ReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
                start = p.OFFSET.unpack(body[:8])[0] - offset
                buf[start:start + len(body) - 8] = body[8:]
            elif kind == ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE:
                start, size = p.OFFSET_HOLE.unpack(body)
                assert start - offset + size <= length
        return bytes(buf), kinds

    def disconnect(self) -> None:
        self.request(Command.NBD_CMD_DISC)


def info_data(name: str, requests: list[int]) -> bytes:
    return (p.string_with_length(name) + p.U16.pack(len(requests))
            + b"".join(p.U16.pack(r) for r in requests))


def meta_context_data(name: str, queries: tuple[str, ...]) -> bytes:
    return (p.string_with_length(name) + p.U32.pack(len(queries))
            + b"".join(p.string_with_length(q) for q in queries))

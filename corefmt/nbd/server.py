"""The NBD server: fixed newstyle negotiation and the transmission phase.

One thread accepts; each connection has a few worker threads. One of them
reads requests and serves each itself; another takes over reading when a
request keeps it busy (see _Turns), so a slow request does not hold up
the ones behind it and replies may leave out of order (the protocol
allows it); one lock serializes what goes onto the socket. Memory per
client is bounded: the workers bound the requests in flight, their
payload bytes are budgeted, option data and payloads have hard limits,
and a client that does not finish negotiating within the handshake limit
is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from corefmt.errors import CorefmtError
from corefmt.nbd import protocol as p
from corefmt.nbd.export import (
    MAX_PAYLOAD,
    Export,
    NbdRequestError,
    error_code,
)
from corefmt.nbd.protocol import Command, CommandFlags, Error, Info, Option, Reply

if TYPE_CHECKING:
    import ssl

    from corefmt.nbd.tls import TlsChannel

log = logging.getLogger("corefmt.nbd")

DEFAULT_ADDRESS = "127.0.0.1"
#: Seconds a client may take to finish negotiating (qemu-nbd's --handshake-limit).
DEFAULT_HANDSHAKE_LIMIT = 10.0
#: Option data above this is a hostile client: hard disconnect.
MAX_OPTION_LENGTH = 64 * 1024
#: Meta context queries in one option.
MAX_QUERIES = 64
#: Per connection: threads serving requests (so requests in flight), and
#: the payload bytes (read and write buffers) they may hold at once.
WORKERS = 4
#: Seconds a request may keep the reading worker busy before another worker
#: starts reading the requests behind it.
TAKE_OVER_AFTER = 0.001
#: Seconds without a request after which the watching worker stops polling
#: (an idle connection costs no CPU; the next request wakes it). Before
#: that its polls space out: each waits half the time since the last request.
IDLE_AFTER = 1.0
MAX_IN_FLIGHT_BYTES = 2 * MAX_PAYLOAD
#: How often the accept loop looks whether it should stop.
ACCEPT_POLL = 0.2
LISTEN_BACKLOG = 16

_KNOWN_CLIENT_FLAGS = int(p.ClientFlags.NBD_FLAG_C_FIXED_NEWSTYLE
                          | p.ClientFlags.NBD_FLAG_C_NO_ZEROES)
_COMMANDS = frozenset(int(command) for command in Command)
_PAYLOAD_COMMANDS = frozenset((int(Command.NBD_CMD_READ), int(Command.NBD_CMD_WRITE)))
#: Buffers given to one sendmsg (well under the kernel's IOV_MAX of 1024).
SENDMSG_PARTS = 64
#: Request headers are received this many bytes at a time: one recv takes
#: every request a client has queued (16 at queue depth 16) instead of one.
INBOX_SIZE = 64 * 1024
# Command flags as plain ints: an IntFlag operation costs a Python call per
# request, these cost none.
_FUA = int(CommandFlags.NBD_CMD_FLAG_FUA)
_NO_HOLE = int(CommandFlags.NBD_CMD_FLAG_NO_HOLE)
_DF = int(CommandFlags.NBD_CMD_FLAG_DF)
_REQ_ONE = int(CommandFlags.NBD_CMD_FLAG_REQ_ONE)
_FAST_ZERO = int(CommandFlags.NBD_CMD_FLAG_FAST_ZERO)
_KNOWN_COMMAND_FLAGS = _FUA | _NO_HOLE | _DF | _REQ_ONE | _FAST_ZERO


class Disconnect(Exception):
    """End this connection (a protocol violation, EOF or an abort)."""


class _Budget:
    """Payload bytes in flight on one connection; a request waits for room
    before its buffer is taken (one larger than the whole budget waits for
    all of it)."""

    def __init__(self, total: int):
        self._total = total
        self._free = total
        self._condition = threading.Condition()

    def acquire(self, size: int) -> None:
        if not size:
            return
        need = min(size, self._total)
        with self._condition:
            if self._free < need:
                self._condition.wait_for(lambda: self._free >= need)
            self._free -= size

    def release(self, size: int) -> None:
        if not size:
            return
        with self._condition:
            self._free += size
            self._condition.notify_all()


class _Turns:
    """Which worker reads the next request.

    Handing every request to another thread cost more than serving it: each
    handoff is a thread wake-up and a GIL transfer, and at queue depth 16
    one worker alone answered twice as many reads per second as four
    taking turns. So the worker that reads a request serves it and then
    reads the next. Another worker watches: when the reader has been busy
    serving for TAKE_OVER_AFTER, the watcher takes over reading, and a
    third worker becomes the watcher. Slow requests (a remote base, a
    flush) are thus served in parallel, up to WORKERS at a time, while
    fast ones cost no thread switch. The watcher polls every
    TAKE_OVER_AFTER while requests come quickly, less often as they come
    more slowly, and not at all once the connection is idle; the next
    request wakes a watcher that waits longer than TAKE_OVER_AFTER.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.reading = False    # a worker holds the reader's role
        self.left_at = 0.0      # when the reader last left the role to serve a request
        self.started = False    # a worker has taken the role once
        self.watching = False   # a worker waits to take the role over ...
        self.asleep = False     # ... longer than TAKE_OVER_AFTER (requests were slow)
        self.ending = False
        self.reason: BaseException | None = None

    def claim(self, returning: bool) -> bool:
        """Wait for the reader's role (called with ``changed`` held); False
        once the connection is ending. A worker ``returning`` from serving
        takes a free role at once (as the first worker does); one starting
        late watches, or the workers would alternate."""
        if not self.reading and not self.ending and (returning or not self.started):
            self.reading = self.started = True
            return True
        while self.watching and not self.ending:
            self.changed.wait()
        if self.ending:
            return False
        self.watching = True
        try:
            while not self.ending:
                now = time.monotonic()
                if not self.reading:
                    busy = now - self.left_at
                    if busy >= TAKE_OVER_AFTER:
                        self.reading = True
                        return True
                    timeout: float | None = TAKE_OVER_AFTER - busy
                elif (quiet := now - self.left_at) >= IDLE_AFTER:
                    timeout = None
                else:
                    timeout = max(TAKE_OVER_AFTER, quiet / 2)
                self.asleep = timeout is None or timeout > TAKE_OVER_AFTER
                self.changed.wait(timeout)
            return False
        finally:
            self.watching = self.asleep = False
            self.changed.notify_all()  # another worker becomes the watcher

    def leave(self) -> None:
        """The reader goes to serve what it read (called with ``changed`` held)."""
        self.reading = False
        self.left_at = time.monotonic()
        if self.asleep:
            self.changed.notify_all()

    def end(self, reason: BaseException | None) -> None:
        with self.changed:
            self.ending, self.reading = True, False
            if self.reason is None:
                self.reason = reason
            self.changed.notify_all()


@attrs.define
class _Negotiated:
    structured: bool = False
    no_zeroes: bool = False
    contexts: list[str] = attrs.Factory(list)


class Connection:
    """One client, from greeting to disconnect."""

    def __init__(self, server: NbdServer, sock: socket.socket):
        self.server = server
        self.export = server.export
        self.sock: socket.socket | TlsChannel = sock
        #: With TLS configured, every option but STARTTLS and ABORT waits for it.
        self.tls_active = False
        self.state = _Negotiated()
        self._send_lock = threading.Lock()
        self._broken = False
        #: While negotiating: when the handshake limit runs out (monotonic).
        self._deadline: float | None = None

    # -- socket helpers -------------------------------------------------------------
    def recv_exact(self, length: int) -> bytearray:
        buf = bytearray(length)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_into(self, view: memoryview, least: int | None = None) -> int:
        """Fill ``view``, or (``least``) at least that much of it; the bytes
        received."""
        length = len(view) if least is None else least
        done = 0
        while done < length:
            try:
                if self._deadline is not None:
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        raise Disconnect("the handshake limit ran out")
                    self.sock.settimeout(left)
                count = self.sock.recv_into(view[done:])
            except (TimeoutError, OSError) as error:
                raise Disconnect(f"receive failed: {error}") from None
            if count == 0:
                raise Disconnect("the client closed the connection")
            done += count
        return done

    def skip(self, length: int) -> None:
        while length:
            length -= len(self.recv_exact(min(length, 65536)))

    def send(self, *parts: bytes | memoryview) -> None:
        with self._send_lock:
            if self._broken:
                return
            try:
                if isinstance(self.sock, socket.socket):
                    _send_all(self.sock, parts)
                else:
                    for part in parts:
                        self.sock.sendall(part)
            except OSError:
                self._broken = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    # -- the whole session -------------------------------------------------------------
    def run(self) -> None:
        try:
            limit = self.server.handshake_limit
            self._deadline = time.monotonic() + limit if limit else None
            if self.negotiate():
                self._deadline = None
                self.sock.settimeout(None)
                self.transmission()
        except Disconnect as reason:
            log.debug("client disconnected: %s", reason)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("NBD connection failed")
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- negotiation ---------------------------------------------------------------------
    def negotiate(self) -> bool:
        """Haggle options; True once the client enters transmission."""
        flags = p.HandshakeFlags.NBD_FLAG_FIXED_NEWSTYLE | p.HandshakeFlags.NBD_FLAG_NO_ZEROES
        self.send(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, flags))
        (client_flags,) = p.CLIENT_FLAGS.unpack(self.recv_exact(p.CLIENT_FLAGS.size))
        if client_flags & ~_KNOWN_CLIENT_FLAGS:
            raise Disconnect(f"unknown client flags {client_flags:#x}")
        self.state.no_zeroes = bool(client_flags & p.ClientFlags.NBD_FLAG_C_NO_ZEROES)
        if (self.server.tls is not None
                and not client_flags & p.ClientFlags.NBD_FLAG_C_FIXED_NEWSTYLE):
            raise Disconnect("TLS needs fixed newstyle negotiation")  # as qemu-nbd
        while True:
            header = p.OptionHeader.unpack(self.recv_exact(p.OPTION_HEADER.size))
            if header.magic != p.IHAVEOPT:
                raise Disconnect(f"bad option magic {header.magic:#x}")
            if header.length > MAX_OPTION_LENGTH:
                raise Disconnect(f"option {header.option} of {header.length} bytes")
            data = bytes(self.recv_exact(header.length))
            if self.server.stopping:
                self.reply(header.option, Reply.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if self.option(header.option, data):
                return True

    def reply(self, option: int, reply: int, data: bytes | str = b"") -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.send(p.option_reply(option, reply, raw))

    def option(self, option: int, data: bytes) -> bool:
        """Answer one option; True when it starts transmission."""
        if self.server.tls is not None and not self.tls_active and self._before_tls(option, data):
            return False
        if option == Option.NBD_OPT_EXPORT_NAME:
            if data.decode("utf-8", "replace") != self.export.name:
                raise Disconnect("unknown export name")  # the protocol wants a hard close
            zeroes = b"" if self.state.no_zeroes else bytes(p.EXPORT_NAME_ZEROES)
            self.send(p.EXPORT_NAME_REPLY.pack(
                self.export.size, self.export.transmission_flags(self.state.structured)) + zeroes)
            return True
        if option == Option.NBD_OPT_ABORT:
            self.reply(option, Reply.NBD_REP_ACK)
            raise Disconnect("the client aborted")
        try:
            if option == Option.NBD_OPT_LIST:
                self._list(data)
            elif option in (Option.NBD_OPT_INFO, Option.NBD_OPT_GO):
                return self._info(option, data)
            elif option == Option.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    raise _OptionError(Reply.NBD_REP_ERR_INVALID, "no data expected")
                if self.state.structured:
                    raise _OptionError(Reply.NBD_REP_ERR_INVALID,
                                       "structured replies already negotiated")
                self.state.structured = True
                self.reply(option, Reply.NBD_REP_ACK)
            elif option in (Option.NBD_OPT_LIST_META_CONTEXT, Option.NBD_OPT_SET_META_CONTEXT):
                self._meta_context(option, data)
            elif option == Option.NBD_OPT_STARTTLS:
                if self.tls_active:
                    raise _OptionError(Reply.NBD_REP_ERR_INVALID, "TLS already enabled")
                raise _OptionError(Reply.NBD_REP_ERR_POLICY, "TLS is not configured")
            else:
                raise _OptionError(Reply.NBD_REP_ERR_UNSUP, f"option {option} is not supported")
        except _OptionError as error:
            self.reply(option, error.reply, error.message)
        return False

    def _before_tls(self, option: int, data: bytes) -> bool:
        """The spec's FORCEDTLS mode: True if the option was handled here."""
        if option == Option.NBD_OPT_STARTTLS:
            self._starttls(data)
            return True
        if option == Option.NBD_OPT_EXPORT_NAME:  # cannot be answered with an error
            raise Disconnect("NBD_OPT_EXPORT_NAME before TLS")
        if option == Option.NBD_OPT_ABORT:  # the spec wants an ACK (qemu 7.2 says TLS_REQD)
            return False
        self.reply(option, Reply.NBD_REP_ERR_TLS_REQD,
                   f"Option {option:#x} not permitted before TLS")  # qemu's words
        return True

    def _starttls(self, data: bytes) -> None:
        if data:
            self.reply(Option.NBD_OPT_STARTTLS, Reply.NBD_REP_ERR_INVALID,
                       "option 'starttls' has unexpected length")
            return
        self.reply(Option.NBD_OPT_STARTTLS, Reply.NBD_REP_ACK)
        from corefmt.nbd.tls import TlsChannel  # ssl is imported only for TLS

        assert self.server.tls is not None and isinstance(self.sock, socket.socket)
        channel = TlsChannel(self.sock, self.server.tls)
        self.sock = channel  # from here on nothing goes out in plain text
        try:
            channel.handshake(self._deadline)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise Disconnect(f"TLS handshake failed: {error}") from None
        self.tls_active = True
        log.debug("TLS started (%s)", channel.version)

    def _list(self, data: bytes) -> None:
        if data:
            raise _OptionError(Reply.NBD_REP_ERR_INVALID, "no data expected")
        self.reply(Option.NBD_OPT_LIST, Reply.NBD_REP_SERVER,
                   p.string_with_length(self.export.name))
        self.reply(Option.NBD_OPT_LIST, Reply.NBD_REP_ACK)

    def _info(self, option: int, data: bytes) -> bool:
        reader = _Reader(data)
        name = reader.string()
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)]
        reader.end()
        if name != self.export.name:
            raise _OptionError(Reply.NBD_REP_ERR_UNKNOWN, f"export '{name}' not present")
        export = self.export
        flags = export.transmission_flags(self.state.structured)
        self.reply(option, Reply.NBD_REP_INFO, p.INFO_EXPORT.pack(Info.NBD_INFO_EXPORT,
                                                                   export.size, flags))
        if Info.NBD_INFO_NAME in requests:
            self.reply(option, Reply.NBD_REP_INFO,
                       p.INFO_TYPE.pack(Info.NBD_INFO_NAME) + export.name.encode())
        if Info.NBD_INFO_DESCRIPTION in requests and export.description:
            self.reply(option, Reply.NBD_REP_INFO,
                       p.INFO_TYPE.pack(Info.NBD_INFO_DESCRIPTION) + export.description.encode())
        sizes = export.block_sizes(Info.NBD_INFO_BLOCK_SIZE in requests)
        self.reply(option, Reply.NBD_REP_INFO, p.INFO_BLOCK_SIZE.pack(Info.NBD_INFO_BLOCK_SIZE,
                                                                       *sizes))
        self.reply(option, Reply.NBD_REP_ACK)
        return option == Option.NBD_OPT_GO

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == Option.NBD_OPT_SET_META_CONTEXT
        if setting and not self.state.structured:
            raise _OptionError(Reply.NBD_REP_ERR_INVALID, "structured replies not negotiated")
        reader = _Reader(data)
        name = reader.string()
        count = reader.u32()
        if count > MAX_QUERIES:
            raise _OptionError(Reply.NBD_REP_ERR_TOO_BIG, "too many queries")
        queries = [reader.string() for _ in range(count)]
        reader.end()
        if name != self.export.name:
            raise _OptionError(Reply.NBD_REP_ERR_UNKNOWN, f"export '{name}' not present")
        contexts = self.export.contexts
        chosen: list[str] = []
        for query in queries if queries or setting else [""]:
            for context in contexts:
                if _matches(query, context, setting) and context not in chosen:
                    chosen.append(context)
        for context in chosen:
            self.reply(option, Reply.NBD_REP_META_CONTEXT,
                       p.U32.pack(contexts[context]) + context.encode())
        if setting:
            self.state.contexts = chosen
        self.reply(option, Reply.NBD_REP_ACK)

    # -- transmission -------------------------------------------------------------------
    def transmission(self) -> None:
        """Serve requests until the client is done (the workers: _Turns)."""
        inbox, budget, turns = _Inbox(self), _Budget(MAX_IN_FLIGHT_BYTES), _Turns()
        helpers = [threading.Thread(target=self._take_turns, args=(inbox, budget, turns),
                                    name=f"corefmt-nbd_{index}", daemon=True)
                   for index in range(WORKERS - 1)]
        for helper in helpers:
            helper.start()
        try:
            self._take_turns(inbox, budget, turns)
        finally:
            turns.end(None)
            if self.server.stopping or self._broken:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
            for helper in helpers:  # they finish what they serve
                helper.join()
        if turns.reason is not None:
            raise turns.reason

    def _take_turns(self, inbox: _Inbox, budget: _Budget, turns: _Turns) -> None:
        changed = turns.changed
        returning = False
        while True:
            with changed:
                if not turns.claim(returning):
                    return
            try:
                taken = self._next_request(inbox, budget)
            except BaseException as error:  # nobody reads after this
                turns.end(error)
                return
            if taken is None:
                turns.end(None)
                return
            with changed:
                turns.leave()
            self._serve(*taken, budget)
            returning = True

    def _next_request(self, inbox: _Inbox, budget: _Budget
                      ) -> tuple[p.Request, bytearray | None, int] | None:
        """The next request with its payload and budgeted bytes; None at DISC."""
        request = inbox.request()
        if request.magic != p.NBD_REQUEST_MAGIC:
            raise Disconnect(f"bad request magic {request.magic:#x}")
        kind = request.type
        if kind == Command.NBD_CMD_DISC:
            return None  # the other workers finish what they serve
        cost = min(request.length, MAX_PAYLOAD) if kind in _PAYLOAD_COMMANDS else 0
        budget.acquire(cost)
        try:
            return request, self._payload(request, inbox), cost
        except BaseException:
            budget.release(cost)
            raise

    def _payload(self, request: p.Request, inbox: _Inbox) -> bytearray | None:
        if request.type != Command.NBD_CMD_WRITE:
            return None
        if request.length > MAX_PAYLOAD:  # the payload cannot be taken in bounded memory
            self.send(p.simple_reply(request.handle, Error.NBD_EOVERFLOW))
            raise Disconnect(f"write of {request.length} bytes")
        return inbox.take(request.length)

    def _serve(self, request: p.Request, payload: bytearray | None, cost: int,
               budget: _Budget) -> None:
        try:
            self._execute(request, payload)
        except Exception as error:  # every failure is an error reply, never a crash
            if not isinstance(error, (CorefmtError, NbdRequestError, OSError)):
                log.exception("NBD request %s failed", request)
            self._send_error(request, error_code(error), str(error))
        finally:
            budget.release(cost)

    def _send_error(self, request: p.Request, code: int, message: str) -> None:
        if self.state.structured and request.type in (Command.NBD_CMD_READ,
                                                      Command.NBD_CMD_BLOCK_STATUS):
            self.send(p.error_chunk(request.handle, code, message))
        else:
            self.send(p.simple_reply(request.handle, code))

    def _execute(self, request: p.Request, payload: bytearray | None) -> None:
        export, flags, kind = self.export, request.flags, request.type
        if flags & ~_KNOWN_COMMAND_FLAGS:
            raise NbdRequestError(Error.NBD_EINVAL, f"unknown command flags {flags:#x}")
        if kind not in _COMMANDS:
            raise NbdRequestError(Error.NBD_EINVAL, f"unknown command {kind}")
        if kind == Command.NBD_CMD_FLUSH:
            export.flush()
            self.send(p.simple_reply(request.handle))
            return
        if kind == Command.NBD_CMD_READ and request.length > MAX_PAYLOAD:
            raise NbdRequestError(Error.NBD_EOVERFLOW,
                                  f"read of {request.length} bytes is over the maximum")
        export.check_range(request.offset, request.length)
        fua = bool(flags & _FUA)
        if kind == Command.NBD_CMD_READ:
            self._read(request)
            return
        if kind == Command.NBD_CMD_BLOCK_STATUS:
            self._block_status(request)
            return
        if request.length:
            if kind == Command.NBD_CMD_WRITE:
                assert payload is not None
                export.write(request.offset, memoryview(payload), fua)
            elif kind == Command.NBD_CMD_WRITE_ZEROES:
                export.write_zeroes(request.offset, request.length, fua=fua,
                                    no_hole=bool(flags & _NO_HOLE),
                                    fast=bool(flags & _FAST_ZERO))
            elif kind == Command.NBD_CMD_TRIM:
                export.trim(request.offset, request.length, fua)
            elif kind == Command.NBD_CMD_CACHE:
                export.cache(request.offset, request.length)
        elif kind != Command.NBD_CMD_CACHE:
            export.check_writable()
        self.send(p.simple_reply(request.handle))

    def _read(self, request: p.Request) -> None:
        handle, offset, length = request.handle, request.offset, request.length
        structured = self.state.structured
        whole = bool(request.flags & _DF) or length == 0
        pieces = list(self.export.read_pieces(offset, length, holes=structured and not whole))
        if not structured:
            self.send(p.simple_reply(handle), *(data for _, _, data in pieces if data))
            return
        if length == 0:
            self.send(p.none_chunk(handle))
            return
        parts: list[bytes | memoryview] = []
        for index, (start, size, data) in enumerate(pieces):
            done = index == len(pieces) - 1
            if data is None:
                parts.append(p.hole_chunk(handle, start, size, done))
            else:
                parts += [p.data_chunk_header(handle, start, size, done), data]
        self.send(*parts)

    def _block_status(self, request: p.Request) -> None:
        contexts = self.state.contexts
        if not contexts:
            raise NbdRequestError(Error.NBD_EINVAL, "no metadata context was negotiated")
        if request.length == 0:
            raise NbdRequestError(Error.NBD_EINVAL, "block status of zero bytes")
        one = bool(request.flags & _REQ_ONE)
        chunks = [p.block_status_chunk(
            request.handle, self.export.contexts[context],
            self.export.status(context, request.offset, request.length, one),
            done=index == len(contexts) - 1) for index, context in enumerate(contexts)]
        self.send(*chunks)


class _Inbox:
    """The transmission phase's receive buffer. Requests are parsed out of
    it, and a write's payload is taken from what it holds and then straight
    from the socket (no copy of a large payload through the buffer)."""

    def __init__(self, connection: Connection, size: int = INBOX_SIZE):
        self._connection = connection
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def request(self) -> p.Request:
        if self._end - self._start < p.REQUEST.size:
            self._fill(p.REQUEST.size)
        fields = p.REQUEST.unpack_from(self._buf, self._start)
        self._start += p.REQUEST.size
        return p.Request(*fields)

    def take(self, length: int) -> bytearray:
        out = bytearray(length)
        held = min(length, self._end - self._start)
        out[:held] = self._view[self._start:self._start + held]
        self._start += held
        if held < length:
            self._connection._recv_into(memoryview(out)[held:])
        return out

    def _fill(self, least: int) -> None:
        """Receive until at least ``least`` bytes are held (as many as arrive)."""
        held = self._end - self._start
        if self._start:
            self._buf[:held] = self._view[self._start:self._end]
            self._start, self._end = 0, held
        self._end += self._connection._recv_into(self._view[held:], least - held)


def _send_all(sock: socket.socket, parts: tuple[bytes | memoryview, ...]) -> None:
    """Every part, in order, with as few system calls as the kernel allows:
    one sendmsg for a reply's header and data instead of a sendall each."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        sent = sock.sendmsg(views[:SENDMSG_PARTS])
        while sent and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def _matches(query: str, context: str, setting: bool) -> bool:
    """Whether a meta context query selects ``context``: by its full name, or
    (listing only) "" or a namespace prefix ending in ":" ("qemu:",
    "qemu:dirty-bitmap:") for every context under it, as qemu-nbd lists."""
    if query == context:
        return True
    return not setting and (query == "" or (query.endswith(":") and context.startswith(query)))


class _OptionError(Exception):
    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply
        self.message = message


class _Reader:
    """Option data, read field by field; any overrun is NBD_REP_ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def take(self, count: int) -> bytes:
        if self.position + count > len(self.data):
            raise _OptionError(Reply.NBD_REP_ERR_INVALID, "option data is too short")
        chunk = self.data[self.position:self.position + count]
        self.position += count
        return chunk

    def u16(self) -> int:
        return p.U16.unpack(self.take(p.U16.size))[0]

    def u32(self) -> int:
        return p.U32.unpack(self.take(p.U32.size))[0]

    def string(self) -> str:
        length = self.u32()
        if length > p.NBD_MAX_STRING_SIZE:
            raise _OptionError(Reply.NBD_REP_ERR_TOO_BIG, "string is too long")
        try:
            return self.take(length).decode()
        except UnicodeDecodeError:
            raise _OptionError(Reply.NBD_REP_ERR_INVALID, "string is not UTF-8") from None

    def end(self) -> None:
        if self.position != len(self.data):
            raise _OptionError(Reply.NBD_REP_ERR_INVALID, "option data is too long")


class NbdServer:
    """Serves one export on TCP or a Unix socket until told to stop, or (not
    ``persistent``) until its last client has gone, as qemu-nbd without -t.

    ``with NbdServer(export, port=0) as server:`` listens (``server.port`` is
    the port taken) and serves in the background; ``wait()`` blocks until
    the server is done. With ``tls`` (a server context, e.g. from
    ``corefmt.nbd.tls.server_context``) clients must start TLS first.
    """

    def __init__(self, export: Export, *, host: str = DEFAULT_ADDRESS,
                 port: int = p.NBD_DEFAULT_PORT, unix_socket: str | None = None,
                 persistent: bool = False, handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT,
                 tls: ssl.SSLContext | None = None):
        if export.shared < 1:
            raise CorefmtError(f"Invalid shared connection count '{export.shared}'")
        self.export = export
        self.host, self.port, self.unix_socket = host, port, unix_socket
        self.persistent = persistent
        self.handshake_limit = handshake_limit or None
        self.tls = tls
        self.stopping = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[Connection, threading.Thread] = {}
        self._served = 0
        self._changed = threading.Condition()
        self._done = threading.Event()

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> NbdServer:
        self._listener = self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="corefmt-nbd-accept",
                                        daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> socket.socket:
        try:
            if self.unix_socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                if _is_socket(self.unix_socket):  # a stale socket, as qemu-nbd replaces it
                    os.unlink(self.unix_socket)
                sock.bind(self.unix_socket)
            else:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                self.port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
        except OSError as error:
            where = self.unix_socket or f"{self.host}:{self.port}"
            raise CorefmtError(f"Failed to listen on {where}: {error.strerror or error}"
                               ) from None
        sock.settimeout(ACCEPT_POLL)
        return sock

    def _accept_loop(self) -> None:
        assert self._listener is not None
        try:
            while not self.stopping:
                with self._changed:  # qemu-nbd stops accepting at -e connections
                    self._changed.wait_for(
                        lambda: self.stopping or len(self._connections) < self.export.shared,
                        timeout=ACCEPT_POLL)
                    if self.stopping:
                        break
                    if len(self._connections) >= self.export.shared:
                        continue
                    if not self.persistent and self._served and not self._connections:
                        break
                try:
                    sock, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self.stopping:
                        break
                    continue
                sock.setblocking(True)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._start_connection(sock)
        finally:
            self._finish()

    def _start_connection(self, sock: socket.socket) -> None:
        connection = Connection(self, sock)
        thread = threading.Thread(target=self._run_connection, args=(connection,),
                                  name="corefmt-nbd-client", daemon=True)
        with self._changed:
            self._connections[connection] = thread
            self._served += 1
        thread.start()

    def _run_connection(self, connection: Connection) -> None:
        try:
            connection.run()
        finally:
            with self._changed:
                self._connections.pop(connection, None)
                self._changed.notify_all()

    def _finish(self) -> None:
        with self._changed:
            self.stopping = True
            connections = dict(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        for thread in connections.values():
            thread.join()
        if self._listener is not None:
            self._listener.close()
            if self.unix_socket is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_socket)
        self._done.set()

    def stop(self) -> None:
        """Ask the server to stop (safe from a signal handler): clients are cut off."""
        self.stopping = True  # the accept loop and reader threads poll or get cut off

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server is done; False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join()

    @property
    def address(self) -> str:
        """An NBD URI for the export (as qemu-img and nbdinfo take it; nbds
        with TLS)."""
        name, scheme = self.export.name, "nbds" if self.tls is not None else "nbd"
        if self.unix_socket is not None:
            return f"{scheme}+unix:///{name}?socket={self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}"

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False

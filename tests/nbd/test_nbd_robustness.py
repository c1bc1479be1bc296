"""What issue 14 asks of the server beyond conformance: hostile clients
(hypothesis over both phases) never crash or hang it and stay within a
memory bound; requests of one connection really run in parallel; and an
FVD image served with copy-on-read fills through NBD_CMD_CACHE until its
base is no longer needed.

A short fuzz run is in the default suite; ``-m slow`` runs a long one
(NBD_FUZZ_EXAMPLES examples per phase)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corefmt
from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.hookspecs import hookimpl
from corefmt.nbd import NbdServer, serving
from corefmt.nbd import protocol as p
from corefmt.nbd import server as server_module
from corefmt.nbd.export import MAX_PAYLOAD
from corefmt.nbd.protocol import Command, CommandFlags, Option, Reply, ReplyType
from corefmt.nbd.protocol import TransmissionFlags as TF
from corefmt.nbd.server import (
    MAX_IN_FLIGHT_BYTES,
    MAX_OPTION_LENGTH,
    WORKERS,
    Connection,
    _Turns,
)
from corefmt.storage.file import FileStorageDriver
from tests.fuzzing import CaseTimeout, time_limit
from tests.nbd.conftest import IMAGE_SIZE, MiB, expected_bytes, served
from tests.nbd.nbd_client import Client, info_data, meta_context_data

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

KiB = 1024
SHORT_EXAMPLES = 25  # per phase: 50 in the default run
LONG_EXAMPLES = int(os.environ.get("NBD_FUZZ_EXAMPLES", "2000"))
#: Per case: seconds for the hostile client and then a well-behaved one.
CASE_SECONDS = 5.0
#: A traced peak above this during one case (over what was traced when it
#: began: hypothesis's own memory grows over a run) is unbounded memory: what one
#: connection may hold (its in-flight payload budget) is the most allowed.
MEMORY_BOUND = MAX_IN_FLIGHT_BYTES
#: Address space the process may grow by during a run.
ADDRESS_SPACE_HEADROOM = 1024 * MiB
#: A write whose length claims 4 GiB (the largest a request header can say).
HUGE_LENGTH = 0xFFFFFFFF
#: A length claim the process could allocate but the memory bound forbids.
OVER_BOUND = 2 * MAX_IN_FLIGHT_BYTES
#: Full payloads are sent for writes up to this; above it only a claim.
SENT_PAYLOAD = 64 * KiB
#: The range the well-behaved client reads after each case (data, then a hole).
PROBE_LENGTH = 128 * KiB

#: What the test image reads as (built once: the cases compare against it often).
REFERENCE = expected_bytes()

_KNOWN_FLAGS = int(CommandFlags.NBD_CMD_FLAG_FUA | CommandFlags.NBD_CMD_FLAG_NO_HOLE
                   | CommandFlags.NBD_CMD_FLAG_DF | CommandFlags.NBD_CMD_FLAG_REQ_ONE
                   | CommandFlags.NBD_CMD_FLAG_FAST_ZERO)
_FINAL_REPLIES = {int(r) for r in Reply} - {Reply.NBD_REP_INFO, Reply.NBD_REP_SERVER,
                                             Reply.NBD_REP_META_CONTEXT}


def address_space_guard() -> contextlib.AbstractContextManager[None]:
    """A regression that buffers a 4 GiB claim fails with MemoryError (the
    connection dies, the test sees no EOVERFLOW) instead of eating the host."""
    from corefmt.stress.fuzz import _address_space_guard

    return _address_space_guard(ADDRESS_SPACE_HEADROOM)


@contextlib.contextmanager
def bounded_memory() -> Iterator[None]:
    """Fail if what the block allocates (every thread, so the server's too)
    peaks above MEMORY_BOUND; tracemalloc must be tracing."""
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    yield
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < MEMORY_BOUND, f"{peak / MiB:.0f} MiB traced"


def address(server: NbdServer) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the case's alarm bounds it)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def still_served(server: NbdServer) -> None:
    """A fresh well-behaved client negotiates and reads the right bytes."""
    with Client(address(server)) as client:
        client.go()
        data, _ = client.read(0, PROBE_LENGTH)
        assert data == REFERENCE[:PROBE_LENGTH]
        client.disconnect()


# -- the negotiation phase ---------------------------------------------------------------
#: Options that may end negotiation: only ever in the tail.
_ENDING = (Option.NBD_OPT_EXPORT_NAME, Option.NBD_OPT_GO, Option.NBD_OPT_ABORT)
_OPTIONS = [int(o) for o in Option if o not in _ENDING]
_LENGTHS = [0, 1, 3, 4, MAX_OPTION_LENGTH, MAX_OPTION_LENGTH + 1, OVER_BOUND, 1 << 31,
            HUGE_LENGTH]


@st.composite
def option_payload(draw: st.DrawFn) -> bytes:
    """Option data: random bytes, or a well-shaped INFO/meta-context body
    with a name and queries that may be wrong, cut short or extended."""
    kind = draw(st.sampled_from(("random", "info", "meta")))
    if kind == "random":
        return draw(st.binary(max_size=64))
    name = draw(st.sampled_from(("", "x", "\u00e9" * 3)))
    if kind == "info":
        body = info_data(name, draw(st.lists(st.integers(0, 0xFFFF), max_size=4)))
    else:
        body = meta_context_data(name, tuple(draw(st.lists(
            st.sampled_from(("", p.BASE_ALLOCATION, "qemu:", "base:", "nope")), max_size=4))))
    cut = draw(st.integers(0, len(body)))
    return body[:cut] if draw(st.booleans()) else body + draw(st.binary(max_size=8))


@st.composite
def negotiation_case(draw: st.DrawFn
                     ) -> tuple[int, list[tuple[int, bytes]], bytes, bytes | None]:
    """(client flags, well-framed options, a hostile tail, what the server
    answers the tail with: None for anything, b"" for a plain disconnect)."""
    flags = draw(st.one_of(st.just(3), st.just(1), st.integers(0, 0xFFFFFFFF)))
    options = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(_OPTIONS),
                  st.integers(0, 0xFFFFFFFF).filter(lambda o: o not in _ENDING)),
        option_payload()), max_size=5))
    tail_kind = draw(st.sampled_from(("none", "random", "magic", "length", "cut", "end")))
    option = draw(st.integers(0, 0xFFFFFFFF))
    if tail_kind == "random":
        tail = draw(st.binary(max_size=256))
    elif tail_kind == "magic":  # not IHAVEOPT: a hard disconnect
        magic = draw(st.integers(0, (1 << 64) - 1).filter(lambda m: m != p.IHAVEOPT))
        tail = p.OPTION_HEADER.pack(magic, option, 0)
    elif tail_kind == "length":  # a length claim, the data never sent
        tail = p.OPTION_HEADER.pack(p.IHAVEOPT, option, draw(st.sampled_from(_LENGTHS[1:])))
    elif tail_kind == "end":  # an option that may end negotiation, data mutated
        data = draw(option_payload())
        tail = p.OptionHeader(p.IHAVEOPT, draw(st.sampled_from(_ENDING)), len(data)).pack()
        tail += data
    elif tail_kind == "cut":  # a header cut short
        tail = p.OptionHeader(p.IHAVEOPT, option, 0).pack()[:draw(st.integers(1, 15))]
    else:
        tail = b""
    return flags, options, tail, None if tail_kind in ("random", "end") else b""


def check_option_replies(client: Client, options: list[tuple[int, bytes]]) -> None:
    """Each well-framed option gets well-formed replies ending in an ACK or an
    error; an unknown option is NBD_REP_ERR_UNSUP."""
    for option, _ in options:
        while True:
            magic, replied, reply, length = p.OPTION_REPLY_HEADER.unpack(
                client.recv(p.OPTION_REPLY_HEADER.size))
            assert (magic, replied) == (p.NBD_REP_MAGIC, option)
            assert reply in {int(r) for r in Reply}, hex(reply)
            assert length <= MAX_OPTION_LENGTH
            client.recv(length)
            if reply in _FINAL_REPLIES:
                break
        if option not in {int(o) for o in Option}:
            assert reply == Reply.NBD_REP_ERR_UNSUP


def send_tail(client: Client, tail: bytes) -> bytes:
    """Send the hostile tail, half-close, and take what comes until the
    server closes (it may already have: a reset then is fine)."""
    with contextlib.suppress(OSError):
        client.sock.sendall(tail)
        client.sock.shutdown(socket.SHUT_WR)  # half-open: the server sees EOF
    return read_to_end(client.sock)


def run_negotiation_case(server: NbdServer, flags: int, options: list[tuple[int, bytes]],
                         tail: bytes, tail_reply: bytes | None) -> None:
    try:
        with time_limit(CASE_SECONDS), bounded_memory():
            with Client(address(server)) as client:
                client.greeting(flags)
                if flags & ~3:  # unknown client flags: the server reads no option
                    assert client.closed_by_server()
                else:
                    client.sock.sendall(b"".join(
                        p.OptionHeader(p.IHAVEOPT, option, len(data)).pack() + data
                        for option, data in options))
                    check_option_replies(client, options)
                    answer = send_tail(client, tail)
                    assert tail_reply is None or answer == tail_reply, answer[:64]
            still_served(server)
    except CaseTimeout:
        pytest.fail(f"no end within {CASE_SECONDS} s: {flags:#x} {options} {tail[:64]!r}")


# -- the transmission phase --------------------------------------------------------------
_OFFSETS = [0, 1, 4095, IMAGE_SIZE - 1, IMAGE_SIZE, IMAGE_SIZE + 1, 1 << 63, (1 << 64) - 1]
_REQUEST_LENGTHS = [0, 1, 512, 4096, 64 * KiB, IMAGE_SIZE, MAX_PAYLOAD, MAX_PAYLOAD + 1,
                    1 << 31, HUGE_LENGTH]
_TYPES = [int(c) for c in Command if c != Command.NBD_CMD_DISC]


@st.composite
def request(draw: st.DrawFn) -> p.Request:
    flags = draw(st.one_of(st.integers(0, _KNOWN_FLAGS), st.integers(0, 0xFFFF)))
    kind = draw(st.one_of(st.sampled_from(_TYPES), st.integers(0, 0xFFFF)))
    if kind == Command.NBD_CMD_DISC:
        kind = Command.NBD_CMD_READ
    offset = draw(st.one_of(st.sampled_from(_OFFSETS), st.integers(0, IMAGE_SIZE)))
    length = draw(st.one_of(st.sampled_from(_REQUEST_LENGTHS), st.integers(0, 128 * KiB)))
    if kind == Command.NBD_CMD_WRITE:  # a full payload follows: keep it small
        length = min(length, SENT_PAYLOAD)
    return p.Request(p.NBD_REQUEST_MAGIC, flags, kind, 0, offset, length)


def huge_write(handle: int, length: int) -> bytes:
    return p.Request(p.NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_WRITE, handle, 0, length).pack()


@st.composite
def transmission_case(draw: st.DrawFn
                      ) -> tuple[bool, list[p.Request], bytes, bytes | None]:
    """(structured replies, well-framed requests, a hostile tail, the answer
    to the tail as in negotiation_case)."""
    structured = draw(st.booleans())
    requests = [r._replace(handle=index + 1)
                for index, r in enumerate(draw(st.lists(request(), max_size=8)))]
    tail_kind = draw(st.sampled_from(("none", "random", "magic", "huge", "cut_payload",
                                      "cut_header", "disc")))
    handle = len(requests) + 1
    if tail_kind == "random":
        tail = draw(st.binary(max_size=256))
    elif tail_kind == "magic":
        magic = draw(st.integers(0, 0xFFFFFFFF).filter(lambda m: m != p.NBD_REQUEST_MAGIC))
        tail = p.Request(magic, 0, Command.NBD_CMD_READ, handle, 0, 512).pack()
    elif tail_kind == "huge":  # claims 4 GiB of payload: refused, never buffered
        tail = huge_write(handle, draw(st.sampled_from(
            (MAX_PAYLOAD + 1, OVER_BOUND, 1 << 31, HUGE_LENGTH))))
    elif tail_kind == "cut_payload":  # a write whose payload stops short
        length = draw(st.sampled_from((4096, MiB, MAX_PAYLOAD)))
        tail = p.Request(p.NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_WRITE, handle, 0,
                         length).pack() + draw(st.binary(max_size=64))
    elif tail_kind == "cut_header":
        tail = p.Request(p.NBD_REQUEST_MAGIC, 0, 0, handle, 0, 512).pack()[
            :draw(st.integers(1, p.REQUEST.size - 1))]
    elif tail_kind == "disc":
        tail = p.Request(p.NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_DISC, handle, 0, 0).pack()
    else:
        tail = b""
    if tail_kind == "huge":
        return structured, requests, tail, overflow(handle)
    return structured, requests, tail, None if tail_kind == "random" else b""


def overflow(handle: int) -> bytes:
    """The answer to a write too large to take: then a disconnect."""
    return p.simple_reply(handle, p.Error.NBD_EOVERFLOW)


def expected_error(request: p.Request, structured: bool) -> int:
    """The NBD error the (read-only) export must answer with, 0 for success:
    EINVAL for what is malformed or out of range, EOVERFLOW for a read over
    the maximum payload, EPERM for a write of any kind."""
    kind, end = request.type, request.offset + request.length
    if request.flags & ~_KNOWN_FLAGS or kind not in _TYPES:
        return p.Error.NBD_EINVAL
    if kind == Command.NBD_CMD_FLUSH:
        return 0
    if kind == Command.NBD_CMD_READ and request.length > MAX_PAYLOAD:
        return p.Error.NBD_EOVERFLOW
    if end > IMAGE_SIZE:
        return p.Error.NBD_EINVAL
    if kind == Command.NBD_CMD_BLOCK_STATUS:  # a context needs structured replies
        return p.Error.NBD_EINVAL if not structured or request.length == 0 else 0
    if kind in (Command.NBD_CMD_WRITE, Command.NBD_CMD_TRIM, Command.NBD_CMD_WRITE_ZEROES):
        return p.Error.NBD_EPERM
    return 0


def take_replies(client: Client, requests: dict[int, p.Request]
                 ) -> dict[int, tuple[int, bytes | None]]:
    """handle -> (error, data read or None), once every request is answered."""
    found: dict[int, tuple[int, bytes | None]] = {}
    done: set[int] = set()
    while len(done) < len(requests):
        (magic,) = p.U32.unpack(client.recv(p.U32.size))
        if magic == p.NBD_SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", client.recv(p.SIMPLE_REPLY.size - 4))
            sent = requests[handle]
            data = None
            if sent.type == Command.NBD_CMD_READ and not error:
                data = client.recv(sent.length)
            assert handle not in done, f"handle {handle} answered twice"
            found[handle] = (error, data)
            done.add(handle)
            continue
        assert magic == p.NBD_STRUCTURED_REPLY_MAGIC, f"{magic:#x}"
        flags, kind, handle, length = struct.unpack(">HHQI", client.recv(
            p.STRUCTURED_REPLY.size - 4))
        body = client.recv(length)
        sent = requests[handle]
        assert handle not in done, f"handle {handle} answered twice"
        error, data = found.get(handle, (0, None))
        if kind & p.NBD_REPLY_TYPE_ERROR_BIT:
            error = p.ERROR_CHUNK.unpack_from(body)[0]
            assert error, "an error chunk without an error"
        elif kind == ReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
            start = p.OFFSET.unpack_from(body)[0] - sent.offset
            assert 0 <= start <= start + length - p.OFFSET.size <= sent.length
            buf = bytearray(data or bytes(sent.length))
            buf[start:start + length - p.OFFSET.size] = body[p.OFFSET.size:]
            data = bytes(buf)
        elif kind == ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE:
            data = data or bytes(sent.length)
        found[handle] = (error, data)
        if flags & p.NBD_REPLY_FLAG_DONE:
            done.add(handle)
    return found


def run_transmission_case(server: NbdServer, structured: bool, requests: list[p.Request],
                          tail: bytes, tail_reply: bytes | None) -> None:
    try:
        with time_limit(CASE_SECONDS), bounded_memory():
            with Client(address(server)) as client:
                client.go(structured=structured)
                client.sock.sendall(b"".join(r.pack() + payload(r) for r in requests))
                by_handle = {r.handle: r for r in requests}
                replies = take_replies(client, by_handle)
                answer = send_tail(client, tail)
                assert tail_reply is None or answer == tail_reply, answer[:64]
            for handle, (error, data) in replies.items():
                sent = by_handle[handle]
                assert error == expected_error(sent, structured), (sent, error)
                if sent.type == Command.NBD_CMD_READ and not error:
                    if data is None and not sent.length:  # a NONE chunk: nothing read
                        data = b""
                    assert data == REFERENCE[sent.offset:sent.offset + sent.length]
            still_served(server)
    except CaseTimeout:
        pytest.fail(f"no end within {CASE_SECONDS} s: {structured} {requests} "
                    f"{tail[:64]!r}")


def payload(request: p.Request) -> bytes:
    return bytes(request.length) if request.type == Command.NBD_CMD_WRITE else b""


def _fuzz(raw_image: Path, examples: int) -> None:
    settings = hypothesis.settings(max_examples=examples, deadline=None, database=None,
                                   derandomize=True, phases=[hypothesis.Phase.explicit,
                                                             hypothesis.Phase.generate,
                                                             hypothesis.Phase.shrink],
                                   suppress_health_check=list(hypothesis.HealthCheck))
    tracemalloc.start()
    try:
        with address_space_guard(), served(raw_image, read_only=True) as server:

            @settings
            @hypothesis.given(negotiation_case())
            @hypothesis.example((3, [], p.OptionHeader(p.IHAVEOPT, Option.NBD_OPT_GO,
                                                        OVER_BOUND).pack(), b""))
            @hypothesis.example((3, [], p.OptionHeader(p.IHAVEOPT, Option.NBD_OPT_INFO,
                                                        HUGE_LENGTH).pack(), b""))
            def negotiation(case: tuple[int, list[tuple[int, bytes]], bytes, bytes | None]
                            ) -> None:
                run_negotiation_case(server, *case)

            @settings
            @hypothesis.given(transmission_case())
            @hypothesis.example((True, [], huge_write(1, HUGE_LENGTH), overflow(1)))
            @hypothesis.example((False, [], huge_write(1, OVER_BOUND), overflow(1)))
            @hypothesis.example((True, [], huge_write(1, MAX_PAYLOAD) + b"cut", b""))
            @hypothesis.example((False, [
                p.Request(p.NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_READ, 1, 0, MAX_PAYLOAD + 1),
                p.Request(p.NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_READ, 2, MiB - 8, 16)],
                b"", b""))
            def transmission(case: tuple[bool, list[p.Request], bytes, bytes | None]
                             ) -> None:
                run_transmission_case(server, *case)

            negotiation()
            transmission()
    finally:
        tracemalloc.stop()


def test_fuzzed_clients_neither_crash_hang_nor_bloat_the_server(raw_image):
    _fuzz(raw_image, SHORT_EXAMPLES)


@pytest.mark.slow
def test_fuzzed_clients_long(raw_image):
    _fuzz(raw_image, LONG_EXAMPLES)


def test_a_4_gib_write_claim_is_refused_without_buffering(raw_image):
    """The one hostile case the bound is about, on a writable export: an
    NBD_EOVERFLOW reply and a disconnect, and nothing near 4 GiB traced."""
    tracemalloc.start()
    try:
        with address_space_guard(), served(raw_image) as server, bounded_memory():
            with Client(address(server)) as client:
                client.go()
                handle = client.request(Command.NBD_CMD_WRITE, 0, HUGE_LENGTH)
                assert client.simple_reply() == (handle, p.Error.NBD_EOVERFLOW, b"")
                assert client.closed_by_server()
            still_served(server)
    finally:
        tracemalloc.stop()


# -- parallel serving ------------------------------------------------------------------------
#: The delayed read's range, and how long the delay filter holds it.
SLOW_OFFSET, SLOW_SECONDS = 0, 1.0
FAST_OFFSET = 3 * MiB
#: Reads at these offsets are held SLOW_SECONDS each (one per worker).
SLOW_OFFSETS = frozenset((SLOW_OFFSET, 4096, 8192, 12288))


class _DelayFilter(Filter):
    """Holds reads that start at SLOW_OFFSETS (blkdebug has no delay rule)."""

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        if offset in SLOW_OFFSETS:
            time.sleep(SLOW_SECONDS)
        super().readinto(offset, buf, flags)


class _DelayDriver(FilterDriver):
    name = "test-delay"

    def open(self, child: BlockNode, options: Any, context: FilterContext) -> Filter:
        return _DelayFilter(child, options, context)


class _DelayPlugin:
    @hookimpl
    def corefmt_register(self, registry: Any) -> None:
        registry.add_filter(_DelayDriver())


@pytest.fixture
def delay_filter() -> Iterator[None]:
    plugin = _DelayPlugin()
    plugins.register_plugin(plugin)
    yield
    plugins.unregister_plugin(plugin)


def test_a_fast_read_overtakes_a_delayed_one_on_the_same_connection(delay_filter, raw_image):
    """Requests of one connection are served in parallel: a read sent after
    a delayed one is answered first (served one at a time, it would wait)."""
    spec = {"driver": "test-delay",
            "file": {"driver": "raw", "file": {"filename": str(raw_image)}}}
    with serving(spec, read_only=True) as server, Client(address(server)) as client:
        client.go()
        began = time.monotonic()
        slow = client.request(Command.NBD_CMD_READ, SLOW_OFFSET, 4096,
                              CommandFlags.NBD_CMD_FLAG_DF)
        fast = client.request(Command.NBD_CMD_READ, FAST_OFFSET, 4096,
                              CommandFlags.NBD_CMD_FLAG_DF)
        first, error, chunks = client.any_reply()
        overtaken_after = time.monotonic() - began
        assert (first, error) == (fast, 0), "the delayed read held up the fast one"
        assert overtaken_after < SLOW_SECONDS
        assert chunks[0][1][p.OFFSET.size:] == REFERENCE[FAST_OFFSET:FAST_OFFSET + 4096]
        second, error, chunks = client.any_reply()
        assert (second, error) == (slow, 0)
        assert chunks[0][1][p.OFFSET.size:] == REFERENCE[SLOW_OFFSET:SLOW_OFFSET + 4096]


def test_slow_requests_are_served_by_every_worker_at_once(delay_filter, raw_image):
    """As many slow reads as there are workers finish together: each worker
    that takes over reading leaves another watching (served by fewer, they
    would take two or more delays)."""
    assert len(SLOW_OFFSETS) == WORKERS
    spec = {"driver": "test-delay",
            "file": {"driver": "raw", "file": {"filename": str(raw_image)}}}
    with serving(spec, read_only=True) as server, Client(address(server)) as client:
        client.go()
        began = time.monotonic()
        handles = {client.request(Command.NBD_CMD_READ, offset, 4096,
                                  CommandFlags.NBD_CMD_FLAG_DF): offset
                   for offset in sorted(SLOW_OFFSETS)}
        for _ in handles:
            handle, error, chunks = client.any_reply()
            offset = handles[handle]
            assert error == 0
            assert chunks[0][1][p.OFFSET.size:] == REFERENCE[offset:offset + 4096]
        assert time.monotonic() - began < 1.8 * SLOW_SECONDS


#: Fast reads sent at once in the test below, and how many may change the
#: serving thread (a take-over when the machine stalls the reader).
BURST_READS, BURST_DEPTH, MAX_THREAD_CHANGES = 2000, 16, 100
#: The test's take-over delay: a loaded machine (the suite runs on two
#: workers) stalls a thread for a millisecond often, for 50 ms seldom.
BURST_TAKE_OVER_AFTER = 0.05


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_fast_requests_are_served_without_switching_threads(monkeypatch, raw_image):
    """Fast reads at queue depth 16 are served by the worker that read them,
    one after the other, with no thread handoff per request (handing each
    to another thread halved the reads per second). The client is qemu-img
    bench in its own process, so this process's GIL serves only the server."""
    served_by: list[int] = []
    serve = Connection._serve

    def recording(self: Connection, *args: Any) -> None:
        served_by.append(threading.get_ident())
        serve(self, *args)

    monkeypatch.setattr(Connection, "_serve", recording)
    monkeypatch.setattr(server_module, "TAKE_OVER_AFTER", BURST_TAKE_OVER_AFTER)
    with served(raw_image, read_only=True) as server:
        uri = f"nbd://127.0.0.1:{server.port}"
        subprocess.run(["qemu-img", "bench", "-f", "raw", "-c", str(BURST_READS),
                        "-d", str(BURST_DEPTH), "-s", "4096", "-S", "1052672", uri],
                       check=True, capture_output=True, timeout=60)
    changes = sum(a != b for a, b in itertools.pairwise(served_by))
    assert len(served_by) >= BURST_READS
    assert changes <= MAX_THREAD_CHANGES, f"{changes} thread changes in {len(served_by)}"


def test_a_worker_back_from_serving_reads_next_and_a_late_one_watches(monkeypatch):
    """The worker back from serving takes the free role at once; a worker
    that starts late takes it only once the reader has been busy for
    TAKE_OVER_AFTER (else two workers would alternate on fast requests)."""
    monkeypatch.setattr(server_module, "TAKE_OVER_AFTER", 0.2)
    turns = _Turns()
    with turns.changed:
        assert turns.claim(returning=False)  # the first worker
        turns.leave()
        began = time.monotonic()
        assert turns.claim(returning=False)  # a late starter: watches first
        assert time.monotonic() - began >= 0.2
        turns.leave()
        began = time.monotonic()
        assert turns.claim(returning=True)
        assert time.monotonic() - began < 0.1


#: Polls the watcher may make in the 50 ms before it sleeps: spaced out
#: (each waits half the time since the last request) they are about 6.
MAX_IDLE_POLLS = 20


def test_an_idle_connections_watcher_polls_less_and_then_sleeps(monkeypatch):
    """While no request comes, the watching worker polls less and less
    often, then stops polling; the next request wakes it."""
    monkeypatch.setattr(server_module, "IDLE_AFTER", 0.05)
    turns = _Turns()
    waits: list[float | None] = []
    wait = turns.changed.wait

    def recording_wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return wait(timeout)

    turns.changed.wait = recording_wait  # type: ignore[method-assign]
    with turns.changed:
        assert turns.claim(returning=False)  # the first worker reads (waits in recv)
        turns.left_at = time.monotonic()  # a request came just now
    claimed = threading.Event()

    def watch() -> None:
        with turns.changed:
            if turns.claim(returning=False):
                claimed.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 5
    while None not in waits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert None in waits, "the watcher still polls an idle connection"
    polls = waits.index(None)
    assert 0 < polls <= MAX_IDLE_POLLS, waits
    assert turns.watching and not claimed.is_set()
    with turns.changed:
        turns.leave()  # the reader read a request and is busy serving it
    assert claimed.wait(5), "the watcher did not take over"
    assert not turns.asleep
    turns.end(None)
    watcher.join(5)


# -- FVD with copy-on-read over NBD ----------------------------------------------------------
FVD_SIZE = 4 * MiB
#: What the first client reads through the export.
CLIENT_READ = (MiB, MiB)
FILL_WAIT = 10.0
QEMU_IO = shutil.which("qemu-io")


def depth_runs(server_socket: str, size: int) -> list[tuple[int, int, int]]:
    """(offset, length, depth) over the export (qemu:allocation-depth)."""
    with Client(server_socket) as client:
        client.go(contexts=(p.QEMU_ALLOCATION_DEPTH,))
        runs, position = [], 0
        while position < size:
            client.request(Command.NBD_CMD_BLOCK_STATUS, position, size - position)
            _, error, chunks = client.any_reply()
            assert not error
            body = chunks[0][1]
            for at in range(4, len(body), p.BLOCK_DESCRIPTOR.size):
                length, depth = p.BLOCK_DESCRIPTOR.unpack_from(body, at)
                runs.append((position, length, depth))
                position += length
        client.disconnect()
    return runs


def top_holds(server_socket: str, offset: int, length: int) -> bool:
    """Whether the FVD image itself (depth 1) holds all of the range."""
    return all(depth == 1 for start, run, depth in depth_runs(server_socket, FVD_SIZE)
               if start < offset + length and start + run > offset)


def wait_until(predicate: Callable[[], bool], seconds: float = FILL_WAIT) -> bool:
    """FVD's copy-on-read fills in the background: poll until they land."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(QEMU_IO is None, reason="needs qemu-io")
def test_fvd_copy_on_read_fills_through_nbd_until_the_base_is_not_needed(
        tmp_path, monkeypatch):
    """The FVD-runs-a-VM path: a client's reads fill the image, a CACHE of the
    whole disk completes it, and served again it needs (opens) no base."""
    from tests.fvd.helpers import random_base

    base, top, sock = tmp_path / "base.raw", tmp_path / "top.fvd", str(tmp_path / "nbd.sock")
    reference = random_base(base, FVD_SIZE, seed=14)
    corefmt.create(str(top), "fvd", FVD_SIZE, backing=str(base), backing_format="raw")
    offset, length = CLIENT_READ
    with serving(str(top), "fvd", copy_on_read=True, unix_socket=sock) as server:
        assert not top_holds(sock, 0, FVD_SIZE)
        subprocess.run([QEMU_IO, "-f", "raw", "-r", server.address,
                        "-c", f"read {offset} {length}"], check=True, capture_output=True,
                       timeout=60)
        assert wait_until(lambda: top_holds(sock, offset, length)), "the read filled nothing"
        assert not top_holds(sock, offset + length, FVD_SIZE - offset - length)
        with Client(sock) as client:
            _, flags = client.go()
            assert flags & TF.NBD_FLAG_SEND_CACHE
            for _ in range(2):  # again once complete: nothing left to do, still fine
                handle = client.request(Command.NBD_CMD_CACHE, 0, FVD_SIZE)
                assert client.any_reply()[:2] == (handle, 0)
            client.disconnect()
        assert top_holds(sock, 0, FVD_SIZE), "NBD_CMD_CACHE left parts of the base unfilled"
    with corefmt.open(str(top), "fvd", read_only=True, backing=False) as alone:
        assert all(extent.allocated for extent in alone.own_status(0, FVD_SIZE))
    base.rename(tmp_path / "moved.raw")  # an open of the base now fails
    opened: list[str] = []
    original_open = FileStorageDriver.open

    def recording_open(self: FileStorageDriver, path: str, **kwargs: Any) -> Any:
        opened.append(os.path.abspath(path))
        return original_open(self, path, **kwargs)

    monkeypatch.setattr(FileStorageDriver, "open", recording_open)
    with serving(str(top), "fvd", unix_socket=sock), Client(sock) as client:
        client.go()
        data, _ = client.read(0, FVD_SIZE)
        assert data == reference
    assert str(top) in opened and str(base) not in opened

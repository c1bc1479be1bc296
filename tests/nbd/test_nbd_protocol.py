"""The server against a raw-socket client: negotiation, every command, the
flags each one passes to the block layer, error codes and hostile clients."""

from __future__ import annotations

import threading
import time

import pytest

from corefmt.errors import NotSupported
from corefmt.flags import RequestFlags
from corefmt.nbd import protocol as p
from corefmt.nbd.protocol import Command, CommandFlags, Error, Info, Option, Reply, ReplyType
from corefmt.nbd.protocol import TransmissionFlags as TF
from tests.nbd.conftest import DATA_RUNS, IMAGE_SIZE, MiB, expected_bytes, served
from tests.nbd.nbd_client import Client, info_data, meta_context_data


def address(server) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


def test_negotiation_list_info_unknown_options(raw_image):
    with served(raw_image) as server, Client(address(server)) as client:
        flags = client.greeting()
        assert flags == (p.HandshakeFlags.NBD_FLAG_FIXED_NEWSTYLE
                         | p.HandshakeFlags.NBD_FLAG_NO_ZEROES)
        client.option(Option.NBD_OPT_LIST)
        (server_reply, name), ack = client.replies()
        assert server_reply == Reply.NBD_REP_SERVER and name == p.string_with_length("")
        assert ack[0] == Reply.NBD_REP_ACK
        client.option(99, b"ignored")
        assert client.replies() == [(Reply.NBD_REP_ERR_UNSUP, b"option 99 is not supported")]
        client.option(Option.NBD_OPT_INFO, info_data("other", []))
        assert client.replies()[-1][0] == Reply.NBD_REP_ERR_UNKNOWN
        client.option(Option.NBD_OPT_INFO, info_data("", [Info.NBD_INFO_NAME])[:-1])
        assert client.replies()[-1][0] == Reply.NBD_REP_ERR_INVALID
        client.option(Option.NBD_OPT_SET_META_CONTEXT, meta_context_data("", (p.BASE_ALLOCATION,)))
        assert client.replies()[-1][0] == Reply.NBD_REP_ERR_INVALID  # needs structured replies
        client.option(Option.NBD_OPT_INFO, info_data("", [Info.NBD_INFO_NAME,
                                                          Info.NBD_INFO_BLOCK_SIZE]))
        infos = {p.INFO_TYPE.unpack(data[:2])[0]: data for reply, data in client.replies()
                 if reply == Reply.NBD_REP_INFO}
        _, size, tflags = p.INFO_EXPORT.unpack(infos[Info.NBD_INFO_EXPORT])
        assert size == IMAGE_SIZE
        assert tflags & TF.NBD_FLAG_SEND_FUA and tflags & TF.NBD_FLAG_SEND_WRITE_ZEROES
        assert not tflags & (TF.NBD_FLAG_READ_ONLY | TF.NBD_FLAG_CAN_MULTI_CONN
                             | TF.NBD_FLAG_SEND_DF)
        assert p.INFO_BLOCK_SIZE.unpack(infos[Info.NBD_INFO_BLOCK_SIZE])[1:] == (
            1, 4096, 32 * MiB)
        assert infos[Info.NBD_INFO_NAME] == p.INFO_TYPE.pack(Info.NBD_INFO_NAME)
        client.option(Option.NBD_OPT_ABORT)
        assert client.replies() == [(Reply.NBD_REP_ACK, b"")]
        assert client.closed_by_server()


def test_list_meta_contexts(raw_image):
    with served(raw_image, allocation_depth=True) as server, Client(address(server)) as client:
        client.greeting()
        client.option(Option.NBD_OPT_LIST_META_CONTEXT, meta_context_data("", ()))
        names = [data[4:].decode() for reply, data in client.replies()
                 if reply == Reply.NBD_REP_META_CONTEXT]
        assert names == [p.BASE_ALLOCATION, p.QEMU_ALLOCATION_DEPTH]
        client.option(Option.NBD_OPT_LIST_META_CONTEXT, meta_context_data("", ("qemu:",)))
        names = [data[4:].decode() for reply, data in client.replies()
                 if reply == Reply.NBD_REP_META_CONTEXT]
        assert names == [p.QEMU_ALLOCATION_DEPTH]


def test_export_name_option_sends_zeroes_unless_no_zeroes(raw_image):
    for client_flags, tail in ((1, p.EXPORT_NAME_ZEROES), (3, 0)):
        with served(raw_image) as server, Client(address(server)) as client:
            client.greeting(client_flags)
            client.option(Option.NBD_OPT_EXPORT_NAME, b"")
            size, _ = p.EXPORT_NAME_REPLY.unpack(client.recv(p.EXPORT_NAME_REPLY.size))
            assert size == IMAGE_SIZE and client.recv(tail) == bytes(tail)
            handle = client.request(Command.NBD_CMD_READ, 0, 16)
            assert client.simple_reply(16) == (handle, 0, b"\xaa" * 16)


def test_wrong_export_name_is_a_hard_disconnect(raw_image):
    with served(raw_image) as server, Client(address(server)) as client:
        client.greeting()
        client.option(Option.NBD_OPT_EXPORT_NAME, b"nope")
        assert client.closed_by_server()


def test_structured_read_sends_holes_as_hole_chunks(raw_image):
    with served(raw_image) as server, Client(address(server)) as client:
        _, flags = client.go()
        assert flags & TF.NBD_FLAG_SEND_DF
        data, kinds = client.read(0, 2 * MiB)
        assert data == expected_bytes()[:2 * MiB]
        assert kinds == [ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE,
                         ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE]
        data, kinds = client.read(0, 2 * MiB, CommandFlags.NBD_CMD_FLAG_DF)
        assert data == expected_bytes()[:2 * MiB]
        assert kinds == [ReplyType.NBD_REPLY_TYPE_OFFSET_DATA]  # DF: one chunk


def test_simple_replies_without_structured_replies(raw_image):
    with served(raw_image) as server, Client(address(server)) as client:
        _, flags = client.go(structured=False)
        assert not flags & TF.NBD_FLAG_SEND_DF
        handle = client.request(Command.NBD_CMD_READ, MiB - 8, 16)
        assert client.simple_reply(16) == (handle, 0, bytes(8) + b"\x11" * 8)
        client.request(Command.NBD_CMD_BLOCK_STATUS, 0, 4096)
        assert client.simple_reply()[1] == Error.NBD_EINVAL  # no context negotiated


def spy(monkeypatch, node, name, calls, fail=None):
    original = getattr(node, name)

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        if fail is not None:
            raise fail
        return original(*args, **kwargs)

    monkeypatch.setattr(node, name, recorded)


def test_write_fua_reaches_the_block_layer(raw_image, monkeypatch):
    with served(raw_image) as server, Client(address(server)) as client:
        client.go()
        calls = []
        spy(monkeypatch, server.export.node, "write", calls)
        client.request(Command.NBD_CMD_WRITE, 8192, 4, CommandFlags.NBD_CMD_FLAG_FUA, b"abcd")
        assert client.any_reply()[1] == 0
        client.request(Command.NBD_CMD_WRITE, 12288, 4, 0, b"efgh")
        assert client.any_reply()[1] == 0
        assert [args[2] for args, _ in calls] == [RequestFlags.FUA, RequestFlags.NONE]
        client.request(Command.NBD_CMD_FLUSH)
        assert client.any_reply()[1] == 0
        assert client.read(8192, 4100)[0] == b"abcd" + b"\xaa" * 4092 + b"efgh"


def test_write_zeroes_flags(raw_image, monkeypatch):
    with served(raw_image, discard="unmap") as server, Client(address(server)) as client:
        client.go()
        calls = []
        spy(monkeypatch, server.export.node, "write_zeroes", calls)
        for flags in (0, CommandFlags.NBD_CMD_FLAG_NO_HOLE,
                      CommandFlags.NBD_CMD_FLAG_FAST_ZERO | CommandFlags.NBD_CMD_FLAG_FUA):
            client.request(Command.NBD_CMD_WRITE_ZEROES, 0, 4096, flags)
            assert client.any_reply()[1] == 0
        assert [(kw["unmap"], kw["flags"]) for _, kw in calls] == [
            (True, RequestFlags.NONE), (False, RequestFlags.NONE),
            (True, RequestFlags.NO_FALLBACK | RequestFlags.FUA)]
        assert client.read(0, 4096)[0] == bytes(4096)
        monkeypatch.undo()
        spy(monkeypatch, server.export.node, "write_zeroes", [], NotSupported("slow zeroes"))
        client.request(Command.NBD_CMD_WRITE_ZEROES, 0, 4096, CommandFlags.NBD_CMD_FLAG_FAST_ZERO)
        assert client.any_reply()[1] == Error.NBD_ENOTSUP


def test_trim_is_ignored_unless_discard_unmap(raw_image, monkeypatch):
    for mode, expected in (("ignore", 0), ("unmap", 1)):
        with served(raw_image, discard=mode) as server, Client(address(server)) as client:
            client.go()
            calls = []
            spy(monkeypatch, server.export.node, "discard", calls)
            client.request(Command.NBD_CMD_TRIM, 0, 65536)
            assert client.any_reply()[1] == 0
            assert len(calls) == expected


def test_detect_zeroes_turns_zero_writes_into_write_zeroes(raw_image, monkeypatch):
    with served(raw_image, detect_zeroes="on") as server, Client(address(server)) as client:
        client.go()
        calls = []
        spy(monkeypatch, server.export.node, "write_zeroes", calls)
        client.request(Command.NBD_CMD_WRITE, 0, 4096, 0, bytes(4096))
        assert client.any_reply()[1] == 0
        client.request(Command.NBD_CMD_WRITE, 0, 4096, 0, b"\x01" * 4096)
        assert client.any_reply()[1] == 0
        assert len(calls) == 1 and calls[0][1]["unmap"] is False


def test_read_only_export_refuses_writes_with_eperm(raw_image):
    with served(raw_image, read_only=True) as server, Client(address(server)) as client:
        _, flags = client.go()
        assert flags & TF.NBD_FLAG_READ_ONLY and not flags & TF.NBD_FLAG_SEND_TRIM
        for command, data in ((Command.NBD_CMD_WRITE, b"x" * 512),
                              (Command.NBD_CMD_WRITE_ZEROES, b""), (Command.NBD_CMD_TRIM, b"")):
            client.request(command, 0, 512, 0, data)
            assert client.any_reply()[1] == Error.NBD_EPERM
        assert client.read(0, 4)[0] == b"\xaa" * 4
    assert raw_image.read_bytes()[:512] == b"\xaa" * 512


def test_out_of_range_and_oversize_requests(raw_image, monkeypatch):
    with served(raw_image) as server, Client(address(server)) as client:
        client.go()
        calls = []  # refused before the block layer sees them
        spy(monkeypatch, server.export.node, "write", calls)
        spy(monkeypatch, server.export.node, "block_status", calls)
        client.request(Command.NBD_CMD_READ, IMAGE_SIZE - 512, 1024)
        assert client.any_reply()[1] == Error.NBD_EINVAL
        client.request(Command.NBD_CMD_WRITE, IMAGE_SIZE, 1, 0, b"x")
        assert client.any_reply()[1] == Error.NBD_EINVAL
        client.request(Command.NBD_CMD_READ, 0, 32 * MiB + 1)
        assert client.any_reply()[1] == Error.NBD_EOVERFLOW
        client.request(Command.NBD_CMD_READ, 0, 1, 1 << 9)  # an unknown flag
        assert client.any_reply()[1] == Error.NBD_EINVAL
        client.request(42)
        assert client.any_reply()[1] == Error.NBD_EINVAL
        assert calls == []
        assert client.read(0, 4)[0] == b"\xaa" * 4  # still serving


def test_block_status_base_allocation_and_depth(raw_image):
    with served(raw_image, allocation_depth=True) as server, Client(address(server)) as client:
        client.go(contexts=(p.BASE_ALLOCATION, p.QEMU_ALLOCATION_DEPTH))
        client.request(Command.NBD_CMD_BLOCK_STATUS, 0, 2 * MiB)
        _, error, chunks = client.any_reply()
        assert not error
        by_context = {}
        for kind, body in chunks:
            assert kind == ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS
            by_context[p.U32.unpack(body[:4])[0]] = [
                p.BLOCK_DESCRIPTOR.unpack_from(body, offset)
                for offset in range(4, len(body), p.BLOCK_DESCRIPTOR.size)]
        hole = p.NBD_STATE_HOLE | p.NBD_STATE_ZERO
        first = DATA_RUNS[1][0]
        assert by_context[1] == [(65536, 0), (first - 65536, hole), (4096, 0),
                                 (MiB - 4096, hole)]
        assert by_context[2] == [(2 * MiB, 1)]  # raw: every byte is the top layer's
        client.request(Command.NBD_CMD_BLOCK_STATUS, 0, 2 * MiB, CommandFlags.NBD_CMD_FLAG_REQ_ONE)
        _, _, chunks = client.any_reply()
        assert len(chunks[0][1]) == 4 + p.BLOCK_DESCRIPTOR.size


def test_pipelined_requests_all_answered(raw_image):
    with served(raw_image) as server, Client(address(server)) as client:
        client.go()
        handles = {}
        for index in range(40):
            offset = (index % 8) * 65536 + 2 * MiB
            if index < 8:
                handles[client.request(Command.NBD_CMD_WRITE, offset, 4096, 0,
                                       bytes([index + 1]) * 4096)] = None
        for _ in range(8):
            handle, error, _ = client.any_reply()
            assert error == 0 and handles.pop(handle, 1) is None
        reads = {client.request(Command.NBD_CMD_READ, 2 * MiB + index * 65536, 4096): index
                 for index in range(8)}
        while reads:
            handle, error, chunks = client.any_reply()
            index = reads.pop(handle)
            assert chunks[0][1][8:] == bytes([index + 1]) * 4096


def test_cache_fills_the_image_through_copy_on_read(tmp_path, raw_image):
    import corefmt
    from corefmt.block.chain import open_chain

    top = tmp_path / "top.qcow2"
    corefmt.create(str(top), "qcow2", backing=str(raw_image), backing_format="raw")
    with served(top, "qcow2", copy_on_read=True) as server, Client(address(server)) as client:
        _, flags = client.go()
        assert flags & TF.NBD_FLAG_SEND_CACHE
        client.request(Command.NBD_CMD_CACHE, 0, 65536)
        assert client.any_reply()[1] == 0
    with open_chain(str(top), "qcow2", read_only=True) as node:
        extents = node.block_status(0, 65536)
        assert [extent.depth for extent in extents] == [0]


# -- hostile clients --------------------------------------------------------------------
def still_serves(server) -> None:
    with Client(address(server)) as client:
        client.go()
        assert client.read(0, 4)[0] == b"\xaa" * 4


@pytest.mark.parametrize("attack", ["garbage", "option_magic", "option_length", "client_flags",
                                    "request_magic", "oversize_write", "half_open"])
def test_hostile_client_is_dropped_and_the_next_one_served(raw_image, attack):
    with served(raw_image, handshake_limit=0.5) as server, Client(address(server)) as client:
        if attack == "garbage":
            client.recv(p.SERVER_GREETING.size)
            client.sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)
        elif attack == "client_flags":
            client.greeting(0xFF00)
        elif attack not in ("request_magic", "oversize_write"):
            client.greeting()
        if attack == "option_magic":
            client.sock.sendall(b"\x00" * 16)
        elif attack == "option_length":
            client.sock.sendall(p.OptionHeader(p.IHAVEOPT, Option.NBD_OPT_GO, 0xFFFFFFF0).pack())
        elif attack in ("request_magic", "oversize_write"):
            client.go()
            if attack == "request_magic":
                client.sock.sendall(b"\xde\xad" * 14)
            else:
                client.request(Command.NBD_CMD_WRITE, 0, 0xFFFFFFFF)
                client.sock.sendall(b"x" * 1024)
                assert client.any_reply()[1] == Error.NBD_EOVERFLOW
        started = time.monotonic()
        assert client.closed_by_server()
        assert time.monotonic() - started < 5
        still_serves(server)


def test_without_persistent_the_server_ends_with_its_last_client(raw_image):
    with served(raw_image, persistent=False) as server:
        with Client(address(server)) as client:
            client.go()
            client.disconnect()
            assert client.closed_by_server()
        assert server.wait(5)


def test_shared_clients_at_once_and_multi_conn(raw_image):
    with served(raw_image, shared=2) as server, Client(address(server)) as first, \
            Client(address(server)) as second:
        _, flags = first.go()
        assert flags & TF.NBD_FLAG_CAN_MULTI_CONN
        second.go()
        assert second.read(0, 4)[0] == first.read(0, 4)[0]


def test_one_client_at_a_time_by_default(raw_image):
    with served(raw_image) as server:
        with Client(address(server)) as first:
            first.go()
            waiting = Client(address(server))  # queued in the backlog, as with qemu-nbd
            done = threading.Event()
            threading.Thread(target=lambda: (waiting.go(), done.set()), daemon=True).start()
            assert not done.wait(0.5)
            first.disconnect()
        assert done.wait(5)
        waiting.close()

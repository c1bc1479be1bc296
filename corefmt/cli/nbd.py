"""corefmt nbd: serve an image or chain over NBD, with qemu-nbd's options.

One difference on purpose: ``-b`` defaults to 127.0.0.1 (qemu-nbd listens on
every address), so an image is not exposed to the network by accident.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from typing import Any

from corefmt.errors import CorefmtError
from corefmt.nbd.export import DETECT_ZEROES_MODES, DISCARD_MODES, Export
from corefmt.nbd.opening import DEFAULT_AIO, DEFAULT_CACHE, open_for_export
from corefmt.nbd.protocol import NBD_DEFAULT_PORT
from corefmt.nbd.server import DEFAULT_ADDRESS, DEFAULT_HANDSHAKE_LIMIT, NbdServer

EXIT_OK = 0
#: -n is --cache=none (qemu-nbd).
NOCACHE_MODE = "none"
#: Ports as qemu-nbd takes them.
MIN_PORT, MAX_PORT = 0, 65535


def add_nbd_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "nbd", help="serve an image over NBD (qemu-nbd's options)",
        description="Export an image (any format and backing chain corefmt opens) over the "
                    "NBD protocol. Without -t the server exits when its last client "
                    "disconnects, as qemu-nbd.")
    parser.add_argument("-f", "--format", dest="format", help="the image's format")
    _add_image_opts(parser)
    parser.add_argument("-r", "--read-only", dest="read_only", action="store_true",
                        help="export read-only")
    parser.add_argument("-x", "--export-name", dest="name", default="",
                        help='the export\'s name (default "")')
    parser.add_argument("-D", "--description", default="", help="the export's description")
    parser.add_argument("-p", "--port", type=_port, default=NBD_DEFAULT_PORT,
                        help=f"TCP port (default {NBD_DEFAULT_PORT})")
    parser.add_argument("-b", "--bind", dest="host", default=DEFAULT_ADDRESS,
                        help=f"address to listen on (default {DEFAULT_ADDRESS}; qemu-nbd's "
                             "is every address)")
    parser.add_argument("-k", "--socket", dest="unix_socket", metavar="PATH",
                        help="listen on a Unix socket instead of TCP")
    parser.add_argument("-t", "--persistent", action="store_true",
                        help="serve client after client (do not exit when one disconnects)")
    parser.add_argument("-e", "--shared", type=_shared, default=1, metavar="N",
                        help="clients that may be connected at once (default 1)")
    parser.add_argument("--pid-file", metavar="PATH",
                        help="write the server's process id here once it listens")
    parser.add_argument("-C", "--copy-on-read", action="store_true",
                        help="copy what is read from the backing chain into the image")
    parser.add_argument("-s", "--snapshot", action="store_true",
                        help="send writes to a temporary qcow2 overlay (the image is not "
                             "changed; the overlay is removed at exit)")
    parser.add_argument("-A", "--allocation-depth", dest="allocation_depth",
                        action="store_true", help="offer the qemu:allocation-depth context")
    parser.add_argument("-B", "--bitmap", dest="bitmaps", action="append", default=[],
                        metavar="NAME",
                        help="offer persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME "
                             "(repeatable)")
    parser.add_argument("-n", "--nocache", action="store_true",
                        help=f"the same as --cache={NOCACHE_MODE}")
    parser.add_argument("--cache", metavar="MODE",
                        help="none, writeback (default), writethrough, directsync or unsafe")
    parser.add_argument("--aio", default=DEFAULT_AIO, metavar="MODE",
                        help="threads (default), native (needs --cache=none or directsync) "
                             "or io_uring: accepted, corefmt has one I/O engine")
    parser.add_argument("--discard", choices=DISCARD_MODES, default="ignore",
                        help="ignore (default) or unmap trim requests")
    parser.add_argument("--detect-zeroes", choices=DETECT_ZEROES_MODES, default="off",
                        help="store written zero blocks as zeroes (unmap: deallocate them, "
                             "needs --discard=unmap)")
    parser.add_argument("--handshake-limit", type=float, default=DEFAULT_HANDSHAKE_LIMIT,
                        metavar="SECONDS",
                        help="drop a client that has not finished negotiating by then "
                             f"(default {DEFAULT_HANDSHAKE_LIMIT:g}; 0: no limit)")
    parser.add_argument("--object", dest="objects", action="append", default=[],
                        metavar="tls-creds-x509,id=ID,dir=DIR,endpoint=server",
                        help="TLS credentials from DIR (ca-cert.pem, server-cert.pem, "
                             "server-key.pem; verify-peer=on (default) needs client "
                             "certificates signed by the CA)")
    parser.add_argument("--tls-creds", metavar="ID",
                        help="require TLS with the --object of this id")
    parser.add_argument("filename")
    parser.set_defaults(run=cmd_nbd)


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not MIN_PORT <= value <= MAX_PORT:
        raise CorefmtError(f"Invalid port '{text}'")
    return value


def _shared(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise CorefmtError(f"Invalid shared device number '{text}'")
    return value


def cmd_nbd(args: argparse.Namespace) -> int:
    from corefmt.cli.main import _image, _protocols

    if args.detect_zeroes == "unmap" and args.discard != "unmap":
        raise CorefmtError("--detect-zeroes=unmap can only be used if --discard=unmap")
    if args.nocache and args.cache is not None:
        raise CorefmtError("-n and --cache can only be specified once")
    cache = NOCACHE_MODE if args.nocache else args.cache or DEFAULT_CACHE
    from corefmt.nbd.tls import credentials  # ssl only when the verb runs

    tls = credentials(args.objects, args.tls_creds)
    with open_for_export(_image(args, "filename", args.format), args.format,
                         read_only=args.read_only, copy_on_read=args.copy_on_read,
                         snapshot=args.snapshot, cache=cache, aio=args.aio,
                         allow_protocols=_protocols(args)) as (node, mode):
        export = Export(node, name=args.name, description=args.description,
                        read_only=args.read_only, discard=args.discard,
                        detect_zeroes=args.detect_zeroes, shared=args.shared,
                        allocation_depth=args.allocation_depth, bitmaps=args.bitmaps,
                        writethrough=mode.writethrough)
        server = NbdServer(export, host=args.host, port=args.port,
                           unix_socket=args.unix_socket, persistent=args.persistent,
                           handshake_limit=args.handshake_limit, tls=tls)
        with server:
            previous = signal.signal(signal.SIGTERM, lambda *_: server.stop())
            try:
                if args.pid_file:
                    _write_pid_file(args.pid_file)
                while not server.wait(1.0):
                    pass
            finally:
                signal.signal(signal.SIGTERM, previous)
                if args.pid_file:
                    _remove(args.pid_file)
        if not node.read_only:
            node.flush()
    return EXIT_OK


def _write_pid_file(path: str) -> None:
    try:
        with open(path, "w") as stream:
            stream.write(f"{os.getpid()}\n")
    except OSError as error:
        raise CorefmtError(f"Cannot write pid file '{path}': {error.strerror}") from None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)

"""NBD export of any image or chain corefmt opens (``corefmt nbd``).

``NbdServer(Export(node), port=0)`` serves an open node; ``serving(image)``
opens the image too and is a context manager::

    with corefmt.nbd.serving("disk.qcow2", unix_socket="/tmp/s") as server:
        subprocess.run(["qemu-img", "info", server.address])
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from corefmt.nbd.export import Export
from corefmt.nbd.opening import DEFAULT_AIO, DEFAULT_CACHE, open_for_export
from corefmt.nbd.protocol import NBD_DEFAULT_PORT
from corefmt.nbd.server import DEFAULT_ADDRESS, DEFAULT_HANDSHAKE_LIMIT, NbdServer

if TYPE_CHECKING:
    import ssl

@contextlib.contextmanager
def serving(image: str | Mapping[str, Any], format: str | None = None, *,
            read_only: bool = False, copy_on_read: bool = False, name: str = "",
            description: str = "", discard: str = "ignore", detect_zeroes: str = "off",
            shared: int = 1, persistent: bool = True, host: str = DEFAULT_ADDRESS,
            port: int = 0, unix_socket: str | None = None,
            handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT,
            allow_protocols: Collection[str] = (), snapshot: bool = False,
            allocation_depth: bool = True, bitmaps: Collection[str] = (),
            cache: str = DEFAULT_CACHE, aio: str = DEFAULT_AIO,
            tls: ssl.SSLContext | None = None) -> Iterator[NbdServer]:
    """Open ``image`` and serve it in the background while the block runs
    (persistent by default: a test or program decides when it ends).

    As qemu-nbd's options: ``snapshot`` (-s) sends writes to a temporary
    overlay, removed at the end; ``allocation_depth`` offers
    qemu:allocation-depth (on unless False, as before -A existed; the CLI's
    -A as qemu-nbd's); ``bitmaps`` (-B) offers each persistent dirty
    bitmap as qemu:dirty-bitmap:NAME; ``cache`` and ``aio`` take
    --cache/--aio's names. ``tls`` (``corefmt.nbd.tls.server_context(DIR)``)
    makes clients start TLS before anything else, as --tls-creds."""
    with open_for_export(image, format, read_only=read_only, copy_on_read=copy_on_read,
                         snapshot=snapshot, cache=cache, aio=aio,
                         allow_protocols=allow_protocols) as (node, mode):
        export = Export(node, name=name, description=description, read_only=read_only,
                        discard=discard, detect_zeroes=detect_zeroes, shared=shared,
                        allocation_depth=allocation_depth, bitmaps=tuple(bitmaps),
                        writethrough=mode.writethrough)
        server = NbdServer(export, host=host, port=port, unix_socket=unix_socket,
                           persistent=persistent, handshake_limit=handshake_limit, tls=tls)
        with server:
            yield server
        if not node.read_only:
            node.flush()


def serve(image: str | Mapping[str, Any], format: str | None = None, **options: Any) -> None:
    """Serve ``image`` in the foreground until the server is done (without
    ``persistent=True``: when its last client disconnects)."""
    options.setdefault("persistent", False)
    options.setdefault("port", NBD_DEFAULT_PORT)
    with serving(image, format, **options) as server:
        server.wait()


__all__ = ["Export", "NbdServer", "serve", "serving"]

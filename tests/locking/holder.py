"""Keeps images open in a process of its own, for the locking tests.

Run as ``python holder.py``; it reads one request a line on stdin and
answers one line on stdout ("ok" or "error: MESSAGE"):

* ``open PATH FORMAT MODE``: open an image (MODE: ro, rw or U = read-only
  with force-share); it stays open, holding its locks, until ``close``;
* ``reopen ro|rw``: switch the open image's mode;
* ``close``: close it (the process lives on).

EOF ends it. It also defines the test format ``lockmeta``: raw's bytes, but
the locking rules of a format with metadata (qemu's qcow2 rules), so
corefmt's side of the metadata-format pairings needs no real such format.
"""

from __future__ import annotations

import sys

from corefmt_raw.driver import RawDriver

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError
from corefmt.registry import Registry

LOCKMETA = "lockmeta"
#: Open modes of the tests: (read_only, force_share).
MODES = {"ro": (True, False), "rw": (False, False), "U": (True, True)}


class LockMetaDriver(RawDriver):
    """raw's data, but not a passthrough format: its file is metadata."""

    name = LOCKMETA
    supports_backing = True  # an explicit backing spec (the backing-lock tests)


def lock_registry() -> Registry:
    """The installed drivers plus ``lockmeta``."""
    installed = plugins.registry()
    registry = Registry()
    for driver in installed.formats.values():
        registry.add_format(driver)
    for storage in installed.storages.values():
        registry.add_storage(storage)
    for filter_driver in installed.filters.values():
        registry.add_filter(filter_driver)
    registry.add_format(LockMetaDriver())
    return registry


def open_image(path: str, format: str, mode: str, registry: Registry) -> BlockNode:
    read_only, force_share = MODES[mode]
    return open_chain(path, format, read_only=read_only, force_share=force_share,
                      backing=False, registry=registry)


def serve(registry: Registry) -> None:
    node: BlockNode | None = None
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "open":
                node = open_image(words[1], words[2], words[3], registry)
            elif words[0] == "reopen":
                assert node is not None
                node.reopen(words[1] == "ro")
            elif words[0] == "close" and node is not None:
                node.close()
                node = None
            answer = "ok"
        except CorefmtError as error:
            answer = f"error: {error}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(lock_registry())

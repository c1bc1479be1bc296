"""corefmt resize: qemu-img 7.2's ``resize`` verb.

As qemu-img, the last word is the size, taken before the options are
parsed, so ``-1G`` shrinks rather than being read as an option; output
("Image resized."), messages and exit statuses are qemu-img's. qemu-img
resize has no ``-U``: a resize always takes the image's write lock.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from corefmt.block.chain import open_chain
from corefmt.ops.resize import PREALLOCATION_MODES, check_preallocation, parse_size_change
from corefmt.ops.resize import resize_node as resize_op

EXIT_OK = 0
HELP_FLAGS = ("-h", "--help")
#: qemu-img resize needs at least a filename and a size.
MIN_WORDS = 2


def add_resize_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "resize", help="change an image's virtual size",
        usage="%(prog)s [-h] [-f FORMAT] [--image-opts] [--allow-protocol LIST] "
              "[--preallocation=MODE] [--shrink] [--object OBJECT] [-q] FILENAME [+|-]SIZE",
        description="Set the virtual size to SIZE, or grow (+SIZE) or shrink (-SIZE) it, as "
                    "qemu-img resize does. Shrinking needs --shrink: data past the new end "
                    "is lost.")
    parser.__class__ = _size_last(type(parser))
    parser.add_argument("-f", dest="format", help="the image's format (probed if not given)")
    _add_image_opts(parser)
    parser.add_argument("--preallocation", default="off", metavar="MODE",
                        help="how the grown part is allocated: " + ", ".join(PREALLOCATION_MODES)
                             + " (what the format supports; default off)")
    parser.add_argument("--shrink", action="store_true",
                        help="allow making the image smaller (data past the end is lost)")
    parser.add_argument("--object", action="append", default=[],
                        help="accepted for qemu-img compatibility (ignored)")
    parser.add_argument("-q", dest="quiet", action="store_true")
    parser.add_argument("filenames", nargs="*", metavar="FILENAME")
    parser.set_defaults(run=cmd_resize, size=None)


def _size_last(base: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    """A parser that takes the last word as the size first, as qemu-img does."""

    class SizeLastParser(base):  # type: ignore[misc, valid-type]
        def parse_known_args(self, args: Sequence[str] | None = None,
                             namespace: argparse.Namespace | None = None):
            from corefmt.cli.main import UsageError

            words = list(args or ())
            if any(word in HELP_FLAGS for word in words):
                return super().parse_known_args(words, namespace)
            if len(words) < MIN_WORDS:
                raise UsageError("Not enough arguments")
            size = words.pop()
            parsed, rest = super().parse_known_args(words, namespace)
            parsed.size = size
            return parsed, rest

    return SizeLastParser


def cmd_resize(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols

    preallocation = check_preallocation(args.preallocation)
    if len(args.filenames) != 1:
        raise UsageError("Expecting image file name and size")
    change = parse_size_change(args.size)  # before the image is opened, as qemu-img
    image = _image(argparse.Namespace(filename=args.filenames[0],
                                      image_opts=args.image_opts), "filename", args.format)
    with open_chain(image, args.format, allow_protocols=_protocols(args)) as node:
        resize_op(node, change, shrink=args.shrink, preallocation=preallocation)
    if not args.quiet:
        print("Image resized.")
    return EXIT_OK

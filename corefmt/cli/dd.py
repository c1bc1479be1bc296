"""corefmt dd: qemu-img 7.2's ``dd`` verb (bs=, count=, skip=, if=, of=).

Operands, messages, exit statuses and the output image are qemu-img's (see
corefmt/ops/dd.py for its size arithmetic). corefmt adds the shared
progress options (qemu-img dd has none): ``-p``, ``--progress``, ``-q``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from corefmt.cli.progress import add_progress_arguments, progress_for
from corefmt.ops import dd as dd_op

EXIT_OK = 0


def add_dd_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "dd", help="copy part of an image into a new image, dd style",
        usage="%(prog)s [-h] [-f FORMAT] [-O OUTPUT_FORMAT] [--image-opts] "
              "[--allow-protocol LIST] [-U] [-p] "
              "[--progress={qemu,bar,json}] [-q] [bs=BLOCK_SIZE] [count=BLOCKS] "
              "[skip=BLOCKS] if=INPUT of=OUTPUT",
        description="Copy the input from block skip= on (count= blocks counted from the "
                    "start of the input, as qemu-img counts them) into a new image of "
                    "exactly that size, as qemu-img dd does. bs= is in bytes (default "
                    "512; k, M, G... suffixes), count= and skip= in blocks.")
    parser.add_argument("-f", dest="format", help="the input's format (probed if not given)")
    parser.add_argument("-O", dest="output_format", default="raw",
                        help="the output's format (default raw)")
    _add_image_opts(parser)
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open the input without taking its locks")
    add_progress_arguments(parser)
    parser.add_argument("operands", nargs="*", metavar="OPERAND",
                        help="bs=BYTES, count=N, skip=N, if=FILE, of=FILE")
    parser.set_defaults(run=cmd_dd)


def cmd_dd(args: argparse.Namespace) -> int:
    from corefmt.cli.main import _image, _protocols

    operands = dd_op.parse_operands(args.operands)
    source = _image(argparse.Namespace(filename=operands.input, image_opts=args.image_opts),
                    "filename", args.format)
    with progress_for(args, "dd") as progress:
        dd_op.dd(operands, source_format=args.format, output_format=args.output_format,
                 force_share=args.force_share, allow_protocols=_protocols(args),
                 source=source, progress=progress, warn=_warn)
    return EXIT_OK


def _warn(message: str) -> None:
    """qemu-img reports a skip past the end as an error line, and exits 0."""
    sys.stderr.write(f"corefmt: {message}\n")

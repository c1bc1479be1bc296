"""corefmt stream: QEMU's block-stream job as a command (no qemu-img verb
does this): progress is qemu-img's ``-p`` line, messages follow commit's."""

from __future__ import annotations

import argparse
from typing import Any

from corefmt.cli.progress import add_progress_arguments, progress_for

EXIT_OK = 0


def add_stream_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "stream", help="copy what an image reads from its chain into it",
        description="Copy into the image everything it reads from its backing chain above "
                    "BASE, then make BASE its backing file (without -b: no backing file). "
                    "Safe to interrupt: a rerun copies only what is missing.")
    parser.add_argument("-f", dest="format")
    _add_image_opts(parser)
    parser.add_argument("-b", dest="base", help="the image of the chain to keep as backing")
    add_progress_arguments(parser)
    parser.add_argument("filenames", nargs="*", metavar="FILENAME")
    parser.set_defaults(run=cmd_stream)


def cmd_stream(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols
    from corefmt.ops.stream import stream

    if len(args.filenames) != 1:
        raise UsageError("Expecting one image file name")
    image = _image(argparse.Namespace(filename=args.filenames[0], image_opts=args.image_opts),
                   "filename", args.format)
    with progress_for(args, "stream") as progress:
        result = stream(image, args.format, base=args.base, progress=progress,
                        allow_protocols=_protocols(args))
    if not args.quiet:
        if not result.had_backing:
            print(f"'{args.filenames[0]}' has no backing file: nothing to stream")
        else:
            print("Image streamed.")
    return EXIT_OK

"""corefmt commit: qemu-img commit's options, messages and exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from corefmt.cli.progress import add_progress_arguments, progress_for

EXIT_OK = 0
COMMITTED = "Image committed."


def add_commit_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "commit", help="write an image's data into its backing file",
        description="Write everything the image holds (and, with -b, every image between) "
                    "into its backing file or BASE, then empty the image unless -d. -b "
                    "implies -d, as in qemu-img.")
    parser.add_argument("-f", dest="format")
    _add_image_opts(parser)
    parser.add_argument("-b", dest="base", help="the image of the chain to commit into")
    parser.add_argument("-d", dest="drop", action="store_true",
                        help="keep the image's data (do not empty it)")
    parser.add_argument("-r", dest="rate_limit", metavar="RATE",
                        help="write at most RATE bytes per second (k, M, G suffixes)")
    add_progress_arguments(parser)
    parser.add_argument("-t", dest="cache", default="writeback", help="cache mode")
    parser.add_argument("--object", action="append", default=[],
                        help="accepted for qemu-img compatibility (ignored)")
    parser.add_argument("filenames", nargs="*", metavar="FILENAME")
    parser.set_defaults(run=cmd_commit)


def cmd_commit(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols, parse_rate_limit
    from corefmt.ops.commit import commit

    rate = parse_rate_limit(args.rate_limit)
    if len(args.filenames) != 1:
        raise UsageError("Expecting one image file name")
    image = _image(argparse.Namespace(filename=args.filenames[0], image_opts=args.image_opts),
                   "filename", args.format)
    with progress_for(args, "commit") as progress:
        result = commit(image, args.format, base=args.base, drop=args.drop, rate_limit=rate,
                        cache=args.cache, progress=progress, allow_protocols=_protocols(args))
    if not args.quiet:
        print(COMMITTED)
    if result.not_emptiable:
        sys.stderr.write(f"corefmt: warning: '{args.filenames[0]}' keeps its data (as with "
                         "-d): its format cannot be emptied\n")
    return EXIT_OK

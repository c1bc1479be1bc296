"""corefmt rebase: qemu-img rebase's options, messages and exit codes."""

from __future__ import annotations

import argparse
from typing import Any

from corefmt.cli.progress import add_progress_arguments, progress_for

EXIT_OK = 0


def add_rebase_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "rebase", help="change the backing file of an image",
        description="Change the backing file of an image. Safe mode (the default) first "
                    "copies into the image what the old and new backing chains show "
                    "differently, so the guest view does not change; -u only rewrites the "
                    "reference; -b '' removes the backing file (flattens).")
    parser.add_argument("-f", dest="format")
    _add_image_opts(parser)
    parser.add_argument("-b", dest="backing", help="the new backing file ('': none)")
    parser.add_argument("-F", dest="backing_format", help="the new backing file's format")
    parser.add_argument("-u", dest="unsafe", action="store_true",
                        help="unsafe: only rewrite the reference (the old backing is not "
                             "opened: it may have moved)")
    parser.add_argument("-c", dest="compress", action="store_true",
                        help="store copied clusters compressed (formats that can: qcow2)")
    add_progress_arguments(parser)
    parser.add_argument("-t", dest="cache", default="writeback", help="the image's cache mode")
    parser.add_argument("-T", dest="source_cache", default="writeback",
                        help="the new backing file's cache mode")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open the new backing file without taking its locks")
    parser.add_argument("--object", action="append", default=[],
                        help="accepted for qemu-img compatibility (ignored)")
    parser.add_argument("filenames", nargs="*", metavar="FILENAME")
    parser.set_defaults(run=cmd_rebase)


def cmd_rebase(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols
    from corefmt.ops.rebase import rebase

    if len(args.filenames) != 1:
        raise UsageError("Expecting one image file name")
    if not args.unsafe and args.backing is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    image = _image(argparse.Namespace(filename=args.filenames[0], image_opts=args.image_opts),
                   "filename", args.format)
    with progress_for(args, "rebase") as progress:
        rebase(image, args.backing, args.backing_format, format=args.format,
               unsafe=args.unsafe, compress=args.compress, progress=progress,
               cache=args.cache, source_cache=args.source_cache,
               force_share=args.force_share, allow_protocols=_protocols(args))
    return EXIT_OK

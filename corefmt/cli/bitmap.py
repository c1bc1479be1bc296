"""corefmt bitmap: qemu-img 7.2's bitmap verb, its options, checks and words.

``corefmt bitmap (--add | --remove | --clear | --enable | --disable |
--merge SOURCE)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY]
[--image-opts | -f FMT] IMG BITMAP``: the actions run in the order given on
one read-write open of IMG without its backing chain; a failing action ends
the run (exit 1) and the ones before it are kept.
"""

from __future__ import annotations

import argparse
from typing import Any

from corefmt.block.chain import open_chain
from corefmt.ops.bitmap import GRANULARITY_MASK, BitmapAction, run_actions
from corefmt.ops.measure import image_size

EXIT_OK = 0


class _Act(argparse.Action):
    """Each action option appends to one ordered list (as qemu-img's queue)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        op = self.const
        action = BitmapAction(op, value if op == "merge" else None)
        namespace.actions = [*(namespace.actions or []), action]


class _Granularity(argparse.Action):
    """-g parsed as it comes (qemu-img's cvtnum and its two-line message)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, image_size(value, "granularity"))


def add_bitmap_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "bitmap", help="add, remove, clear, enable, disable or merge persistent bitmaps",
        description="Change an image's persistent dirty bitmaps, as qemu-img bitmap: the "
                    "actions run in the order given; the changes are stored when the "
                    "image closes.")
    parser.set_defaults(actions=[])
    for op in ("add", "remove", "clear", "enable", "disable"):
        parser.add_argument(f"--{op}", action=_Act, const=op, nargs=0,
                            help=f"{op} BITMAP")
    parser.add_argument("--merge", action=_Act, const="merge", metavar="SOURCE",
                        help="merge bitmap SOURCE (of -b SOURCE_FILE, or of IMG) into BITMAP")
    parser.add_argument("-g", "--granularity", action=_Granularity, default=0,
                        help="--add's granularity (default: the cluster size, 4k..64k)")
    parser.add_argument("-b", "--source-file", dest="source_file",
                        help="the image --merge reads SOURCE from")
    parser.add_argument("-F", "--source-format", dest="source_format",
                        help="SOURCE_FILE's format")
    parser.add_argument("-f", dest="format")
    _add_image_opts(parser)
    parser.add_argument("--object", action="append", default=[],
                        help="accepted for qemu-img compatibility (ignored)")
    parser.add_argument("arguments", nargs="*", metavar="IMG BITMAP")
    parser.set_defaults(run=cmd_bitmap)


def cmd_bitmap(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols

    actions: list[BitmapAction] = args.actions
    ops = {action.op for action in actions}
    if not actions:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, "
                         "--disable, or --merge")
    if args.granularity and "add" not in ops:
        raise UsageError("granularity only supported with --add")
    if args.source_format and not args.source_file:
        raise UsageError("-F only supported with -b")
    if args.source_file and "merge" not in ops:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if len(args.arguments) != 2:
        raise UsageError("Expecting filename and bitmap name")
    args.filename, name = args.arguments
    granularity = args.granularity & GRANULARITY_MASK if args.granularity else None
    protocols = _protocols(args)
    with open_chain(_image(args, "filename", args.format), args.format, backing=False,
                    allow_protocols=protocols) as node:
        if args.source_file is None:
            run_actions(node, name, actions, granularity=granularity)
            return EXIT_OK
        with open_chain(args.source_file, args.source_format, read_only=True, backing=False,
                        allow_protocols=protocols) as source:
            run_actions(node, name, actions, granularity=granularity, source=source)
    return EXIT_OK

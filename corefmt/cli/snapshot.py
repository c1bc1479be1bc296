"""corefmt snapshot: qemu-img 7.2's ``snapshot`` verb (-l, -c, -a, -d).

Output, messages and exit statuses are qemu-img's: -l prints the table
(even with -q), the others print nothing when they succeed (no action at
all opens the image and does nothing, as qemu-img); exactly one
action and one image must be given. ``-f`` is corefmt's addition (qemu-img
7.2 probes the format).
"""

from __future__ import annotations

import argparse
from typing import Any

from corefmt.block.chain import open_chain
from corefmt.ops import snapshot as snapshot_op

EXIT_OK = 0
ACTIONS = ("list", "create", "apply", "delete")


class _Action(argparse.Action):
    """One of -l/-c/-a/-d; a second one is qemu-img's "Cannot mix" error."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from corefmt.cli.main import UsageError

        if namespace.action is not None:
            raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
        namespace.action = self.const
        namespace.snapshot = value


def add_snapshot_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots",
        description="List (-l), create (-c), apply (-a) or delete (-d) an image's internal "
                    "snapshots, as qemu-img snapshot does. -a and -d take an id or, if no "
                    "snapshot has that id, a name.")
    parser.add_argument("-f", dest="format", help="the image's format (probed if not given)")
    _add_image_opts(parser)
    parser.add_argument("-q", dest="quiet", action="store_true")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open without taking the image's locks (-l only)")
    parser.add_argument("-l", dest="action", action=_Action, nargs=0, const="list",
                        default=None, help="list the snapshots")
    for flag, action, text in (("-c", "create", "create snapshot NAME"),
                               ("-a", "apply", "revert the image to a snapshot"),
                               ("-d", "delete", "delete a snapshot")):
        parser.add_argument(flag, dest="action", action=_Action, const=action,
                            metavar="SNAPSHOT", help=text)
    parser.add_argument("filenames", nargs="*", metavar="FILENAME")
    parser.set_defaults(run=cmd_snapshot, snapshot=None)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from corefmt.cli.main import UsageError, _image, _protocols

    if len(args.filenames) != 1:
        raise UsageError("Expecting one image file name")
    action = args.action  # qemu-img: no action opens the image and does nothing
    name = args.snapshot
    image = _image(argparse.Namespace(filename=args.filenames[0],
                                      image_opts=args.image_opts), "filename", args.format)
    with open_chain(image, args.format, read_only=action == "list",
                    allow_protocols=_protocols(args), force_share=args.force_share) as node:
        if action == "list":
            snapshots = snapshot_op.list_snapshots(node)
            if snapshots:
                print("\n".join(snapshot_op.table_lines(snapshots)))
        elif action == "create":
            snapshot_op.create_snapshot(node, name)
        elif action == "apply":
            snapshot_op.apply_snapshot(node, name)
        elif action == "delete":
            snapshot_op.delete_snapshot(node, name)
    return EXIT_OK

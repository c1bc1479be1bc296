"""corefmt prefetch: fill an image from its backing chain, resumably.

No qemu-img verb does this (FVD's prefetch ran only inside a VM): progress
is qemu-img's ``-p`` line, the rest follows corefmt's other verbs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from corefmt.block.chain import open_chain
from corefmt.cli.progress import QEMU, add_progress_arguments, progress_for
from corefmt.ops.prefetch import Prefetcher, PrefetchState, PrefetchStatus

EXIT_OK, EXIT_ERROR = 0, 1


def add_prefetch_parser(verbs: Any) -> None:
    from corefmt.cli.main import _add_image_opts

    parser = verbs.add_parser(
        "prefetch", help="copy everything the image reads from its backing chain into it",
        description="Copy everything the image reads from its backing chain into it, "
                    "with FVD's adaptive pipeline. Resumable: fills are made durable every "
                    "64 MiB and a rerun copies only what is missing. A format that can "
                    "record it (FVD) then no longer needs its base.")
    parser.add_argument("-f", dest="format")
    _add_image_opts(parser)
    add_progress_arguments(parser)
    parser.add_argument("--no-throttle", dest="throttle", action="store_false",
                        help="never pause (the base's throughput floor is not watched), "
                             "and run at the caller's CPU priority")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    parser.add_argument("filename")
    parser.set_defaults(run=cmd_prefetch)


def cmd_prefetch(args: argparse.Namespace) -> int:
    from corefmt.cli.main import _image, _protocols

    if args.output == "json" and args.progress == QEMU:
        args.progress = None  # qemu-img's -p line shares stdout: not with JSON
    with progress_for(args, "prefetch") as progress, \
            open_chain(_image(args, "filename", args.format), args.format,
                       allow_protocols=_protocols(args), record_base_version=True) as node:
        had_backing = node.layer().backing is not None
        status = _run_yielding(Prefetcher(node, throttle=args.throttle, progress=progress))
    if args.output == "json":
        print(json.dumps(status.as_dict(), indent=4))
    elif not args.quiet:
        print(_summary(args.filename, status, had_backing))
    return EXIT_OK if status.state is PrefetchState.FINISHED else EXIT_ERROR


def _run_yielding(prefetcher: Prefetcher) -> PrefetchStatus:
    """Run the prefetch on its background thread, which a throttled one
    lowers in CPU priority (background work yields the CPU to the VMs on the
    host), while the caller's thread keeps its own (a lowered one could not
    be raised again without privileges); its failure is raised here."""
    prefetcher.start()
    try:
        prefetcher.wait()
    except BaseException:  # Ctrl-C: stop after the piece in hand
        prefetcher.stop()
        raise
    if prefetcher.failure is not None:
        raise prefetcher.failure
    return prefetcher.status


def _summary(name: str, status: PrefetchStatus, had_backing: bool) -> str:
    if not had_backing:
        return f"'{name}' has no backing file: nothing to prefetch"
    copied = f"Prefetched {status.copied} bytes"
    if status.self_contained:
        return f"{copied}; '{name}' no longer needs its backing file"
    if status.done < status.total:
        return (f"{copied}; {status.total - status.done} bytes are still read from the "
                "backing file (discarded while prefetching): run prefetch again")
    return (f"{copied}; every byte is in '{name}', which still names its backing file "
            "(its format records no completion)")

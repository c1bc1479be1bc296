"""``corefmt``: qemu-img's verbs and options for every installed format."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.imagespec import parse_image_opts
from corefmt.capabilities import CheckFix
from corefmt.cli.help import add_version_and_help
from corefmt.cli.progress import QEMU, QemuProgress, add_progress_arguments, progress_for
from corefmt.errors import CorefmtError
from corefmt.ops import info as info_op
from corefmt.ops import map as map_op
from corefmt.ops import measure as measure_op
from corefmt.ops.convert_settings import (
    CACHE_MODES,
    DEFAULT_CACHE_MODE,
    DEFAULT_WORKERS,
    RATE_LIMIT_INVALID,
)
from corefmt.ops.create import create, create_option_help
from corefmt.options import option_help, parse_option_string
from corefmt.sizes import parse_size

PROGRAM = "corefmt"
EXIT_OK = 0
EXIT_ERROR = 1
#: compare: 0 identical, 1 different, 2 error (as qemu-img).
EXIT_COMPARE_DIFFERENT = 1
EXIT_COMPARE_ERROR = 2


class UsageError(CorefmtError):
    """Bad command-line syntax."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports one line instead of a usage block and exit 2."""

    def error(self, message: str) -> NoReturn:
        verb = self.prog.removeprefix(PROGRAM).strip()
        where = f"{verb}: " if verb else ""
        raise UsageError(f"{where}{message} (see '{self.prog} --help')")


def _print_error(message: str) -> None:
    sys.stderr.write(f"{PROGRAM}: {message}\n")


#: ``-o`` values that ask for the option list instead (qemu-img's).
HELP_WORDS = ("help", "?")


def _wants_option_help(options: list[str] | None) -> bool:
    return bool(options) and any(word in HELP_WORDS
                                 for text in options for word in text.split(","))


def _image(args: argparse.Namespace, name: str, format: str | None = None):
    """A verb's image argument: a filename (``json:`` names included) or, with
    ``--image-opts``, qemu's key=value graph options."""
    value = getattr(args, name)
    if getattr(args, "image_opts", False):
        if format:
            raise UsageError("--image-opts and --format are mutually exclusive")
        return parse_image_opts(value)
    return value


#: qemu-img convert -m: requests in flight.
MIN_COROUTINES, MAX_COROUTINES = 1, 16


def _coroutines(text: str) -> int:
    """-m as qemu-img takes it (1..16); more would only cost memory."""
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not MIN_COROUTINES <= value <= MAX_COROUTINES:
        raise UsageError("Invalid number of coroutines. Allowed number of coroutines is "
                         f"between {MIN_COROUTINES} and {MAX_COROUTINES}")
    return value


def _add_image_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-opts", action="store_true",
                        help="the image is given as key=value options (driver=...,"
                             "file.filename=...), as qemu-img's --image-opts")
    parser.add_argument("--allow-protocol", dest="allow_protocols", action="append",
                        default=[], metavar="LIST",
                        help="protocols (e.g. http,s3, or json) that backing and data file "
                             "names read from images may use; by default only local files "
                             "and the protocol the image itself is on")


def _protocols(args: argparse.Namespace) -> list[str]:
    return [word for text in getattr(args, "allow_protocols", []) for word in text.split(",")
            if word]


# -- verbs --------------------------------------------------------------------------
def cmd_formats(args: argparse.Namespace) -> int:
    registry = plugins.registry()
    print("Supported formats: " + " ".join(sorted(registry.formats)))
    for name in sorted(registry.formats):
        driver = registry.formats[name]
        print(f"\n{name}:" + ("  (backing files supported)" if driver.supports_backing else ""))
        for option, help_text, default in option_help(driver.create_options):
            print(f"  {option:<20} {help_text} (default: {default})")
    print("\nFilters: " + " ".join(sorted(registry.filters)))
    print("\nStorage: " + " ".join(sorted(registry.storages)))
    return EXIT_OK


def cmd_create(args: argparse.Namespace) -> int:
    if _wants_option_help(args.options):
        print(create_option_help(args.format, with_protocol=bool(args.filename)))
        return EXIT_OK
    if not args.filename:
        raise UsageError("Expecting image file name")
    options = parse_option_string(",".join(args.options)) if args.options else {}
    create(args.filename, args.format, args.size, options=options,
           backing=args.backing, backing_format=args.backing_format, unsafe=args.unsafe)
    if not args.quiet:
        from corefmt.ops.create_line import formatting_line

        given = options.pop("size", args.size)
        if given is None:  # the backing file's
            with open_chain(args.filename, args.format, read_only=True, backing=False) as node:
                given = node.virtual_size
        from corefmt.credentials import without_credentials

        backing = without_credentials(args.backing) if args.backing else args.backing
        print(formatting_line(args.filename, plugins.registry().format(args.format),
                              parse_size(given, "image size"), options,
                              backing, args.backing_format))
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with open_chain(_image(args, "filename", args.format), args.format, read_only=True,
                    backing=args.backing_chain,
                    allow_protocols=_protocols(args), force_share=args.force_share) as node:
        layers = info_op.chain_info(node) if args.backing_chain else [info_op.node_info(node)]
    if args.output == "json":
        print(info_op.format_json(layers if args.backing_chain else layers[0]))
    else:
        print("\n\n".join(info_op.format_human(layer) for layer in layers))
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    with open_chain(_image(args, "filename", args.format), args.format, read_only=True,
                    allow_protocols=_protocols(args), force_share=args.force_share) as node:
        entries = list(map_op.map_entries(node))
    if args.output == "json":
        print(map_op.format_json(entries))
    else:
        for line in map_op.human_lines(entries):  # the lines before a refusal, as qemu-img
            print(line, flush=True)
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    if _wants_option_help(args.options):
        print(create_option_help(args.output_format, with_protocol=bool(args.target)))
        return EXIT_OK
    if not args.source or not args.target:
        raise UsageError("Expecting image file name")
    options = parse_option_string(",".join(args.options)) if args.options else {}
    if args.copy_offload and args.sparse_size is not None:
        raise UsageError("Cannot enable copy offloading when -S is used")
    sparse = parse_size(args.sparse_size, "sparse size") if args.sparse_size else (
        0 if args.sparse_size is not None else 4096)
    rate = parse_rate_limit(args.rate_limit)

    def warn(message: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"{PROGRAM}: warning: {message}\n")

    from corefmt.ops.convert import convert

    with progress_for(args, "convert") as progress:
        convert(_image(args, "source", args.format), args.target, source_format=args.format,
                allow_protocols=_protocols(args), force_share=args.force_share,
                target_format=args.output_format, options=options, sparse_size=sparse,
                workers=args.workers, progress=progress, cache=args.cache,
                compress=args.compress, snapshot=args.snapshot, existing=args.existing,
                target_is_zero=args.target_is_zero, source_cache=args.source_cache,
                backing=args.backing, backing_format=args.backing_format, rate_limit=rate,
                copy_offload=args.copy_offload, salvage=args.salvage, warn=warn,
                bitmaps=args.bitmaps, skip_broken_bitmaps=args.skip_broken_bitmaps,
                out_of_order=args.out_of_order)
    return EXIT_OK


def parse_rate_limit(text: str | None) -> int:
    """-r as qemu-img parses it (a size with suffixes; none given: 0, no
    limit); its two-line refusal (convert's and commit's)."""
    if text is None:
        return 0
    try:
        return parse_size(text, "rate limit")
    except CorefmtError:
        error = UsageError(RATE_LIMIT_INVALID.split("\n")[0])
        error.reports = RATE_LIMIT_INVALID.split("\n")
        raise error from None


def cmd_compare(args: argparse.Namespace) -> int:
    """qemu-img compare: 0 identical, 1 different, 2 an image cannot be
    opened, 3 block status cannot be found, 4 data cannot be read."""
    from corefmt.ops.compare import CompareError

    try:
        second_format = args.second_format or args.format
        protocols = _protocols(args)
        with open_chain(_image(args, "first", args.format), args.format, read_only=True,
                        allow_protocols=protocols, force_share=args.force_share) as first, \
                open_chain(_image(args, "second", second_format), second_format,
                           read_only=True, allow_protocols=protocols,
                           force_share=args.force_share) as second, \
                progress_for(args, "compare") as progress:
            try:
                return _compare(args, first, second, progress)
            except CompareError as error:
                _print_error(error.naming(args.first if error.node is first else args.second))
                return error.exit_status
    except CorefmtError as error:
        if args.progress == QEMU and not args.quiet:
            print()  # qemu-img ends its progress line even when an image cannot be opened
        _print_error(str(error))
        return EXIT_COMPARE_ERROR


def _compare(args: argparse.Namespace, first, second, progress) -> int:
    """Compare and print as qemu-img does, its messages between progress lines."""
    from corefmt.ops.compare import compare_nodes

    quiet = args.quiet

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    result = compare_nodes(first, second, strict=args.strict, progress=progress,
                           on_size_mismatch=lambda: say("Warning: Image size mismatch!"))
    if result.size_mismatch and args.strict:
        say("Strict mode: Image size mismatch!")
        return EXIT_COMPARE_DIFFERENT
    if result.identical:
        say("Images are identical.")
        return EXIT_OK
    if result.status_mismatch:
        say(f"Strict mode: Offset {result.mismatch_offset} block status mismatch!")
    else:
        say(f"Content mismatch at offset {result.mismatch_offset}!")
    return EXIT_COMPARE_DIFFERENT


def cmd_check(args: argparse.Namespace) -> int:
    from corefmt.ops import check as check_op

    fix = check_op.REPAIR_MODES.get(args.repair) if args.repair else CheckFix.NONE
    if fix is None:
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                         f"{args.repair}")
    try:
        with open_chain(_image(args, "filename", args.format), args.format,
                        read_only=fix == CheckFix.NONE, backing=False,
                        allow_protocols=_protocols(args), for_check=True,
                        force_share=args.force_share and fix == CheckFix.NONE) as node:
            # As qemu-img: the repairing run's messages, then (if it fixed
            # anything) a second run's, whose report carries the fixed counts.
            first = result = check_op.check_node(node, fix)
            sys.stderr.writelines(line + "\n" for line in first.messages)
            if first.corruptions_fixed or first.leaks_fixed:
                if not args.quiet and args.output != "json":
                    print(check_op.format_human(None, first), flush=True)
                result = check_op.check_node(node)
                sys.stderr.writelines(line + "\n" for line in result.messages)
                result.corruptions_fixed = first.corruptions_fixed
                result.leaks_fixed = first.leaks_fixed
    except check_op.CheckNotSupported as error:
        _print_error(str(error))
        return check_op.EXIT_NOT_SUPPORTED
    except CorefmtError as error:  # the check could not be completed
        sys.stderr.writelines(line + "\n" for line in getattr(error, "check_messages", ()))
        for report in getattr(error, "reports", [str(error)]):
            _print_error(report)
        return check_op.EXIT_CHECK_ERRORS
    if not args.quiet:
        if args.output == "json":
            print(check_op.format_json(result, node))
        else:
            print(check_op.format_human(result))
    if result.check_errors:
        _print_error("Check failed")
    return check_op.exit_status(result)


def cmd_measure(args: argparse.Namespace) -> int:
    if len(args.filenames) > 1:
        raise UsageError("At most one filename argument is allowed.")
    filename = args.filenames[0] if args.filenames else None
    measure_op.check_arguments(filename is not None, args.size, image_opts=args.image_opts,
                               source_format=args.format, snapshot=args.snapshot)
    source = None
    if filename is not None:
        source = _image(argparse.Namespace(filename=filename, image_opts=args.image_opts),
                        "filename", args.format)
    result = measure_op.measure(
        source, size=args.size, target_format=args.output_format, options=args.options,
        source_format=args.format, snapshot=args.snapshot, image_opts=args.image_opts,
        allow_protocols=_protocols(args), force_share=args.force_share)
    if args.output == "json":
        print(measure_op.format_json(result))
    else:
        print(measure_op.format_human(result))
    return EXIT_OK


class _MeasureNow(argparse.Action):
    """measure's options checked as they come, as qemu-img's getopt loop does
    (the first bad one is the one reported)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if self.dest == "output":
            if value not in ("human", "json"):
                raise UsageError("--output must be used with human or json as argument.")
        elif self.dest == "size":
            value = measure_op.image_size(value)
        elif self.dest == "options":
            if not measure_op.is_valid_option_list(value):
                raise UsageError(f"Invalid option list: {value}")
            value = [*(getattr(namespace, self.dest) or []), value]
        setattr(namespace, self.dest, value)


def cmd_amend(args: argparse.Namespace) -> int:
    from corefmt.ops import amend as amend_op

    if args.options is None:
        raise UsageError("Must specify options (-o)")
    progress = QemuProgress() if args.progress and not args.quiet else None
    try:
        text = ",".join(args.options)
        if args.format and amend_op.wants_help(text):
            print(amend_op.amend_option_help(args.format))
            return EXIT_OK
        if len(args.filenames) != 1:
            raise UsageError("Expecting one image file name")
        help_text = amend_op.amend(_image(argparse.Namespace(filename=args.filenames[0],
                                                             image_opts=args.image_opts),
                                          "filename", args.format),
                                   args.format, text, cache=args.cache,
                                   progress=progress.percent if progress else None,
                                   allow_protocols=_protocols(args))
        if help_text is not None:
            print(help_text)
        return EXIT_OK
    finally:
        if progress is not None:
            progress.end()


class _OptionList(argparse.Action):
    """-o checked as qemu-img's getopt loop does (accumulate_options)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from corefmt.ops.measure import is_valid_option_list

        if not is_valid_option_list(value):
            raise UsageError(f"Invalid option list: {value}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), value])


def cmd_io(args: argparse.Namespace) -> int:
    with open_chain(_image(args, "filename", args.format), args.format,
                    read_only=args.read_only, copy_on_read=args.copy_on_read,
                    allow_protocols=_protocols(args),
                    force_share=args.force_share, record_base_version=True) as node:
        from corefmt.cli.iocmd import run_commands

        status = run_commands(node, args.commands or [])
        if not args.read_only:
            node.flush()
    return status


# -- parser -------------------------------------------------------------------------
#: Verbs whose modules (parser and command) are imported only when the
#: command line names them, or when help lists every verb: importing all of
#: them cost every command about 50 ms. In the order help lists them;
#: None marks where -h/--help and --version go.
_MODULE_VERBS: tuple[tuple[str, str, str] | None, ...] = (
    ("prefetch", "corefmt.cli.prefetch", "add_prefetch_parser"),
    ("nbd", "corefmt.cli.nbd", "add_nbd_parser"),
    None,
    ("bench", "corefmt.cli.bench", "add_bench_parser"),
    ("rebase", "corefmt.cli.rebase", "add_rebase_parser"),
    ("commit", "corefmt.cli.commit", "add_commit_parser"),
    ("stream", "corefmt.cli.stream", "add_stream_parser"),
    ("resize", "corefmt.cli.resize", "add_resize_parser"),
    ("dd", "corefmt.cli.dd", "add_dd_parser"),
    ("bitmap", "corefmt.cli.bitmap", "add_bitmap_parser"),
    ("snapshot", "corefmt.cli.snapshot", "add_snapshot_parser"),
    ("stress", "corefmt.cli.stress", "add_stress_parser"),
    ("fuzz", "corefmt.cli.fuzz", "add_fuzz_parser"),
)
_HELP_WORDS = ("-h", "--help")
#: The verbs build_parser defines itself (always added).
_CORE_VERBS = frozenset({"formats", "create", "info", "map", "convert", "compare", "check",
                         "measure", "amend", "io"})


def _wanted_verbs(arguments: Sequence[str] | None) -> set[str] | None:
    """The module verbs a command line needs (None: every one, for help,
    an unknown verb's error or no verb at all)."""
    if arguments is None:
        return None
    verb = next((word for word in arguments if not word.startswith("-")), None)
    names = {entry[0] for entry in _MODULE_VERBS if entry is not None}
    if verb is None or any(word in _HELP_WORDS for word in arguments[:arguments.index(verb)]):
        return None
    if verb in names:
        return {verb}
    return set() if verb in _CORE_VERBS else None


def build_parser(arguments: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; given ``arguments``, only the verb they name
    is added among the module verbs (see _MODULE_VERBS)."""
    wanted = _wanted_verbs(arguments)
    parser = _Parser(prog=PROGRAM, description="Create, convert, inspect and use disk images.",
                     add_help=False)  # -h/--help: add_version_and_help's
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    formats = verbs.add_parser("formats", help="list installed formats and their options")
    formats.set_defaults(run=cmd_formats)

    created = verbs.add_parser("create", help="create a new image")
    created.add_argument("-f", dest="format", default="raw", help="format (default raw)")
    created.add_argument("-o", dest="options", action="append", help="options key=value,...")
    created.add_argument("-b", dest="backing", help="backing file")
    created.add_argument("-F", dest="backing_format", help="backing file format")
    created.add_argument("-q", dest="quiet", action="store_true")
    created.add_argument("-u", dest="unsafe", action="store_true",
                         help="do not open the backing file (the size must be given)")
    created.add_argument("filename", nargs="?")
    created.add_argument("size", nargs="?")
    created.set_defaults(run=cmd_create)

    information = verbs.add_parser("info", help="show facts about an image")
    information.add_argument("-f", dest="format")
    _add_image_opts(information)
    information.add_argument("--output", choices=("human", "json"), default="human")
    information.add_argument("--backing-chain", action="store_true")
    information.add_argument("-U", "--force-share", action="store_true",
                             help="accepted for qemu-img compatibility")
    information.add_argument("filename")
    information.set_defaults(run=cmd_info)

    mapping = verbs.add_parser("map", help="show where the image's data lives")
    mapping.add_argument("-f", dest="format")
    _add_image_opts(mapping)
    mapping.add_argument("--output", choices=("human", "json"), default="human")
    mapping.add_argument("-U", "--force-share", action="store_true")
    mapping.add_argument("filename")
    mapping.set_defaults(run=cmd_map)

    converting = verbs.add_parser("convert", help="convert an image to another format")
    converting.add_argument("-f", dest="format")
    _add_image_opts(converting)
    converting.add_argument("-O", dest="output_format", default="raw")
    converting.add_argument("-o", dest="options", action="append")
    converting.add_argument("-c", dest="compress", action="store_true",
                            help="store data compressed (formats that can: qcow2)")
    add_progress_arguments(converting)
    converting.add_argument("-S", dest="sparse_size",
                            help="zero runs this long are left unallocated (0: off)")
    converting.add_argument("-t", dest="cache", default=DEFAULT_CACHE_MODE,
                            choices=sorted(CACHE_MODES),
                            help=f"target cache mode (default {DEFAULT_CACHE_MODE}; "
                                 "unsafe never flushes, as qemu-img's default)")
    converting.add_argument("-m", dest="workers", type=_coroutines, default=DEFAULT_WORKERS,
                            help="requests in flight")
    converting.add_argument("-n", dest="existing", action="store_true",
                            help="write into an existing target (not created)")
    converting.add_argument("--target-is-zero", action="store_true",
                            help="with -n: the target reads as zeros already")
    converting.add_argument("-W", dest="out_of_order", action="store_true",
                            help="allow out-of-order writes (default: in guest order, as qemu-img)")
    converting.add_argument("-T", dest="source_cache", metavar="SRC_CACHE",
                            help="source cache mode (none/directsync: O_DIRECT)")
    converting.add_argument("-B", dest="backing", metavar="BACKING_FILE",
                            help="create the target over this backing; copy only what the "
                                 "source's top layer holds")
    converting.add_argument("-F", dest="backing_format", metavar="BACKING_FMT")
    converting.add_argument("-r", dest="rate_limit", metavar="RATE",
                            help="write at most RATE bytes per second (k, M, G suffixes)")
    converting.add_argument("-C", dest="copy_offload", action="store_true",
                            help="copy offload (copy_file_range) between raw files")
    converting.add_argument("--salvage", action="store_true",
                            help="go on over read errors (unreadable sectors read as zeros)")
    converting.add_argument("--bitmaps", action="store_true",
                            help="copy the persistent dirty bitmaps too")
    converting.add_argument("--skip-broken-bitmaps", action="store_true",
                            help="with --bitmaps: leave out inconsistent bitmaps")
    converting.add_argument("-U", "--force-share", action="store_true")
    converting.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                            help="copy an internal snapshot: an id or name, or "
                                 "snapshot.id=ID,snapshot.name=NAME")
    converting.add_argument("source", nargs="?")
    converting.add_argument("target", nargs="?")
    converting.set_defaults(run=cmd_convert)

    comparing = verbs.add_parser("compare", help="compare two images' content")
    comparing.add_argument("-f", dest="format")
    _add_image_opts(comparing)
    comparing.add_argument("-F", dest="second_format")
    comparing.add_argument("-s", dest="strict", action="store_true")
    add_progress_arguments(comparing)
    comparing.add_argument("-U", "--force-share", action="store_true",
                           help="open the images without taking their locks")
    comparing.add_argument("first")
    comparing.add_argument("second")
    comparing.set_defaults(run=cmd_compare)

    checking = verbs.add_parser("check", help="check an image's consistency")
    checking.add_argument("-f", dest="format")
    _add_image_opts(checking)
    checking.add_argument("--output", choices=("human", "json"), default="human")
    checking.add_argument("-r", dest="repair", help="repair: leaks or all")
    checking.add_argument("-q", dest="quiet", action="store_true")
    checking.add_argument("-U", "--force-share", action="store_true")
    checking.add_argument("filename")
    checking.set_defaults(run=cmd_check)

    measuring = verbs.add_parser("measure", help="how much space a new image needs")
    measuring.add_argument("--output", action=_MeasureNow, default="human",
                           metavar="human|json")
    measuring.add_argument("-O", dest="output_format", default="raw",
                           help="the new image's format (default raw)")
    measuring.add_argument("-o", dest="options", action=_MeasureNow,
                           help="the new image's create options key=value,...")
    measuring.add_argument("--size", action=_MeasureNow, metavar="N",
                           help="measure an empty image of N bytes")
    measuring.add_argument("-f", dest="format", help="the source image's format")
    measuring.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                           help="an internal snapshot of the source")
    _add_image_opts(measuring)
    measuring.add_argument("--object", action="append", default=[],
                           help="accepted for qemu-img compatibility (ignored)")
    measuring.add_argument("-U", "--force-share", action="store_true")
    measuring.add_argument("filenames", nargs="*", metavar="FILENAME")
    measuring.set_defaults(run=cmd_measure)

    amending = verbs.add_parser("amend", help="change an image's format options in place")
    amending.add_argument("-f", dest="format")
    _add_image_opts(amending)
    amending.add_argument("-o", dest="options", action=_OptionList,
                          help="options key=value,... ('help' lists them)")
    amending.add_argument("-p", dest="progress", action="store_true")
    amending.add_argument("-q", dest="quiet", action="store_true")
    amending.add_argument("-t", dest="cache", default="writeback",
                          help="cache mode (default writeback)")
    amending.add_argument("--force", action="store_true",
                          help="accepted for qemu-img compatibility (encryption only there)")
    amending.add_argument("--object", action="append", default=[],
                          help="accepted for qemu-img compatibility (ignored)")
    amending.add_argument("filenames", nargs="*", metavar="FILENAME")
    amending.set_defaults(run=cmd_amend)

    io_verb = verbs.add_parser("io", help="run qemu-io style commands on an image")
    io_verb.add_argument("-f", dest="format")
    _add_image_opts(io_verb)
    io_verb.add_argument("-c", dest="commands", action="append")
    io_verb.add_argument("-r", dest="read_only", action="store_true")
    io_verb.add_argument("-C", dest="copy_on_read", action="store_true")
    io_verb.add_argument("-U", "--force-share", action="store_true",
                         help="open without taking the image's locks (read-only use)")
    io_verb.add_argument("filename")
    io_verb.set_defaults(run=cmd_io)

    for entry in _MODULE_VERBS:
        if entry is None:
            add_version_and_help(parser, verbs)
            continue
        name, module, adder = entry
        if wanted is None or name in wanted:
            getattr(importlib.import_module(module), adder)(verbs)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a plugin that was skipped...) as one line, like errors."""
    sys.stderr.write(f"{PROGRAM}: warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    verb = next((word for word in arguments if not word.startswith("-")), None)
    try:
        args = parser.parse_args(arguments)
        return args.run(args)
    except CorefmtError as error:
        # Some refusals are several of qemu-img's messages (measure's), each its own line.
        for report in getattr(error, "reports", None) or (str(error),):
            _print_error(report)
        return EXIT_COMPARE_ERROR if verb == "compare" else EXIT_ERROR
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())



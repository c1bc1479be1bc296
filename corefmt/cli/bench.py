"""``corefmt bench``: qemu-img bench 7.2's options, lines and exit codes.

The arguments are read as qemu-img reads them (GNU getopt_long with a
leading ':', argument permutation, unique long-option prefixes), each
value checked as it comes, so the first bad option is the one reported
with qemu-img's message. The requests themselves: corefmt.ops.bench.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Iterator
from typing import Any

import attrs

from corefmt.cli.iocmd import cvtnum
from corefmt.errors import CorefmtError, OptionError
from corefmt.ops import bench as bench_op

EXIT_OK, EXIT_ERROR = 0, 1
VERB = "bench"
#: qemu-img bench 7.2's getopt_long string (the leading ':' silences getopt's messages).
SHORT_OPTIONS = ":hc:d:f:ni:o:qs:S:t:wU"
#: Long options: name -> (takes an argument, the key its value is stored as).
LONG_OPTIONS: dict[str, tuple[bool, str]] = {
    "help": (False, "h"),
    "flush-interval": (True, "flush-interval"),
    "image-opts": (False, "image-opts"),
    "pattern": (True, "pattern"),
    "no-drain": (False, "no-drain"),
    "force-share": (False, "U"),
}
INT_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
ULONG_MAX = 2**64 - 1
PATTERN_MAX = 0xFF
SUFFIX_HINT = ("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
USAGE = ("usage: corefmt bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
         "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] "
         "[-S step_size] [-t cache] [-w] [-U] [--image-opts] filename")
HELP = f"""{USAGE}

Run a simple sequential I/O benchmark on the image, as qemu-img bench:
COUNT requests (default {bench_op.DEFAULT_COUNT}) of BUFFER_SIZE bytes (default
{bench_op.DEFAULT_BUFFER_SIZE}), DEPTH in flight (default {bench_op.DEFAULT_DEPTH}), the first
at OFFSET, each next one STEP_SIZE further (default: the buffer size),
wrapping at the image size. -w writes (the PATTERN byte, default 0);
--flush-interval=N flushes every N requests (draining the queue first
unless --no-drain). -t cache mode (none, off, writeback, writethrough,
directsync, unsafe); -n native AIO (needs -t none or directsync) and
-i threads|native|io_uring are accepted: corefmt has one engine, worker
threads. -U opens without locks (read tests only)."""


class BenchUsage(CorefmtError):
    """A getopt-level refusal: qemu-img adds its "Try ... --help" line."""


@attrs.define
class BenchArgs:
    count: int = bench_op.DEFAULT_COUNT
    depth: int = bench_op.DEFAULT_DEPTH
    format: str | None = None
    offset: int = 0
    buffer_size: int = bench_op.DEFAULT_BUFFER_SIZE
    step: int = 0
    cache: str = bench_op.DEFAULT_CACHE
    aio: str = bench_op.DEFAULT_AIO
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain: bool = True
    image_opts: bool = False
    force_share: bool = False
    help: bool = False
    filenames: list[str] = attrs.Factory(list)


def add_bench_parser(verbs: Any) -> None:
    # Every word after the verb goes to getopt_long below: argparse's own
    # option handling (prefix '+', which no qemu-img option uses) stays out.
    parser = verbs.add_parser(VERB, help="run a simple sequential I/O benchmark (qemu-img bench)",
                              prefix_chars="+", add_help=False)
    parser.add_argument("words", nargs=argparse.REMAINDER)
    parser.set_defaults(run=cmd_bench)


# -- qemu's number parsing -----------------------------------------------------------
_C_SPACES = " \t\n\v\f\r"


def strtoul(text: str) -> int | None:
    """qemu_strtoul(text, NULL, 0, ...): the whole string, base 0 (0x hex, 0
    octal), C's sign rules (a '-' negates modulo 2**64); None if invalid or
    out of range."""
    body = text.lstrip(_C_SPACES)
    negative = body[:1] == "-"
    if body[:1] in "+-" and body:
        body = body[1:]
    base = 10
    if body[:2].lower() == "0x" and len(body) > 2:
        base, body = 16, body[2:]
    elif body[:1] == "0" and len(body) > 1:
        base, body = 8, body[1:]
    try:
        value = int(body, base) if body and body.isalnum() and body.isascii() else None
    except ValueError:
        value = None
    if value is None or value > ULONG_MAX:
        return None
    return (-value) % 2**64 if negative else value


def _counter(text: str, what: str) -> int:
    value = strtoul(text)
    if value is None or value > INT_MAX:
        raise OptionError(f"Invalid {what} specified")
    return value


def _size(text: str, what: str, maximum: int) -> int:
    """qemu-img's cvtnum_full: k/M/G... suffixes, 0..maximum."""
    value = cvtnum(text)
    if value == -errno.EINVAL:
        error = OptionError(f"Invalid {what} specified. You may use k, M, G, T, P or E "
                            "suffixes for")
        error.reports = [str(error), SUFFIX_HINT]  # type: ignore[attr-defined]
        raise error
    if value < 0 or value > maximum:
        raise OptionError(f"Invalid {what} specified. Must be between 0 and {maximum}.")
    return value


# -- getopt_long -----------------------------------------------------------------------
def getopt_long(words: list[str]) -> Iterator[tuple[str, str | None]]:
    """GNU getopt_long over ``words`` with SHORT_OPTIONS/LONG_OPTIONS; yields
    (option, value) and ("", word) for each non-option. Refusals name the
    word qemu-img names (its argv[optind - 1], which for an unknown letter
    inside a cluster is the word before the cluster as permuted)."""
    before = VERB  # what argv[optind - 1] is while scanning inside a word
    last_operand: str | None = None
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            for rest in words[index:]:
                yield "", rest
            return
        if not word.startswith("-") or word == "-":
            last_operand = word
            yield "", word
            continue
        if word.startswith("--"):
            name, has_value, value = word[2:].partition("=")
            matches = [key for key in LONG_OPTIONS if key == name] or \
                [key for key in LONG_OPTIONS if key.startswith(name)]
            if len(matches) != 1:
                raise BenchUsage(f"unrecognized option '{word}'")
            takes_value, key = LONG_OPTIONS[matches[0]]
            if not takes_value:
                if has_value:
                    raise BenchUsage(f"unrecognized option '{word}'")
                yield key, None
            elif has_value:
                yield key, value
            elif index < len(words):
                yield key, words[index]
                index += 1
            else:
                raise BenchUsage(f"missing argument for option '{word}'")
            before = words[index - 1]
            continue
        shown_before = last_operand if last_operand is not None else before
        for position in range(1, len(word)):
            letter = word[position]
            spec = SHORT_OPTIONS.find(letter, 1)
            last = position == len(word) - 1
            if spec < 0 or letter == ":":
                raise BenchUsage(f"unrecognized option '{word if last else shown_before}'")
            if SHORT_OPTIONS[spec + 1:spec + 2] != ":":
                yield letter, None
                continue
            value = word[position + 1:]
            if not value:
                if index >= len(words):
                    raise BenchUsage(f"missing argument for option '{word}'")
                value = words[index]
                index += 1
            yield letter, value
            break
        before = words[index - 1]


def parse_arguments(words: list[str]) -> BenchArgs:
    """qemu-img bench's option loop: each value is checked as it comes."""
    args = BenchArgs()
    for option, value in getopt_long(words):
        text = value or ""
        if option == "":
            args.filenames.append(text)
        elif option == "h":
            args.help = True
            return args
        elif option == "c":
            args.count = _counter(text, "request count")
        elif option == "d":
            args.depth = _counter(text, "queue depth")
        elif option == "f":
            args.format = text
        elif option == "n":
            args.aio = bench_op.NATIVE_AIO
        elif option == "i":
            if text not in bench_op.AIO_MODES:
                raise OptionError(f"Invalid aio option: {text}")
            if args.aio != bench_op.NATIVE_AIO:  # qemu's flags only ever gain native
                args.aio = text
        elif option == "o":
            args.offset = _size(text, "offset", INT64_MAX)
        elif option == "s":
            args.buffer_size = _size(text, "buffer size", INT_MAX)
        elif option == "S":
            args.step = _size(text, "step_size", INT_MAX)
        elif option == "t":
            if text not in bench_op.CACHE_MODES:
                raise OptionError("Invalid cache mode")
            args.cache = text
        elif option == "w":
            args.write = True
        elif option == "U":
            args.force_share = True
        elif option == "pattern":
            pattern = strtoul(text)
            if pattern is None or pattern > PATTERN_MAX:
                raise OptionError("Invalid pattern byte specified")
            args.pattern = pattern
        elif option == "flush-interval":
            args.flush_interval = _counter(text, "flush interval")
        elif option == "no-drain":
            args.drain = False
        elif option == "image-opts":
            args.image_opts = True
        # -q: qemu-img bench prints its lines anyway
    return args


def _fail(message: str) -> int:
    """A refusal qemu-img follows with its "Try ... --help" line."""
    sys.stderr.write(f"corefmt: {message}\nTry 'corefmt {VERB} --help' for more information\n")
    return EXIT_ERROR


def cmd_bench(namespace: argparse.Namespace) -> int:
    from corefmt.block.imagespec import parse_image_opts
    from corefmt.cli.main import _protocols

    try:
        args = parse_arguments(list(namespace.words))
    except BenchUsage as error:
        return _fail(str(error))
    if args.help:
        print(HELP)
        return EXIT_OK
    if len(args.filenames) != 1:
        return _fail("Expecting one image file name")
    bench_op.check_options(write=args.write, depth=args.depth,
                           flush_interval=args.flush_interval, count=args.count)
    filename = args.filenames[0]
    if args.image_opts and args.format:
        raise OptionError("--image-opts and --format are mutually exclusive")
    image = parse_image_opts(filename) if args.image_opts else filename
    node, mode = bench_op.open_for_bench(image, args.format, write=args.write,
                                         cache=args.cache, aio=args.aio,
                                         force_share=args.force_share,
                                         allow_protocols=_protocols(namespace))
    with node:
        print(start_line(args), flush=True)
        if args.flush_interval:
            print(f"Sending flush every {args.flush_interval} requests", flush=True)
        result = bench_op.run_bench(
            node, count=args.count, depth=args.depth, offset=args.offset,
            buffer_size=args.buffer_size, step=args.step, write=args.write,
            pattern=args.pattern, flush_interval=args.flush_interval, drain=args.drain,
            writethrough=mode.writethrough)
        print(f"Run completed in {result.elapsed:.3f} seconds.", flush=True)
    return EXIT_OK


def start_line(args: BenchArgs) -> str:
    """qemu-img bench's first line (its step is the buffer size when -S is 0)."""
    kind = "write" if args.write else "read"
    return (f"Sending {args.count} {kind} requests, {args.buffer_size} bytes each, "
            f"{args.depth} in parallel (starting at offset {args.offset}, "
            f"step size {args.step or args.buffer_size})")

"""``corefmt fuzz``: feed a format driver mutated images (see corefmt.stress.fuzz).

Prints every distinct failure with the command that replays it, then one
summary line; exits non-zero if any case failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from corefmt.errors import OptionError
from corefmt.ops.create import check_create_options
from corefmt.sizes import parse_size
from corefmt.stress.defaults import DEFAULT_EXAMPLES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from corefmt.stress.fuzz import FuzzLimits, FuzzReport

EXIT_OK = 0
EXIT_FAILURES = 1


def add_fuzz_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fuzz`` verb to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "fuzz", help="open, read, check and write mutated images of a format")
    parser.add_argument("--format", "-f", default="raw", help="format under test (default raw)")
    parser.add_argument("-o", dest="options", action="append",
                        help="create options of the seed images (key=value,...)")
    parser.add_argument("--examples", "-n", type=int, default=DEFAULT_EXAMPLES,
                        help=f"mutated images to try (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--replay", metavar="SPEC",
                        help="run the one case a failure printed (SEED_IMAGE:MUTATION;...)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one case may take (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--memory-limit", default=str(DEFAULT_MEMORY_LIMIT),
                        help="bytes one case may allocate (default 256M)")
    parser.add_argument("--save-failures", metavar="DIR",
                        help="write each failing image's bytes into DIR")
    parser.set_defaults(run=cmd_fuzz)
    return parser


def _limits(args: argparse.Namespace) -> FuzzLimits:
    if args.timeout <= 0:
        raise OptionError("--timeout must be positive")
    if args.examples < 0:
        raise OptionError("--examples must not be negative")
    memory = parse_size(args.memory_limit, "memory limit")
    if memory <= 0:
        raise OptionError("--memory-limit must be positive")
    from corefmt.stress.fuzz import FuzzLimits

    return FuzzLimits(timeout=args.timeout, memory=memory)


def _save(report: FuzzReport, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for number, failure in enumerate(report.failures):
        if not failure.image:
            continue
        name = f"{report.format}-{number}-{failure.kind.replace(' ', '-')}.img"
        with open(os.path.join(directory, name), "wb") as out:
            out.write(failure.image)
        print(f"  saved {os.path.join(directory, name)}")


def cmd_fuzz(args: argparse.Namespace) -> int:
    from corefmt.stress.fuzz import fuzz_format, replay_case

    limits = _limits(args)
    options = check_create_options(args.format, args.options)
    if args.replay:
        report = replay_case(args.format, args.replay, limits=limits, options=options)
    else:
        report = fuzz_format(args.format, examples=args.examples, seed=args.seed, limits=limits,
                             options=options)
    for failure in report.failures:
        print(failure.describe(report.format, report.options), flush=True)
    if args.save_failures and report.failures:
        _save(report, args.save_failures)
    print(f"fuzzed {report.format} in {report.elapsed:.1f}s, largest case allocation "
          f"{report.peak_memory / 2**20:.1f} MiB"
          + (" (stopped early: a case hung in a thread)" if report.aborted else ""),
          file=sys.stderr)
    print(report.summary())
    return EXIT_FAILURES if report.failures else EXIT_OK

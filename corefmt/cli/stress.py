"""``corefmt stress``: race, error and crash testing of any installed format.

Prints every failing seed with the command that replays it, then one
summary line; exits non-zero on any mismatch or check failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from corefmt import plugins
from corefmt.errors import OptionError
from corefmt.ops.create import check_create_options
from corefmt.sizes import parse_size
from corefmt.stress.defaults import DEFAULT_OPERATIONS, DEFAULT_SEEDS, DEFAULT_SIZE, SECTOR_SIZE

if TYPE_CHECKING:
    from corefmt.stress.report import StressSummary
    from corefmt.stress.runner import SeedResult, StressConfig

EXIT_OK = 0
EXIT_MISMATCH = 1


def add_stress_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``stress`` verb to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "stress", help="race, error and crash test a format on simulated storage")
    parser.add_argument("--format", "-f", default="raw", help="format under test (default raw)")
    parser.add_argument("-o", dest="options", action="append",
                        help="create options of the image under test (key=value,...)")
    parser.add_argument("--base", help="also test a chain: the base image's format, or a "
                                       "chain of them bottom first (e.g. raw,qcow2)")
    parser.add_argument("--remote-base", metavar="URL",
                        help="the chain's bottom layer is this existing image on a server "
                             "(http(s):// or s3://; its format is --base's first), read-only")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help=f"how many seeds to run (default {DEFAULT_SEEDS})")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only (replay)")
    parser.add_argument("--size", default=str(DEFAULT_SIZE), help="image size (default 1M)")
    parser.add_argument("--ops", type=int, default=DEFAULT_OPERATIONS,
                        help=f"requests per seed (default {DEFAULT_OPERATIONS})")
    parser.add_argument("--crash", action="store_true",
                        help="cut the power at a seed-chosen request, reopen and check")
    parser.add_argument("--errors", action="store_true",
                        help="inject EIO/ENOSPC (and torn writes) into chosen requests")
    parser.add_argument("--no-copy-on-read", dest="copy_on_read", action="store_false",
                        help="leave copy-on-read off in chains")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="no prefetch in chains (ranges racing the workload, and "
                             "in some seeds the whole image to completion)")
    parser.add_argument("--no-compressed", dest="compressed", action="store_false",
                        help="no compressed writes (on by default where the image "
                             "can store data compressed)")
    parser.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                        help="no internal snapshot creates and deletes (on by default "
                             "where the image has internal snapshots)")
    parser.add_argument("--no-delays", dest="delays", action="store_false",
                        help="complete racing storage requests in issue order (no reordering)")
    parser.add_argument("--real-files", dest="real_files", action="store_true",
                        help="run the workload on real files (file storage, threads the OS "
                             "schedules): the concurrency part only, no --crash/--errors")
    parser.add_argument("--direct", action="store_true",
                        help="with --real-files: open the images with O_DIRECT")
    parser.add_argument("--matrix", action="store_true",
                        help="test every installed format, alone and over each base, "
                             "and print a table (driver x results)")
    parser.add_argument("--only", action="append", metavar="FORMAT",
                        help="with --matrix: only the targets whose chain has this format "
                             "(repeatable)")
    parser.add_argument("--skip", action="append", metavar="FORMAT",
                        help="with --matrix: leave out the targets whose chain has this "
                             "format (repeatable)")
    parser.add_argument("--spread", action="store_true",
                        help="with --matrix: --seeds is the run's total, spread over the "
                             "targets (each its own seeds), not the count per target")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per seed")
    parser.set_defaults(run=cmd_stress)
    return parser


def _config(args: argparse.Namespace) -> StressConfig:
    from corefmt.stress.runner import StressConfig, check_config
    size = parse_size(args.size, "image size")
    if size <= 0 or size % SECTOR_SIZE:
        raise OptionError(f"Invalid image size '{args.size}': must be whole 512-byte sectors")
    if args.ops < 0 or args.seeds < 0:
        raise OptionError("--ops and --seeds must not be negative")
    registry = plugins.registry()
    registry.format(args.format)
    chain = [name.strip() for name in args.base.split(",")] if args.base else []
    for depth, name in enumerate([*chain, args.format]):
        driver = registry.format(name)
        if depth > 0 and not driver.supports_backing:
            raise OptionError(f"Format {name} does not support backing files")
    if args.remote_base and args.matrix:
        raise OptionError("--remote-base tests one chain: use it with --format, not --matrix")
    if args.matrix and args.options:
        raise OptionError("-o applies to one format: use it with --format, not --matrix")
    if (args.only or args.skip or args.spread) and not args.matrix:
        raise OptionError("--only, --skip and --spread select matrix targets: use --matrix")
    if args.spread and args.seed is not None:
        raise OptionError("--seed replays one seed: it cannot be spread")
    for name in [*(args.only or ()), *(args.skip or ())]:
        registry.format(name)
    options = check_create_options(args.format, args.options)
    config = StressConfig(format=args.format, base=args.base, size=size, operations=args.ops,
                          crash=args.crash, errors=args.errors, copy_on_read=args.copy_on_read,
                          prefetch=args.prefetch, delays=args.delays, options=options,
                          real_files=args.real_files, direct=args.direct,
                          compressed=args.compressed, snapshots=args.snapshots,
                          remote_base=args.remote_base)
    check_config(config)
    return config


def matrix_targets(base_config: StressConfig) -> list[StressConfig]:
    """Every installed format alone (in each of its stress option sets),
    every backing-capable one over each format, and three-image chains
    raw <- A <- B of every two backing-capable formats."""
    registry = plugins.registry()
    names = sorted(registry.formats)
    targets = [attrs.evolve(base_config, format=name, base=None, options=options)
               for name in names for options in registry.formats[name].stress_option_sets]
    for name in names:
        if registry.formats[name].supports_backing:
            targets += [attrs.evolve(base_config, format=name, base=base, options=options)
                        for base in names
                        for options in registry.formats[name].stress_option_sets]
    layered = [name for name in names if registry.formats[name].supports_backing]
    if "raw" in registry.formats:
        targets += [attrs.evolve(base_config, format=top, base=f"raw,{middle}", options="")
                    for middle in layered for top in layered]
    return targets


def select_targets(targets: list[StressConfig], only: list[str] | None,
                   skip: list[str] | None) -> list[StressConfig]:
    """The targets whose chain (bases and image under test) has a format of
    ``only`` (all if None) and none of ``skip``."""
    from corefmt.stress.runner import base_formats

    def chain(config: StressConfig) -> set[str]:
        return {*base_formats(config), config.format}
    return [config for config in targets
            if (not only or chain(config) & set(only)) and not chain(config) & set(skip or ())]


def cmd_matrix(args: argparse.Namespace, base_config: StressConfig) -> int:
    from corefmt.stress.report import format_table, target_name, total
    from corefmt.stress.runner import run_seeds
    seeds = list(_seeds(args))
    targets = select_targets(matrix_targets(base_config), args.only, args.skip)
    if not targets:
        raise OptionError("--only and --skip leave no matrix target")
    rows: list[tuple[str, StressSummary]] = []
    for index, config in enumerate(targets):
        started = time.monotonic()
        # Spread: target i runs every len(targets)-th seed from the i-th on.
        own = seeds[index::len(targets)] if args.spread else seeds
        summary = run_seeds(config, own, _reporter(config, args.verbose))
        rows.append((target_name(config), summary))
        extra = summary.new_kinds_line()
        print(f"{target_name(config)}: {summary.line()}{f', {extra}' if extra else ''} "
              f"({time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)
    print(format_table(rows))
    combined = total([summary for _, summary in rows])
    print(combined.line())
    return EXIT_OK if combined.ok else EXIT_MISMATCH


def _seeds(args: argparse.Namespace) -> range | list[int]:
    if args.seed is not None:
        return [args.seed]
    return range(args.first_seed, args.first_seed + args.seeds)


def _reporter(config: StressConfig, verbose: bool) -> Callable[[SeedResult], None]:
    from corefmt.stress.report import describe_failure
    def report(result: SeedResult) -> None:
        if not result.ok:
            print("\n".join(describe_failure(config, result)), flush=True)
        elif verbose:
            print(f"ok seed {result.seed}: {result.operations} operations", flush=True)

    return report


def cmd_stress(args: argparse.Namespace) -> int:
    from corefmt.stress.runner import run_seeds
    config = _config(args)
    if args.matrix:
        return cmd_matrix(args, config)
    seeds = _seeds(args)
    started = time.monotonic()
    summary = run_seeds(config, seeds, _reporter(config, args.verbose))
    elapsed = time.monotonic() - started
    prefetch = f", {summary.prefetch_line()}" if config.prefetch and config.base else ""
    extra = summary.new_kinds_line()
    extra = f", {extra}" if extra else ""
    print(f"seeds {summary.seeds} in {elapsed:.1f}s{prefetch}{extra}", file=sys.stderr)
    print(summary.line())
    return EXIT_OK if summary.ok else EXIT_MISMATCH

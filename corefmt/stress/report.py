"""Totals over many seeds, the one-line summary and the replay command."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from corefmt.stress.runner import SeedResult, StressConfig


@attrs.define
class StressSummary:
    seeds: int = 0
    operations: int = 0
    crashes: int = 0
    errors_injected: int = 0
    mismatches: int = 0
    check_failures: int = 0
    failed_seeds: list[int] = attrs.field(factory=list)
    #: Whole-image prefetches completed, and how many the driver recorded as
    #: leaving the image self-contained (each checked after the reopen).
    prefetches_completed: int = 0
    self_contained: int = 0
    #: Compressed writes and snapshot operations (see SeedResult).
    compressed_writes: int = 0
    two_phase_writes: int = 0
    snapshots_created: int = 0
    snapshots_deleted: int = 0
    snapshot_ops_failed: int = 0
    snapshots_verified: int = 0

    def add(self, result: SeedResult) -> None:
        self.seeds += 1
        self.operations += result.operations
        self.crashes += int(result.crashed)
        self.errors_injected += result.errors_injected
        self.mismatches += result.mismatch_count
        self.check_failures += len(result.check_failures)
        self.prefetches_completed += result.prefetches_completed
        self.self_contained += int(result.self_contained)
        for field in NEW_KIND_FIELDS:
            setattr(self, field, getattr(self, field) + getattr(result, field))
        if not result.ok:
            self.failed_seeds.append(result.seed)

    @property
    def ok(self) -> bool:
        return not self.failed_seeds

    def line(self) -> str:
        return (f"operations {self.operations}, crashes {self.crashes}, "
                f"errors injected {self.errors_injected}, mismatches {self.mismatches}, "
                f"check failures {self.check_failures}")

    def prefetch_line(self) -> str:
        return (f"prefetches completed {self.prefetches_completed}, "
                f"self-contained {self.self_contained}")

    def new_kinds_line(self) -> str:
        """Compressed writes and snapshot operations ("" if none ran)."""
        if not any(getattr(self, field) for field in NEW_KIND_FIELDS):
            return ""
        return (f"compressed writes {self.compressed_writes} "
                f"({self.two_phase_writes} two-phase), snapshots created "
                f"{self.snapshots_created}, deleted {self.snapshots_deleted}, "
                f"failed {self.snapshot_ops_failed}, verified {self.snapshots_verified}")


#: Counts of compressed writes and snapshot operations, summed over seeds.
NEW_KIND_FIELDS = ("compressed_writes", "two_phase_writes", "snapshots_created",
                   "snapshots_deleted", "snapshot_ops_failed", "snapshots_verified")


def replay_command(config: StressConfig, seed: int) -> str:
    """The one command that runs exactly this seed again."""
    words = ["corefmt", "stress", "--format", config.format]
    if config.options:
        words += ["-o", config.options]
    if config.base:
        words += ["--base", config.base]
    words += ["--seed", str(seed), "--size", str(config.size), "--ops", str(config.operations)]
    if config.crash:
        words.append("--crash")
    if config.errors:
        words.append("--errors")
    if not config.copy_on_read:
        words.append("--no-copy-on-read")
    if not config.prefetch:
        words.append("--no-prefetch")
    if not config.delays:
        words.append("--no-delays")
    if not config.compressed:
        words.append("--no-compressed")
    if not config.snapshots:
        words.append("--no-snapshots")
    if config.real_files:
        words.append("--real-files")  # the workload replays; the OS's interleaving may not
    if config.direct:
        words.append("--direct")
    return shlex.join(words)


def describe_failure(config: StressConfig, result: SeedResult) -> list[str]:
    lines = [f"FAIL seed {result.seed}:"]
    lines += [f"  {message}" for message in result.mismatches + result.check_failures]
    hidden = result.mismatch_count - len(result.mismatches)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more mismatches")
    lines.append(f"  replay: {replay_command(config, result.seed)}")
    return lines


#: Columns of the matrix table: header and the summary field they show.
TABLE_COLUMNS = (
    ("seeds", "seeds"),
    ("operations", "operations"),
    ("crash points", "crashes"),
    ("injected errors", "errors_injected"),
    ("mismatches", "mismatches"),
    ("check failures", "check_failures"),
)


def target_name(config: StressConfig) -> str:
    """'qcow2', 'qcow2 -o lazy_refcounts=on' or 'raw <- qcow2' (base first,
    as chains are written)."""
    chain = [*(config.base.split(",") if config.base else []), config.format]
    name = " <- ".join(chain)
    return f"{name} -o {config.options}" if config.options else name


def format_table(rows: list[tuple[str, StressSummary]]) -> str:
    """One row per target: the long run's result at a glance."""
    name_width = max([len("target"), *(len(name) for name, _ in rows)])
    widths = [max(len(header), 10) for header, _ in TABLE_COLUMNS]
    header = "  ".join([f"{'target':<{name_width}}",
                        *(f"{title:>{width}}" for (title, _), width in
                          zip(TABLE_COLUMNS, widths, strict=True))])
    lines = [header, "-" * len(header)]
    for name, summary in rows:
        cells = [f"{getattr(summary, field):>{width}}"
                 for (_, field), width in zip(TABLE_COLUMNS, widths, strict=True)]
        lines.append("  ".join([f"{name:<{name_width}}", *cells]))
    return "\n".join(lines)


def total(summaries: list[StressSummary]) -> StressSummary:
    """Sum of several targets' summaries (for the closing line)."""
    combined = StressSummary()
    for summary in summaries:
        for _, field in TABLE_COLUMNS:
            setattr(combined, field, getattr(combined, field) + getattr(summary, field))
        combined.failed_seeds.extend(summary.failed_seeds)
        combined.prefetches_completed += summary.prefetches_completed
        combined.self_contained += summary.self_contained
        for field in NEW_KIND_FIELDS:
            setattr(combined, field, getattr(combined, field) + getattr(summary, field))
    return combined

"""Image fuzzing: short runs of every driver here, and proof that it catches
drivers that trust their headers, return wrong data, hang or over-allocate."""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corefmt import hookimpl, plugins
from corefmt.block.align import align_up
from corefmt.errors import CorefmtError
from corefmt.stress import fuzz
from corefmt.stress.fuzz import (
    DATA_IMAGE_SIZE,
    KIND_EXCEPTION,
    KIND_HANG,
    KIND_MEMORY,
    KIND_WRONG_DATA,
    BitFlip,
    Case,
    CopyBytes,
    Extend,
    FuzzLimits,
    FuzzSetupError,
    Overwrite,
    SpecError,
    Truncate,
    fuzz_format,
    mutated_image,
    replay_case,
)

pytest.importorskip("hypothesis")

#: Short runs: together a few hundred cases, a few seconds.
SHORT_RAW = 200
SHORT_BLOCKMAP = 300
LONG_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
MiB = 1024 * 1024
#: The spinning variant gives up after this long (so an abandoned thread ends).
SPIN_SECONDS = 3.0
SHORT_TIMEOUT = 0.3
SPIN_MARK = b"SPIN"
GREEDY_MARK = b"GRDY"
BLOCK_SIZE = 4096
SUMMARY = re.compile(r"cases (\d+), opened (\d+), refused (\d+), failures (\d+)")


# -- deliberately fragile drivers -------------------------------------------------------
def _variant(base: type, name: str, image: type) -> Any:
    """A driver like ``base`` that opens ``image`` and is never probed (so it
    only runs where a test names it)."""
    from corefmt.driver import PROBE_NO

    class Variant(base):  # type: ignore[misc, valid-type]
        def probe(self, head: bytes, path: str | None) -> int:
            return PROBE_NO

        def open(self, storage: Any, context: Any) -> Any:
            return image(storage, context)

    Variant.name = name
    return Variant()


def _raw_variants() -> list[Any]:
    from corefmt_raw.driver import RawDriver, RawImage


    class FlooredImage(RawImage):
        """Rounds the size down to 4 KiB: a file's tail goes missing."""

        @property
        def virtual_size(self) -> int:  # type: ignore[override]
            return self.storage.size() // BLOCK_SIZE * BLOCK_SIZE

    class SpinningImage(RawImage):
        """Loops (for a while) on a header value: a hang."""

        def readinto(self, offset: int, buf: memoryview) -> None:
            if self.storage.read(0, len(SPIN_MARK)) == SPIN_MARK:
                deadline = time.monotonic() + SPIN_SECONDS
                while time.monotonic() < deadline:
                    pass
            super().readinto(offset, buf)

    class GreedyImage(RawImage):
        """Allocates what its header asks for."""

        def __init__(self, storage: Any, context: Any):
            super().__init__(storage, context)
            head = storage.read(0, 8)
            if head[4:] == GREEDY_MARK:
                self.scratch = bytearray(int.from_bytes(head[:4], "big"))

    class RawVariant(RawDriver):
        fuzz_guest_view = staticmethod(fuzz.raw_guest_view)  # what raw must read

    return [_variant(RawVariant, "raw-floored", FlooredImage),
            _variant(RawVariant, "raw-spinning", SpinningImage),
            _variant(RawVariant, "raw-greedy", GreedyImage)]


def _blockmap_variants() -> list[Any]:
    from corefmt_blockmap import driver as blockmap


    class TrustingImage(blockmap.BlockMapImage):
        """The blockmap of before the fuzzer: header sizes and table entries trusted."""

        def _check_header(self, file_size: int, magic: bytes, size: int, block_size: int,
                          path_len: int, fmt_len: int) -> None:
            if magic != blockmap.MAGIC or block_size not in (4096, 65536):
                raise CorefmtError("bad header")

        def _check_table(self, file_size: int) -> None:
            pass

        def _name(self, raw: bytes, what: str) -> str:
            return raw.decode()

    class MagicBlindImage(blockmap.BlockMapImage):
        """Takes a data block that starts with the magic for metadata (reads zeros)."""

        def readinto(self, offset: int, buf: memoryview) -> None:
            super().readinto(offset, buf)
            if offset % self.block_size == 0 and bytes(buf[:8]) == blockmap.MAGIC:
                buf[:self.block_size] = bytes(len(buf[:self.block_size]))

    return [_variant(blockmap.BlockMapDriver, "blockmap-trusting", TrustingImage),
            _variant(blockmap.BlockMapDriver, "blockmap-magic-blind", MagicBlindImage)]


class _VariantPlugin:
    def __init__(self, drivers: list[Any]):
        self.drivers = drivers

    @hookimpl
    def corefmt_register(self, registry: Any) -> None:
        for driver in self.drivers:
            registry.add_format(driver)


@pytest.fixture
def fragile(blockmap) -> Iterator[None]:
    plugin = _VariantPlugin(_raw_variants() + _blockmap_variants())
    plugins.register_plugin(plugin)
    yield
    plugins.unregister_plugin(plugin)


def _kinds(report: fuzz.FuzzReport) -> set[str]:
    return {failure.kind for failure in report.failures}


def _blockmap_first_data_block() -> int:
    """Host offset of guest block 0 in the 'data' seed (the first block written)."""
    from corefmt_blockmap.driver import ENTRY, TABLE_OFFSET

    return align_up(TABLE_OFFSET + DATA_IMAGE_SIZE // BLOCK_SIZE * ENTRY.size, BLOCK_SIZE)


# -- short runs of the real drivers -------------------------------------------------------
def test_raw_reads_exactly_the_mutated_bytes():
    report = fuzz_format("raw", examples=SHORT_RAW, seed=1)
    assert report.ok, "\n".join(f.describe("raw") for f in report.failures)
    assert report.cases == SHORT_RAW
    assert report.opened == SHORT_RAW  # raw opens anything: every case compared its data
    assert report.peak_memory < FuzzLimits().memory


def test_blockmap_refuses_damage_with_clear_errors(blockmap):
    report = fuzz_format("blockmap", examples=SHORT_BLOCKMAP, seed=1)
    assert report.ok, "\n".join(f.describe("blockmap") for f in report.failures)
    assert report.cases == SHORT_BLOCKMAP
    assert report.opened > SHORT_BLOCKMAP // 10 and report.refused > SHORT_BLOCKMAP // 10


def test_data_only_mutations_read_back_as_mutated(blockmap):
    host = _blockmap_first_data_block()
    spec = f"data:u64be@{host:#x}=0x0;flip@{host + 600:#x}/3"
    report = replay_case("blockmap", spec)
    assert report.ok and report.opened == 1


# -- the fuzzer catches broken drivers -------------------------------------------------------
def test_trusting_driver_is_reported(fragile):
    report = fuzz_format("blockmap-trusting", examples=150, seed=1)
    assert not report.ok
    # A table sized by the header (memory) and undecodable names (an exception).
    assert {KIND_EXCEPTION, KIND_MEMORY} <= _kinds(report)
    assert any("UnicodeDecodeError" in failure.message for failure in report.failures)
    for failure in report.failures:
        assert failure.spec and failure.seed == 1 and failure.image
        assert failure.replay_command("blockmap-trusting").startswith(
            "corefmt fuzz --format blockmap-trusting --replay ")
        assert mutated_image("blockmap-trusting", failure.spec) == failure.image
        again = replay_case("blockmap-trusting", failure.spec)
        assert failure.signature in {f.signature for f in again.failures}


def test_huge_table_from_header_is_a_memory_failure(fragile):
    # virtual size 2**45: the trusting driver reads a 2**36-byte table.
    report = replay_case("blockmap-trusting", "data:u64be@0x8=0x200000000000")
    assert _kinds(report) == {KIND_MEMORY}
    assert replay_case("blockmap", "data:u64be@0x8=0x200000000000").ok


def test_wrong_size_is_wrong_data(fragile):
    report = replay_case("raw-floored", "data:extend=0x200/0x0")
    assert _kinds(report) == {KIND_WRONG_DATA}
    assert not fuzz_format("raw-floored", examples=100, seed=2).ok


def test_data_mistaken_for_metadata_is_wrong_data(fragile):
    magic = int.from_bytes(b"BLKMAP01", "big")
    report = replay_case("blockmap-magic-blind",
                         f"data:u64be@{_blockmap_first_data_block():#x}={magic:#x}")
    assert _kinds(report) == {KIND_WRONG_DATA}
    assert "differs from what the image holds" in report.failures[0].message


def test_hang_is_reported_within_the_time_limit(fragile):
    spec = f"data:u32be@0x0={int.from_bytes(SPIN_MARK, 'big'):#x}"
    started = time.monotonic()
    report = replay_case("raw-spinning", spec, limits=FuzzLimits(timeout=SHORT_TIMEOUT))
    assert time.monotonic() - started < SPIN_SECONDS
    assert _kinds(report) == {KIND_HANG}
    assert report.failures[0].phase == "read"


def test_hang_in_a_worker_thread_stops_the_run(fragile):
    spec = f"data:u32be@0x0={int.from_bytes(SPIN_MARK, 'big'):#x}"
    reports: list[fuzz.FuzzReport] = []
    runner = threading.Thread(target=lambda: reports.append(
        replay_case("raw-spinning", spec, limits=FuzzLimits(timeout=SHORT_TIMEOUT))))
    runner.start()
    runner.join(SPIN_SECONDS)
    assert reports and reports[0].aborted and _kinds(reports[0]) == {KIND_HANG}


@pytest.mark.parametrize("size", [64 * MiB, 0x7FFFFFFF])
def test_allocation_from_a_header_value_is_a_memory_failure(fragile, size):
    spec = f"data:u32be@0x4={int.from_bytes(GREEDY_MARK, 'big'):#x};u32be@0x0={size:#x}"
    report = replay_case("raw-greedy", spec, limits=FuzzLimits(memory=16 * MiB))
    assert _kinds(report) == {KIND_MEMORY}
    assert report.failures[0].phase.startswith("open")


# -- specs, dependencies, CLI ---------------------------------------------------------------
def test_specs_round_trip():
    case = Case("backed", (BitFlip(3, 7), Overwrite(0x10, 4, 0xFFFFFFFF, False),
                           Overwrite(1, 1, 0x80), CopyBytes(0x1000, 0x1008, 8),
                           Truncate(0x200), Extend(0x1000, 0xFF)))
    assert Case.parse(case.spec()) == case
    assert Case.parse("data:") == Case("data", ())
    for bad in ("nocolon", "data:flip@0x1/9", "data:u16be@0x0=0x10000", "data:frob@1"):
        with pytest.raises(SpecError):
            Case.parse(bad)
    with pytest.raises(SpecError, match="seed images: data, empty"):
        replay_case("raw", "backed:flip@0x0/0")


def test_missing_hypothesis_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(FuzzSetupError, match=r"pip install 'corefmt\[stress\]'"):
        fuzz_format("raw", examples=1)
    assert replay_case("raw", "data:flip@0x0/0").ok  # a replay does not need it


def _cli(*words: str) -> int:
    from corefmt.cli.fuzz import add_fuzz_parser

    parser = argparse.ArgumentParser(prog="corefmt")
    add_fuzz_parser(parser.add_subparsers())
    args = parser.parse_args(["fuzz", *words])
    return args.run(args)


def test_cli_summary_and_exit_status(fragile, capsys, tmp_path):
    assert _cli("--format", "raw", "--examples", "40", "--seed", "1") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert SUMMARY.fullmatch(last) and SUMMARY.fullmatch(last).group(1) == "40"

    saved = tmp_path / "failures"
    assert _cli("--format", "raw-floored", "--replay", "data:extend=0x200/0x0",
                "--save-failures", str(saved)) == 1
    out = capsys.readouterr().out
    assert "FAIL wrong data" in out
    assert "replay: corefmt fuzz --format raw-floored --replay data:extend=0x200/0x0" in out
    assert out.strip().splitlines()[-1] == "cases 1, opened 1, refused 0, failures 1"
    [image] = saved.iterdir()
    assert image.read_bytes() == mutated_image("raw-floored", "data:extend=0x200/0x0")


def test_cli_refuses_bad_limits():
    with pytest.raises(CorefmtError, match="--timeout"):
        _cli("--timeout", "0")


# -- long runs ------------------------------------------------------------------------------
@pytest.mark.slow
def test_long_raw_run():
    report = fuzz_format("raw", examples=LONG_EXAMPLES, seed=int(time.time()))
    assert report.ok, "\n".join(f.describe("raw") for f in report.failures)


@pytest.mark.slow
def test_long_blockmap_run(blockmap):
    report = fuzz_format("blockmap", examples=LONG_EXAMPLES, seed=int(time.time()))
    assert report.ok, "\n".join(f.describe("blockmap") for f in report.failures)

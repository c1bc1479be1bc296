"""Fuzzing qcow2 with mutated copies of a small image qemu made (plain,
compressed and zero clusters): the header, its extension area, the L1
table, an L2 table and a refcount block. Every case opens read-only, reads
everything, maps and checks: the outcome is correct data or a CorefmtError,
never another exception, within a time and memory bound. A short run is in
the default suite; ``-m slow`` runs a long one (QCOW2_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import CorefmtError
from tests.fuzzing import CaseTimeout, time_limit

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024
CLUSTER = 4 * KiB
VIRTUAL_SIZE = 4 * MiB  # two L2 tables of 4 KiB clusters
SHORT_EXAMPLES = 100
LONG_EXAMPLES = int(os.environ.get("QCOW2_FUZZ_EXAMPLES", "5000"))
#: Per case: seconds, traced bytes, and address space before allocations fail.
CASE_SECONDS = 2.0
MEMORY_BOUND = 64 * MiB
ADDRESS_SPACE_HEADROOM = 512 * MiB


def run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def _regions(image: bytes) -> dict[str, tuple[int, int]]:
    """(offset, length) of each structure fuzzed, read from the image."""
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    l1_size = struct.unpack_from(">I", image, 36)[0]
    reftable = struct.unpack_from(">Q", image, 48)[0]
    l2 = struct.unpack_from(">Q", image, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    refblock = struct.unpack_from(">Q", image, reftable)[0] & ~0x1FF
    header_length = struct.unpack_from(">I", image, 100)[0]
    return {"header": (0, header_length), "extensions": (header_length, 512),
            "l1": (l1_offset, 8 * l1_size), "l2": (l2, CLUSTER),
            "refblock": (refblock, CLUSTER)}


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(qcow2 bytes, guest content) of a qemu-made image."""
    directory = tmp_path_factory.mktemp("qcow2-fuzz")
    rng = random.Random(11)
    raw = bytearray(VIRTUAL_SIZE)
    raw[0:64 * KiB] = bytes(rng.randrange(3) for _ in range(64 * KiB))
    raw[2 * MiB + 4 * KiB:2 * MiB + 20 * KiB] = b"compressible " * 1260 + b"1234"
    source, image = directory / "source.raw", directory / "seed.qcow2"
    source.write_bytes(raw)
    run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", source,
        image)
    run(QEMU_IO, "-c", "write -P 0x5c 100k 12k", "-c", "write -z 8k 4k",
        "-c", "write -P 0x6d 3M 8k", image)
    run(QEMU_IMG, "convert", "-O", "raw", image, source)
    return image.read_bytes(), source.read_bytes()


def mutations(image: bytes) -> st.SearchStrategy:
    regions = _regions(image)
    names = sorted(regions)

    @st.composite
    def one(draw: st.DrawFn) -> tuple[str, int, bytes]:
        region = draw(st.sampled_from(names))
        start, length = regions[region]
        width = draw(st.sampled_from((1, 2, 4, 8)))
        offset = start + draw(st.integers(0, max(0, length - width)))
        if draw(st.booleans()):
            offset -= offset % width
        special = [0, 1, 0xFF, 0x80, 0x200, 0x7FFFFFFF, len(image), len(image) + CLUSTER,
                   1 << 40, 1 << 62, 1 << 63, (1 << 64) - 1]
        value = draw(st.one_of(st.sampled_from(special), st.integers(0, (1 << 64) - 1)))
        value &= (1 << (8 * width)) - 1
        if draw(st.booleans()):  # a bit flip of what is there
            old = int.from_bytes(image[offset:offset + width], "big")
            value = old ^ (1 << draw(st.integers(0, 8 * width - 1)))
        return region, offset, value.to_bytes(width, "big")

    return st.lists(one(), min_size=1, max_size=3)


def run_case(path: Path, image: bytes, changes: list[tuple[str, int, bytes]],
             guest: bytes) -> None:
    from corefmt.stress.fuzz import _address_space_guard

    data = bytearray(image)
    for _, offset, value in changes:
        data[offset:offset + len(value)] = value
    path.write_bytes(data)
    # Refcounts never change what a guest reads: such a case must read the original.
    exact = all(region == "refblock" for region, _, _ in changes)
    tracemalloc.start()
    try:
        with _address_space_guard(ADDRESS_SPACE_HEADROOM), time_limit(CASE_SECONDS):
            try:
                with corefmt.open(str(path), "qcow2", read_only=True) as disk:
                    size = disk.virtual_size
                    for start in range(0, min(size, 16 * MiB), MiB):
                        try:
                            seen = disk.read(start, min(MiB, size - start))
                        except CorefmtError as error:
                            assert str(error).strip()
                            assert not exact, f"refcount damage failed a read: {error}"
                            continue
                        if exact:
                            assert seen == guest[start:start + MiB], f"wrong data at {start}"
                    try:
                        disk.block_status(0, min(size, 16 * MiB))
                    except CorefmtError as error:
                        assert str(error).strip()
                    if disk.image is not None:
                        try:
                            disk.image.check()
                        except CorefmtError as error:
                            assert str(error).strip()
            except CorefmtError as error:
                assert str(error).strip() and "\n" not in str(error)
                assert not exact or "refcount" in str(error).lower(), str(error)
        peak = tracemalloc.get_traced_memory()[1]
    except CaseTimeout:
        pytest.fail(f"no result within {CASE_SECONDS} s: {changes}")
    except MemoryError:
        pytest.fail(f"allocation beyond {ADDRESS_SPACE_HEADROOM / MiB:.0f} MiB: {changes}")
    except AssertionError:
        raise
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error} for {changes}")
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{peak / MiB:.0f} MiB for {changes}"


def _fuzz(seed: tuple[bytes, bytes], tmp_path: Path, examples: int) -> None:
    image, guest = seed
    path = tmp_path / "case.qcow2"

    @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                         derandomize=True, phases=[hypothesis.Phase.generate,
                                                   hypothesis.Phase.shrink],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(mutations(image))
    def case(changes: list[tuple[str, int, bytes]]) -> None:
        run_case(path, image, changes, guest)

    case()


def test_seed_reads_back(seed: tuple[bytes, bytes], tmp_path: Path) -> None:
    image, guest = seed
    run_case(tmp_path / "seed.qcow2", image, [("refblock", 0, image[:1])], guest)


def test_fuzz_short(seed: tuple[bytes, bytes], tmp_path: Path) -> None:
    _fuzz(seed, tmp_path, SHORT_EXAMPLES)


@pytest.mark.slow
def test_fuzz_long(seed: tuple[bytes, bytes], tmp_path: Path) -> None:
    _fuzz(seed, tmp_path, LONG_EXAMPLES)


@pytest.mark.slow
def test_generic_fuzzer_qcow2() -> None:
    """corefmt fuzz's own seeds (corefmt-made images, a backing chain)."""
    from corefmt.stress.fuzz import FuzzLimits, fuzz_format

    report = fuzz_format("qcow2", examples=LONG_EXAMPLES // 5, seed=1,
                         limits=FuzzLimits(timeout=5.0, memory=MEMORY_BOUND))
    assert report.ok, "\n".join(f.describe("qcow2") for f in report.failures)

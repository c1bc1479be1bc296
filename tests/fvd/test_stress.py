"""corefmt stress on FVD in the default run (short), and the bugs it found.

Races, I/O errors and power cuts (``--crash --errors``) over every option
set the driver lists, alone and over a raw base, and over chains mixing
FVD with raw and qcow2; over a base, prefetch races the workload and some
seeds prefetch the whole image to completion (all_data_in_fvd_img), with
power cuts and errors landing inside it. ``tox -e stress-long`` runs the
long version. The
regressions after them replay, on ``sim:`` disks, what failing stress seeds
did, reduced to the few requests that matter: each one fails with its fix
undone."""

from __future__ import annotations

import errno
import itertools
import random
from collections.abc import Callable, Iterator

import pytest
from corefmt_fvd.driver import FvdDriver

import corefmt
from corefmt import CorefmtError, plugins
from corefmt.cli.main import main
from corefmt.storage.simulated import SimDisk, SimFault, SimRequest
from corefmt.stress.runner import StressConfig, run_seed, run_seeds
from tests.conftest import fill
from tests.stressing import assert_stress_clean

KiB, MiB = 1024, 1024 * 1024
#: Survivor seeds per request of a create cut short (about one in ten keeps a
#: header over regions it had not filled, when that is possible).
CREATE_CUT_SEEDS = 24
#: FVD's option set with a data file named relative to the image.
DATA_FILE_SET = next(options for options in FvdDriver.stress_option_sets if "data_file=" in options)
_names = itertools.count()


@pytest.fixture
def sim_path() -> Iterator[Callable[[str], str]]:
    """Fresh ``sim:`` names, forgotten (with their data files) afterwards."""
    sim = plugins.registry().storages["sim"]
    folder = f"sim:fvd-stress-{next(_names)}/"

    def make(name: str) -> str:
        return folder + name
    yield make
    for name in sim.names(folder):
        sim.forget(name)


def _disk(path: str) -> SimDisk:
    return plugins.registry().storages["sim"].disk(path)


def _fail_first(kind: str, error: int = errno.EIO, tear_sectors: int = 0
                ) -> Callable[[SimRequest], SimFault | None]:
    """A fault policy: the first request of ``kind`` fails (torn, for writes)."""
    fired = []

    def policy(request: SimRequest) -> SimFault | None:
        if request.kind == kind and not fired:
            fired.append(request)
            return SimFault(error=error, tear_sectors=tear_sectors)
        return None
    return policy


def _power_cut(node, *disks: SimDisk, seed: int = 0) -> None:
    """The machine loses power (unflushed writes survive or not, sector by
    sector); the node is dropped without a clean close."""
    for disk in disks:
        disk.power_cut(random.Random(f"{seed}:{disk.name}"))
    with pytest.raises(CorefmtError):
        node.close()
    for disk in disks:
        disk.restore(disk.crash_image or b"")


#: Seeds per target: the sets whose storage grows by the default 100 MiB cost
#: about a second a seed (their power cuts go through every sector).
SEEDS, OPS = "5", "40"
OPTION_SETS = FvdDriver.stress_option_sets
#: Chains bottom first, the image under test last (its options: the defaults).
CHAINS = {"fvd <- fvd": ("fvd", "fvd"), "qcow2 <- fvd": ("qcow2", "fvd"),
          "fvd <- qcow2": ("fvd", "qcow2"), "raw <- fvd <- qcow2": ("raw,fvd", "qcow2"),
          "raw <- qcow2 <- fvd": ("raw,qcow2", "fvd"), "raw <- fvd <- fvd": ("raw,fvd", "fvd")}


def _stress(capsys, format: str, options: str = "", base: str = "") -> None:
    assert_stress_clean(capsys, format, options, base, seeds=SEEDS, ops=OPS)


@pytest.mark.parametrize("base", ["", "raw"], ids=["alone", "over-raw"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=[o or "defaults" for o in OPTION_SETS])
def test_stress_crash_errors(options, base, capsys):
    _stress(capsys, "fvd", options, base)


@pytest.mark.parametrize("chain", CHAINS.values(), ids=CHAINS.keys())
def test_stress_mixed_chains(chain, capsys):
    base, top = chain
    _stress(capsys, top, base=base)


#: Seeds per prefetch target: about one in ten completes a whole-image
#: prefetch (a third have one, and the power often goes before it).
PREFETCH_SEEDS = 40
#: The compact set whose storage grows in small steps (power cuts stay cheap).
COMPACT_SET = next(options for options in OPTION_SETS
                   if "compact_image=on" in options and "storage_grow_unit" in options)


@pytest.mark.parametrize("base", ["raw", "qcow2"])
@pytest.mark.parametrize("options", ["", COMPACT_SET], ids=["defaults", "compact"])
def test_prefetch_races_the_workload_and_completes_through_cuts_and_errors(options, base):
    """Fills racing guest requests change nothing the guest sees; a finished
    prefetch records all_data_in_fvd_img, and the image then opens without
    its base (the runner checks each one after the reopen)."""
    config = StressConfig(format="fvd", base=base, options=options, crash=True, errors=True)
    summary = run_seeds(config, range(PREFETCH_SEEDS))
    assert (summary.mismatches, summary.check_failures) == (0, 0), (
        f"{summary.line()}; failed seeds {summary.failed_seeds}")
    assert summary.prefetches_completed >= 1
    assert summary.self_contained == summary.prefetches_completed


#: Seeds 1, 7, 8, 9 and 11 complete a whole-image prefetch (no faults).
COMPLETING_SEEDS = range(12)


def test_a_completion_the_header_never_records_is_caught(monkeypatch):
    """The judge can fail: FVD claims the prefetch is recorded but leaves the
    header as it was, so the reopened image still opens its base."""
    from corefmt_fvd import fills

    monkeypatch.setattr(fills, "mark_self_contained", lambda image: None)
    summary = run_seeds(StressConfig(format="fvd", base="raw"), COMPLETING_SEEDS)
    assert summary.prefetches_completed >= 1
    assert summary.check_failures == summary.prefetches_completed, summary.line()


# -- regressions --------------------------------------------------------------------------
def test_a_failed_write_maps_no_chunk_a_flush_would_not_keep(sim_path):
    """Seen as 'sector 353 holds content that no allowed state has' (compact
    images, an EIO torn after one sector): the write's new chunk stayed
    mapped in memory without a record; reads showed the torn sector, the
    next flush did not journal the mapping, a power cut brought zeros back."""
    path = sim_path("top")
    corefmt.create(path, "fvd", MiB, options="compact_image=on,chunk_size=4096,"
                                             "storage_grow_unit=65536")
    disk = _disk(path)
    disk.sync()
    node = corefmt.open(path, "fvd")
    disk.policy = _fail_first("write", tear_sectors=1)  # the data write, torn
    with pytest.raises(CorefmtError):
        node.write(64 * KiB, fill(8 * KiB, 1))
    disk.policy = None
    seen = node.read(64 * KiB, 8 * KiB)
    node.flush()  # a flush after the read: what it showed must stay
    _power_cut(node, disk)
    with corefmt.open(path, "fvd") as node:
        assert node.read(64 * KiB, 8 * KiB) == seen


def test_records_cover_every_chunk_of_a_block_copy_on_read_filled(tmp_path, sim_path):
    """Seen as zeros instead of the base's data after a power cut (compact,
    64 KiB blocks of 4 KiB chunks, over a raw base): copy-on-read filled a
    block (sixteen chunks, mapped in memory only, as fills are), a write
    then changed one chunk of it; its BITMAP record marks the whole block,
    its TABLE record had only that chunk."""
    base = tmp_path / "base.raw"
    content = random.Random(5).randbytes(MiB)
    base.write_bytes(content)
    path = sim_path("top")
    corefmt.create(path, "fvd", MiB, options="compact_image=on,chunk_size=4096",
                   backing=str(base), backing_format="raw")
    disk = _disk(path)
    disk.sync()
    node = corefmt.open(path, "fvd", copy_on_read=True)
    node.read(64 * KiB + 1000, 100)  # copies block 1 up
    patch = fill(512, 2)
    node.write(64 * KiB + 40 * KiB, patch)
    node.flush()
    _power_cut(node, disk)
    expected = bytearray(content[64 * KiB:128 * KiB])
    expected[40 * KiB:40 * KiB + 512] = patch
    with corefmt.open(path, "fvd") as node:
        assert node.read(64 * KiB, 64 * KiB) == expected


@pytest.mark.parametrize("options", ["", "compact_image=on,chunk_size=4096"])
def test_a_failed_write_into_a_block_copy_on_read_filled_keeps_what_reads_show(
        tmp_path, sim_path, options):
    """Seen as 'sector 574 holds content that no allowed state has' (fvd over
    qcow2 over raw): copy-on-read filled a block (only the in-memory bitmap
    says so: a fill is never journaled); a write into it landed but failed;
    reads showed its data, a flush succeeded, and after a power cut the block
    read from the base again."""
    base = tmp_path / "base.raw"
    content = random.Random(6).randbytes(MiB)
    base.write_bytes(content)
    path = sim_path("top")
    corefmt.create(path, "fvd", MiB, options=options, backing=str(base), backing_format="raw")
    disk = _disk(path)
    disk.sync()
    node = corefmt.open(path, "fvd", copy_on_read=True)
    node.read(4 * 64 * KiB, 512)  # copies block 4 up
    node.flush()
    disk.policy = _fail_first("write", tear_sectors=8)  # lands whole, then fails
    with pytest.raises(CorefmtError):
        node.write(4 * 64 * KiB + 4096, fill(4096, 3))
    disk.policy = None
    seen = node.read(4 * 64 * KiB, 64 * KiB)
    node.flush()  # a flush after the read: what it showed must stay
    _power_cut(node, disk)
    with corefmt.open(path, "fvd") as node:
        assert node.read(4 * 64 * KiB, 64 * KiB) == seen


@pytest.mark.parametrize("options", ["compact_image=on,chunk_size=4096,journal_size=4096",
                                     "block_size=7680,journal_size=4096"])
def test_a_create_failed_or_cut_anywhere_is_refused_or_new_and_clean(tmp_path, sim_path,
                                                                      capsys, options):
    """Seen as 'after an interrupted create of fvd: check found 258
    corruptions' (compact sets): the header went first, the table region's
    0xFF fill after it; a create failing (or losing power) in between left a
    header over table sectors of zeros, which map every chunk to physical
    chunk 0, and the image opened."""
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(3).randbytes(MiB))
    path = sim_path("top")
    sim = plugins.registry().storages["sim"]
    sim.create(path)
    disk = _disk(path)
    counted: list[SimRequest] = []
    disk.policy = counted.append
    corefmt.create(path, "fvd", MiB, options=options, backing=str(base), backing_format="raw")
    disk.policy = None
    faults = [SimFault(power_cut=seed) for seed in range(CREATE_CUT_SEEDS)] + [
        SimFault(error=errno.EIO, tear_sectors=tear) for tear in (0, 2)]
    for index, fault in itertools.product(range(len(counted)), faults):
        what = f"create: {fault} at request {index} ({counted[index].kind})"

        def policy(request: SimRequest, index: int = index, fault: SimFault = fault
                   ) -> SimFault | None:
            return fault if request.index == index else None
        disk.policy = policy
        with pytest.raises(CorefmtError):
            corefmt.create(path, "fvd", MiB, options=options, backing=str(base),
                           backing_format="raw")
        disk.policy = None
        if disk.dead:
            disk.restore(disk.crash_image or b"")
        try:
            node = corefmt.open(path, "fvd")
        except CorefmtError as error:
            assert "\n" not in str(error), (what, error)
            continue  # refused clearly
        with node:
            assert node.read(0, MiB) == base.read_bytes(), what
        capsys.readouterr()
        status = main(["check", "-f", "fvd", path])
        assert status in (0, 3), (what, capsys.readouterr().out)


# -- the harness ----------------------------------------------------------------------------
def test_a_relative_data_file_is_one_of_the_seeds_disks(tmp_path, monkeypatch):
    """The data_file option set names ``stress.fvd-data`` relative to the
    image: on ``sim:`` it must be a simulated disk of the seed (faulted and
    cut with the image), not a local file every seed shares."""
    monkeypatch.chdir(tmp_path)
    cut: list[str] = []
    power_cut = SimDisk.power_cut

    def spy(disk: SimDisk, rng: random.Random) -> bytearray:
        cut.append(disk.name)
        return power_cut(disk, rng)
    monkeypatch.setattr(SimDisk, "power_cut", spy)
    result = run_seed(StressConfig(format="fvd", options=DATA_FILE_SET, crash=True,
                                   operations=10), 0)
    assert result.ok, result
    assert not list(tmp_path.iterdir())
    assert "sim:stress-0/stress.fvd-data" in cut, cut


def test_the_matrix_takes_fvd_targets_apart_and_spreads_seeds(capsys):
    """stress-long: --skip fvd runs the matrix as before FVD came, --only fvd
    the targets with FVD anywhere in the chain, --spread makes --seeds the
    run's total (distinct seeds) instead of the count per target."""
    from corefmt.cli.stress import matrix_targets, select_targets
    from corefmt.stress.report import target_name

    targets = matrix_targets(StressConfig(crash=True))
    with_fvd = [target_name(config) for config in select_targets(targets, ["fvd"], None)]
    without = [target_name(config) for config in select_targets(targets, None, ["fvd"])]
    assert sorted(with_fvd + without) == sorted(target_name(config) for config in targets)
    assert not [name for name in without if "fvd" in name]
    for name in [*CHAINS, *(f"fvd -o {options}" if options else "fvd"
                            for options in OPTION_SETS)]:
        assert name in with_fvd, name
    capsys.readouterr()
    assert main(["stress", "--matrix", "--only", "fvd", "--skip", "raw", "--skip", "qcow2",
                 "--spread", "--seeds", "7", "--ops", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:-1]
    assert len(rows) == 2 * len(OPTION_SETS)  # fvd alone and over fvd, every set
    assert sum(int(row.split()[-6]) for row in rows) == 7
    assert main(["stress", "--spread", "--seeds", "2"]) == 1
    assert "--matrix" in capsys.readouterr().err

"""Hostile snapshot tables: a qemu-made image with two snapshots, its table
and a snapshot's L1/L2 tables edited by hand (named cases) or at random
(hypothesis). Listing, info, reading a snapshot (convert -l), apply, delete
and create end in success or a one-line CorefmtError, never another
exception, within a time bound; a refusal writes nothing."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import corefmt
from corefmt.errors import CorefmtError
from corefmt.ops import snapshot as snapshot_op
from tests.fuzzing import time_limit

pytestmark = pytest.mark.interop
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
KiB, MiB = 1024, 1024 * 1024
CLUSTER = 4 * KiB
#: Header fields (qcow2.txt) and snapshot table entry fields.
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
SN_L1_OFFSET, SN_L1_SIZE, SN_ID_SIZE, SN_NAME_SIZE, SN_EXTRA_SIZE = 0, 8, 12, 14, 36
OFFSET_MASK = 0x00FFFFFFFFFFFE00
CASE_SECONDS = 3.0
SHORT_EXAMPLES = 40
LONG_EXAMPLES = int(os.environ.get("QCOW2_SNAPSHOT_FUZZ_EXAMPLES", "2000"))


def run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("snapshot-fuzz") / "seed.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, "1M")
    run(QEMU_IO, "-c", "write -P 1 0 20k", "-c", "write -c -P 2 512k 8k", path)
    run(QEMU_IMG, "snapshot", "-c", "one", path)
    run(QEMU_IO, "-c", "write -P 3 4k 4k", path)
    run(QEMU_IMG, "snapshot", "-c", "two", path)
    return path.read_bytes()


def _table(image: bytes) -> int:
    return struct.unpack_from(">Q", image, SNAPSHOTS_OFFSET)[0]


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, offset, value)


def _first_l1(data: bytearray) -> int:
    return struct.unpack_from(">Q", data, _table(data) + SN_L1_OFFSET)[0]


def _first_l2(data: bytearray) -> int:
    return struct.unpack_from(">Q", data, _first_l1(data))[0] & OFFSET_MASK


#: name -> how the image is damaged.
CASES: dict[str, Callable[[bytearray], None]] = {
    "l1 offset past the file": lambda d: _put(d, _table(d) + SN_L1_OFFSET, ">Q", 1 << 40),
    "l1 offset misaligned": lambda d: _put(d, _table(d) + SN_L1_OFFSET, ">Q",
                                           _first_l1(d) + 8),
    "l1 offset zero": lambda d: _put(d, _table(d) + SN_L1_OFFSET, ">Q", 0),
    "l1 size huge": lambda d: _put(d, _table(d) + SN_L1_SIZE, ">I", 0x10000000),
    "l1 size past the file": lambda d: _put(d, _table(d) + SN_L1_SIZE, ">I", 0x100000),
    "id size past the table": lambda d: _put(d, _table(d) + SN_ID_SIZE, ">H", 0xFFFF),
    "name size past the table": lambda d: _put(d, _table(d) + SN_NAME_SIZE, ">H", 0xFFFF),
    "extra data too big": lambda d: _put(d, _table(d) + SN_EXTRA_SIZE, ">I", 4096),
    "extra data past the file": lambda d: _put(d, _table(d) + SN_EXTRA_SIZE, ">I", 1000),
    "too many snapshots": lambda d: _put(d, NB_SNAPSHOTS, ">I", 65537),
    "more snapshots than the table holds": lambda d: _put(d, NB_SNAPSHOTS, ">I", 5000),
    "table offset past the file": lambda d: _put(d, SNAPSHOTS_OFFSET, ">Q", 1 << 40),
    "table offset misaligned": lambda d: _put(d, SNAPSHOTS_OFFSET, ">Q", _table(d) + 8),
    "snapshot L2 past the file": lambda d: _put(d, _first_l1(d), ">Q", 1 << 40),
    "snapshot L2 misaligned": lambda d: _put(d, _first_l1(d), ">Q", _first_l2(d) + 512),
    "snapshot data past the file": lambda d: _put(d, _first_l2(d) + 8, ">Q",
                                                  (1 << 63) | (1 << 40)),
    "snapshot data misaligned": lambda d: _put(d, _first_l2(d), ">Q", (1 << 63) | 0x10200),
}


def _one_line(error: CorefmtError) -> None:
    text = str(error)
    assert text.strip() and "\n" not in text, repr(text)
    for report in getattr(error, "reports", ()):
        assert report.strip() and "\n" not in report


def _attempt(path: Path, action: Callable[[], object]) -> bool:
    """Run one operation: success, or a one-line refusal that wrote nothing."""
    before = path.read_bytes()
    try:
        action()
    except CorefmtError as error:
        _one_line(error)
        assert path.read_bytes() == before, "a refusal changed the image"
        return False
    return True


def exercise(path: Path) -> None:
    """Everything a user can do with the snapshots of ``path``."""
    name = str(path)
    try:
        listed = corefmt.snapshot_list(name, "qcow2")
    except CorefmtError as error:  # the open refuses the table (as qemu's does)
        _one_line(error)
        before = path.read_bytes()
        for action in (lambda: corefmt.snapshot_create(name, "x", "qcow2"),
                       lambda: corefmt.snapshot_apply(name, "1", "qcow2")):
            with pytest.raises(CorefmtError):
                action()
        assert path.read_bytes() == before
        return
    for info in listed:
        def read(info=info) -> None:
            with corefmt.open(name, "qcow2", read_only=True) as node:
                snapshot_op.load_snapshot(node, f"snapshot.id={info.id}")
                node.read(0, node.virtual_size)
        _attempt(path, read)
    for info in listed[:1]:
        _attempt(path, lambda info=info: corefmt.snapshot_apply(name, info.id, "qcow2"))
        _attempt(path, lambda info=info: corefmt.snapshot_delete(name, info.name, "qcow2"),
                 )
    _attempt(path, lambda: corefmt.snapshot_create(name, "new", "qcow2"))


@pytest.mark.parametrize("case", CASES)
def test_hostile_snapshot_tables_are_refused_in_one_line(tmp_path, seed, case):
    data = bytearray(seed)
    CASES[case](data)
    path = tmp_path / "hostile.qcow2"
    path.write_bytes(data)
    with time_limit(CASE_SECONDS):
        exercise(path)


def test_the_named_cases_are_refused_where_they_must_be(tmp_path, seed):
    """Not just no crash: the damage is noticed (listing or the operation on
    the damaged snapshot fails), so a case that passes silently is a bug."""
    for case in ("l1 offset past the file", "l1 offset misaligned", "l1 size huge",
                 "snapshot L2 past the file", "snapshot data misaligned"):
        data = bytearray(seed)
        CASES[case](data)
        path = tmp_path / "hostile.qcow2"
        path.write_bytes(data)
        before = path.read_bytes()
        name = str(path)
        for action in (lambda: corefmt.snapshot_apply(name, "1", "qcow2"),  # noqa: B023
                       lambda: corefmt.snapshot_delete(name, "one", "qcow2")):  # noqa: B023
            with pytest.raises(CorefmtError) as raised:
                action()
            _one_line(raised.value)
        assert path.read_bytes() == before, case
    for case in ("id size past the table", "too many snapshots", "extra data too big",
                 "more snapshots than the table holds", "table offset past the file"):
        data = bytearray(seed)
        CASES[case](data)
        path = tmp_path / "hostile.qcow2"
        path.write_bytes(data)
        with pytest.raises(CorefmtError) as raised:
            corefmt.snapshot_list(str(path), "qcow2")
        _one_line(raised.value)


def _random_cases(examples: int):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.integers(0, 160), st.sampled_from((1, 2, 4, 8)),
                                         st.integers(0, (1 << 64) - 1)),
                               min_size=1, max_size=3))
    def case(tmp_path: Path, seed: bytes, changes: list[tuple[int, int, int]]) -> None:
        data = bytearray(seed)
        table = _table(data)
        for offset, width, value in changes:
            data[table + offset:table + offset + width] = \
                (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        path = tmp_path / "random.qcow2"
        path.write_bytes(data)
        with time_limit(CASE_SECONDS):
            exercise(path)

    return case


def test_random_snapshot_table_damage(tmp_path, seed):
    _random_cases(SHORT_EXAMPLES)(tmp_path, seed)


@pytest.mark.slow
def test_random_snapshot_table_damage_long(tmp_path, seed):
    _random_cases(LONG_EXAMPLES)(tmp_path, seed)

"""The reference model accepts every legal result and nothing else."""

from __future__ import annotations

from corefmt.stress.model import ImageModel, Outcome
from corefmt.stress.workload import DISCARD, FLUSH, READ, SECTOR_SIZE, WRITE, Op

SIZE = 4 * SECTOR_SIZE


def test_racing_writes_allow_either_order_and_reads_see_any_moment():
    a, b = b"a" * 600, b"b" * 600
    ops = [Op(0, WRITE, 0, 600, a), Op(1, WRITE, 300, 600, b), Op(2, READ, 0, 900)]
    for seen in (bytes(900), a + bytes(300), a[:300] + b, bytes(300) + b):
        assert model_copy_check(ops, seen) == []
    assert model_copy_check(ops, b"c" * 900) != []


def model_copy_check(ops, seen):
    model = ImageModel(bytes(SIZE))
    outcomes = [Outcome(True), Outcome(True), Outcome(True, data=seen)]
    return model.apply_batch(ops, outcomes)


def test_a_read_settles_what_a_failed_write_left():
    model = ImageModel(bytes(SIZE))
    write = Op(0, WRITE, 0, SECTOR_SIZE, b"w" * SECTOR_SIZE)
    assert model.apply_batch([write], [Outcome(False, "EIO", injected=True)]) == []
    assert len(model.current[0]) == 2
    read = Op(1, READ, 0, SECTOR_SIZE)
    assert model.apply_batch([read], [Outcome(True, data=bytes(SECTOR_SIZE))]) == []
    assert model.current[0] == (bytes(SECTOR_SIZE),)


def test_errors_must_be_reported_and_never_invented():
    model = ImageModel(bytes(SIZE))
    write = Op(0, WRITE, 0, 10, b"x" * 10)
    assert model.apply_batch([write], [Outcome(True, injected=True)])
    assert model.apply_batch([write], [Outcome(False, "EIO")])


def test_flush_makes_writes_durable_and_discard_allows_the_backing():
    below = b"B" * SIZE
    model = ImageModel(below)
    write = Op(0, WRITE, 0, SECTOR_SIZE, b"w" * SECTOR_SIZE)
    model.apply_batch([write], [Outcome(True)])
    assert model.check_durable(below, "crash") == []  # not flushed yet: old is fine
    model.apply_batch([Op(1, FLUSH)], [Outcome(True)])
    assert model.check_durable(below, "crash") != []
    model.apply_batch([Op(2, DISCARD, 0, SIZE)], [Outcome(True)])
    assert model.check_current(below, "now") == []
    assert model.check_current(bytes(SIZE), "now") == []
    assert model.check_current(b"x" * SIZE, "now") != []


def test_a_failed_flush_may_have_kept_or_lost_unflushed_writes_but_not_flushed_ones():
    """A failed flush may drop the dirty data (Linux's fsync): the writes
    since the last good flush may be old or new, the flushed ones stay."""
    old, new = b"o" * SECTOR_SIZE, b"n" * SECTOR_SIZE
    model = ImageModel(old * 2)
    model.apply_batch([Op(0, WRITE, 0, SECTOR_SIZE, new)], [Outcome(True)])
    model.apply_batch([Op(1, FLUSH)], [Outcome(True)])
    model.apply_batch([Op(2, WRITE, SECTOR_SIZE, SECTOR_SIZE, new)], [Outcome(True)])
    assert model.apply_batch([Op(3, FLUSH)], [Outcome(False, "EIO", injected=True)]) == []
    assert model.check_durable(new + old, "dropped") == []
    assert model.check_durable(new + new, "kept") == []
    assert model.check_durable(old + new, "lost a flushed write") != []

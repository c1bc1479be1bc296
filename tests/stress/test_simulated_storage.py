"""The simulated disk: durability, faults, power cuts, scheduled completion order."""

from __future__ import annotations

import errno
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import corefmt
from corefmt import plugins, sync
from corefmt.errors import StorageError
from corefmt.storage.simulated import (
    SECTOR_SIZE,
    SimFault,
    SimStorageDriver,
    request_tag,
    surviving_content,
)
from corefmt.stress.scheduler import BatchScheduler, ScheduleDeadlock


@pytest.fixture
def sim() -> SimStorageDriver:
    driver = plugins.registry().storages["sim"]
    assert isinstance(driver, SimStorageDriver)
    return driver


def test_sim_is_a_storage_driver_for_any_format(sim):
    corefmt.create("sim:plain", "raw", 64 * 1024)
    with corefmt.open("sim:plain") as disk:
        disk.write(100, b"hello")
        assert disk.read(100, 5) == b"hello"
    sim.forget("sim:plain")
    assert not sim.exists("sim:plain")


def test_power_cut_keeps_flushed_and_drops_nothing_else_invented(sim):
    storage = sim.create("sim:cut")
    disk = sim.disk("sim:cut")
    storage.write(0, b"a" * SECTOR_SIZE)
    storage.flush()
    storage.write(0, b"b" * SECTOR_SIZE)
    storage.write(SECTOR_SIZE, b"c" * SECTOR_SIZE)
    outcomes = set()
    for seed in range(40):
        disk.dead = False
        disk.crash_image = None
        image = bytes(disk.power_cut(random.Random(seed)))
        first = image[:SECTOR_SIZE]
        assert first in (b"a" * SECTOR_SIZE, b"b" * SECTOR_SIZE)
        outcomes.add((first[:1], image[SECTOR_SIZE:SECTOR_SIZE + 1]))
    # every combination shows up: kept, dropped, reordered, and the growth
    # kept without its data (zeros), as a file system without fsync allows
    assert outcomes == {(first, second) for first in (b"a", b"b")
                        for second in (b"", b"\0", b"c")}
    with pytest.raises(StorageError):
        storage.read(0, 1)
    sim.forget("sim:cut")


def test_surviving_content_only_holds_states_each_sector_had():
    rng = random.Random(7)
    durable = bytes(4 * SECTOR_SIZE)
    from corefmt.storage.simulated import _CachedOp

    cache, states = [], [{bytes(SECTOR_SIZE)} for _ in range(8)]
    live = bytearray(durable)
    for _ in range(20):
        offset = rng.randrange(0, 6 * SECTOR_SIZE)
        data = rng.randbytes(rng.randint(1, 2 * SECTOR_SIZE))
        end = offset + len(data)
        live.extend(bytes(max(0, end - len(live))))
        live[offset:end] = data
        cache.append(_CachedOp(offset, data, len(live)))
        padded = live + bytes(8 * SECTOR_SIZE - len(live))
        for sector in range(8):
            states[sector].add(bytes(padded[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]))
    distinct = set()
    for seed in range(20):
        result = surviving_content(durable, cache, random.Random(seed))
        distinct.add(bytes(result))
        for sector in range(8):
            # the size may go back to an earlier one, cutting a sector short
            got = bytes(result[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE])
            assert any(state.startswith(got) for state in states[sector])
    assert len(distinct) > 10  # seeds really choose different survivors


def test_injected_error_tears_a_write_at_a_sector_boundary(sim):
    storage = sim.create("sim:tear")
    disk = sim.disk("sim:tear")
    disk.policy = lambda request: (SimFault(error=errno.ENOSPC, tear_sectors=1)
                                   if request.tag == 3 else None)
    with request_tag(3), pytest.raises(StorageError) as raised:
        storage.write(100, b"x" * 1000)
    assert raised.value.errno == errno.ENOSPC
    assert disk.errors_injected == 1
    assert storage.read(0, 1100) == bytes(100) + b"x" * (SECTOR_SIZE - 100) + bytes(588)
    storage.write(0, b"ok")  # untagged requests still work
    assert storage.read(0, 2) == b"ok"
    sim.forget("sim:tear")


def test_zero_before_write_is_a_cached_zeroing_that_fails_like_a_write(sim):
    """It zeroes what lies inside the disk, keeps the size (KEEP_SIZE) and
    meets injected faults like any write (stress sees them fail the write)."""
    storage = sim.create("sim:hint")
    disk = sim.disk("sim:hint")
    storage.write(0, b"x" * 2048)
    assert storage.zero_before_write(1024, 4096) is True
    assert disk.size() == 2048
    assert storage.read(0, 2048) == b"x" * 1024 + bytes(1024)
    storage.write(0, b"y" * 2048)
    disk.policy = lambda request: (SimFault(error=errno.EIO) if request.tag == 5 else None)
    with request_tag(5), pytest.raises(StorageError):
        storage.zero_before_write(0, 1024)
    assert disk.errors_injected == 1
    assert storage.zero_before_write(4096, 512) is True  # past the end: nothing to do
    assert disk.size() == 2048
    sim.forget("sim:hint")


def _race(sim, seed: int, reorder: bool = True, body=None) -> tuple[list[int], list[object]]:
    """Four scheduled threads write one sector each; returns the completion order."""
    storage = sim.create("sim:race")
    disk = sim.disk("sim:race")
    scheduler = BatchScheduler(random.Random(seed), reorder=reorder)
    order: list[int] = []
    disk.policy = lambda request: order.append(request.tag)  # sees requests as they complete
    disk.gate = scheduler.hold
    tags = range(4)
    scheduler.begin(tags)

    def run(tag: int) -> object:
        with scheduler.task(tag), request_tag(tag):
            try:
                return (body or _write_own_sector)(storage, tag)
            except Exception as error:
                return error
    with ThreadPoolExecutor(len(tags)) as pool:
        results = list(pool.map(run, tags))
    sim.forget("sim:race")
    return order, results


def _write_own_sector(storage, tag: int) -> None:
    storage.write(0, bytes([tag]) * SECTOR_SIZE)


def test_scheduled_requests_complete_in_a_seed_chosen_order(sim):
    orders = {seed: _race(sim, seed)[0] for seed in range(12)}
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) > 4  # the seed reorders
    assert all(_race(sim, seed)[0] == order for seed, order in orders.items())  # and replays
    assert _race(sim, 1, reorder=False)[0] == [0, 1, 2, 3]  # issue order


def test_growing_never_cuts_off_a_racing_write_past_the_new_size(sim):
    """A grow (write_zeroes past the end, FVD's data growing) racing with a
    write past the size it grows to: in every completion order the write's
    data stays. The size check and the growth were two steps, and a write
    landing between them was cut off (FVD under stress, seed 80265)."""
    seen: list = []

    def grow_or_write(storage, tag: int) -> None:
        seen.append(storage)
        if tag == 0:
            storage.write(4096, b"x" * SECTOR_SIZE)
        elif tag == 1:
            storage.grow_to(1024)
        elif tag == 2:
            storage.write_zeroes(1536, 512)

    for seed in range(16):
        seen.clear()
        _race(sim, seed, body=grow_or_write)
        storage = seen[0]
        assert storage.size() == 4096 + SECTOR_SIZE, seed
        assert storage.read(4096, SECTOR_SIZE) == b"x" * SECTOR_SIZE, seed


def test_scheduler_sees_waits_on_sync_locks(sim):
    lock = sync.Lock()

    def locked_writes(storage, tag: int) -> bytes:
        with lock:  # held across storage requests: the others wait in the scheduler
            storage.write(tag * SECTOR_SIZE, bytes([tag]) * SECTOR_SIZE)
            return storage.read(tag * SECTOR_SIZE, 1)
    order, results = _race(sim, 3, body=locked_writes)
    assert results == [bytes([tag]) for tag in range(4)]
    assert order[0::2] == order[1::2]  # each thread's write and read run back to back


def test_scheduler_reports_a_deadlock_instead_of_hanging(sim):
    first, second = sync.Lock(), sync.Lock()

    def opposite_order(storage, tag: int) -> None:
        one, other = (first, second) if tag % 2 else (second, first)
        with one:
            storage.read(0, 1)
            with other:
                pass
    _, results = _race(sim, 0, reorder=False, body=opposite_order)
    assert all(isinstance(result, ScheduleDeadlock) for result in results)


def test_sync_primitives_behave_like_threading_without_a_scheduler():
    lock, rlock, condition = sync.Lock(), sync.RLock(), sync.Condition()
    with lock:
        assert lock.locked() and not lock.acquire(blocking=False)
    with rlock, rlock:  # re-entrant
        pass
    with pytest.raises(RuntimeError):
        rlock.release()
    done: list[bool] = []

    def waiter() -> None:
        with condition:
            while not done:
                condition.wait()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(waiter)
        with condition:
            done.append(True)
            condition.notify_all()
        future.result(timeout=5)

"""Growing a store never shrinks it: write_zeroes past the end used to read
size() and then truncate to its own end, cutting off a write another thread
had just made beyond it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corefmt.storage.base import Storage
from corefmt.storage.file import FileStorage, FileStorageDriver
from corefmt.storage.memory import MemoryStorageDriver

START_SIZE = 1000
ZEROES = (500, 1500)  # offset, length: ends at 2000, past the end
FAR_WRITE = (10_000, b"w" * 100)
#: How long the hooked truncate lets the other thread try to write first. A
#: fixed store makes that write wait for the resize lock, so it cannot finish.
RACE_WAIT = 0.3


@pytest.fixture(params=["file", "memory"])
def storage(request, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "file":
        store = FileStorageDriver().create(str(tmp_path / "f"))
    else:
        name = f"memory:race-{id(request)}"
        store = MemoryStorageDriver().create(name)
    store.write(0, b"\xff" * START_SIZE)
    yield store
    store.close()


def _hook_first_call(storage: Storage, name: str, during: Callable[[], None]) -> None:
    """Run ``during`` inside the first call of ``storage.<name>``: right after
    write_zeroes has read the size (``size``: the value it gets is then out
    of date), or right before it grows the store (``_truncate``)."""
    real = getattr(storage, name)
    calls = []

    def hooked(*args: int) -> int | None:
        if calls:
            return real(*args)
        calls.append(args)
        if name == "size":
            answer = real(*args)
            during()
            return answer
        during()
        return real(*args)

    setattr(storage, name, hooked)


@pytest.mark.parametrize("hook", ["size", "_truncate"])
def test_write_zeroes_past_the_end_keeps_a_concurrent_write_beyond_it(storage: Storage,
                                                                      hook: str):
    if hook == "_truncate" and not isinstance(storage, FileStorage):
        pytest.skip("a memory store grows without _truncate")
    offset, data = FAR_WRITE
    writer = threading.Thread(target=storage.write, args=(offset, data))

    def race() -> None:
        writer.start()
        writer.join(RACE_WAIT)  # the far write lands now, unless it must wait

    _hook_first_call(storage, hook, race)
    storage.write_zeroes(*ZEROES)
    writer.join()
    assert storage.size() == offset + len(data)
    assert storage.read(offset, len(data)) == data
    assert storage.read(0, 2000) == b"\xff" * 500 + bytes(1500)


def test_growing_never_shrinks(storage: Storage):
    assert storage.grow_to(10) == START_SIZE
    assert storage.size() == START_SIZE
    assert storage.grow_to(4096) == START_SIZE
    assert storage.size() == 4096
    storage.write_zeroes(100, 50)  # inside: no size change
    assert storage.size() == 4096


def test_concurrent_growth_from_many_threads(storage: Storage):
    """Threads that each grow the store (writes and zeroes past the end): the
    end is the furthest of them, and every write is still there."""
    ends: list[int] = []
    barrier = threading.Barrier(8)

    def grow(number: int) -> None:
        barrier.wait()
        for round_ in range(20):
            offset = START_SIZE + (round_ * 8 + number) * 512
            if number % 2:
                storage.write(offset, bytes([number]) * 512)
            else:
                storage.write_zeroes(offset, 512)
            ends.append(offset + 512)

    threads = [threading.Thread(target=grow, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.size() == max(ends)
    for number in range(1, 8, 2):
        for round_ in range(20):
            offset = START_SIZE + (round_ * 8 + number) * 512
            assert storage.read(offset, 512) == bytes([number]) * 512

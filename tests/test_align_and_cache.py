"""Read-modify-write alignment and tracked requests (the metadata cache has
tests/test_metadata_cache.py)."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from corefmt.block.align import write_unaligned
from corefmt.block.tracked import RequestTracker


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 5000), length=st.integers(1, 5000),
       alignment=st.sampled_from([1, 512, 4096]))
def test_write_unaligned_matches_a_plain_write(offset, length, alignment):
    disk = bytearray(range(256)) * 64  # 16 KiB of known bytes
    model = bytearray(disk)
    data = bytes((i * 7 + 1) % 256 for i in range(length))
    model[offset:offset + length] = data
    writes = []

    def read(at, count):
        assert at % alignment == 0 and count % alignment == 0
        return bytes(disk[at:at + count])

    def write(at, payload):
        assert at % alignment == 0 and len(payload) % alignment == 0
        writes.append((at, len(payload)))
        disk[at:at + len(payload)] = payload

    write_unaligned(offset, data, alignment, read, write)
    assert disk[:len(model)] == model
    assert len(writes) <= 3


def test_tracker_serialises_only_conflicting_requests():
    tracker = RequestTracker()
    order = []
    with tracker.track(0, 100, exclusive=True):
        # disjoint and shared-vs-shared never wait
        with tracker.track(100, 200, exclusive=True):
            pass

        def blocked():
            with tracker.track(50, 60, exclusive=False):
                order.append("reader")

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.05)
        order.append("writer done")
    thread.join()
    assert order == ["writer done", "reader"]
    with tracker.track(0, 10, exclusive=False), tracker.track(0, 10, exclusive=False):
        assert tracker.in_flight == 2

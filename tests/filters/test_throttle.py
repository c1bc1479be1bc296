"""throttle: token buckets against a fake clock (nothing really sleeps)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from corefmt.block.chain import open_graph
from corefmt.block.imagespec import parse_image_opts
from corefmt.errors import OptionError
from corefmt.filters import throttle
from tests.filters.helpers import FakeClock, make_raw, raw_spec

KiB = 1024
REQUEST = 4 * KiB
RATE = 16 * KiB  # bytes/s: a 4 KiB request is a quarter of a second
COUNT = 8


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(start=1000.0)
    monkeypatch.setattr(throttle, "CLOCK", fake)
    monkeypatch.setattr(throttle, "SLEEP", fake.sleep)
    return fake


@pytest.fixture
def image(tmp_path) -> str:
    return make_raw(tmp_path / "disk.raw", 256 * KiB)


def throttled(image: str, **options: Any):
    return open_graph({"driver": "throttle", **options, "file": raw_spec(image)})


def test_reads_at_a_byte_rate_sleep_exactly_their_share(image, clock):
    with throttled(image, **{"bps-read": RATE, "burst": 0}) as node:
        for index in range(COUNT):
            node.read(index * REQUEST, REQUEST)
    assert clock.sleeps == [REQUEST / RATE] * COUNT
    assert clock.slept == COUNT * REQUEST / RATE == 2.0


def test_the_burst_lets_its_share_through_at_once(image, clock):
    burst = 0.125  # seconds: 2 KiB at 16 KiB/s
    with throttled(image, **{"bps-total": RATE, "burst": burst}) as node:
        for index in range(COUNT):
            node.read(index * REQUEST, REQUEST)
    assert clock.slept == pytest.approx((COUNT * REQUEST - burst * RATE) / RATE, abs=1e-9)


def test_reads_and_writes_have_their_own_buckets(image, clock):
    with throttled(image, **{"bps-read": RATE, "bps-write": 2 * RATE, "burst": 0}) as node:
        for index in range(COUNT):
            node.write(index * REQUEST, b"w" * REQUEST)
        assert clock.slept == COUNT * REQUEST / (2 * RATE)
        clock.now += 3600  # idle: both buckets drain
        clock.sleeps.clear()
        for index in range(COUNT):
            node.read(index * REQUEST, REQUEST)
        assert clock.slept == COUNT * REQUEST / RATE


def test_a_read_limit_never_holds_back_writes(image, clock):
    with throttled(image, **{"bps-read": 1, "iops-read": 1, "burst": 0}) as node:
        for index in range(COUNT):
            node.write(index * REQUEST, b"w" * REQUEST)
            node.write_zeroes(index * REQUEST, REQUEST)
            node.discard(index * REQUEST, REQUEST)
        node.flush()
    assert clock.sleeps == []


def test_writes_zeroes_and_discards_count_as_writes(image, clock):
    with throttled(image, **{"iops-write": 10, "burst": 0}) as node:
        node.write(0, b"w" * REQUEST)
        node.write_zeroes(0, REQUEST)
        node.discard(0, REQUEST)
        node.read(0, REQUEST)  # not a write
        node.flush()  # never throttled
    assert clock.sleeps == pytest.approx([0.1] * 3)


def test_total_limits_count_both_directions(image, clock):
    with throttled(image, **{"bps-total": RATE, "burst": 0}) as node:
        for index in range(COUNT // 2):
            node.read(index * REQUEST, REQUEST)
            node.write(index * REQUEST, b"x" * REQUEST)
    assert clock.slept == COUNT * REQUEST / RATE


def test_the_slower_of_two_limits_wins(image, clock):
    with throttled(image, **{"bps-total": 1024 * KiB, "iops-total": 2, "burst": 0}) as node:
        for index in range(4):
            node.read(index * 512, 512)
    assert clock.sleeps == [0.5] * 4


def test_an_idle_bucket_refills_up_to_its_burst(image, clock):
    with throttled(image, **{"bps-read": RATE, "burst": 1}) as node:
        for index in range(4):  # 16 KiB: exactly one second's worth, the burst
            node.read(index * REQUEST, REQUEST)
        assert clock.sleeps == []
        node.read(0, REQUEST)
        assert clock.sleeps == [REQUEST / RATE]
        clock.now += 10
        for index in range(4):
            node.read(index * REQUEST, REQUEST)
        assert clock.sleeps == [REQUEST / RATE]


@pytest.mark.parametrize("options", [{}, {"bps-total": 0, "iops-total": 0},
                                     {"bps-read": 0, "bps-write": 0, "iops-read": 0,
                                      "iops-write": 0, "burst": 0}])
def test_unlimited_never_sleeps(image, clock, options):
    with throttled(image, **options) as node:
        for index in range(64):
            node.write(index * REQUEST, b"u" * REQUEST)
            node.read(index * REQUEST, REQUEST)
        assert node.info()["waited"] == 0
    assert clock.sleeps == []


def test_the_clock_can_be_replaced_on_an_open_filter(image):
    fake = FakeClock(start=5.0)
    with throttled(image, **{"iops-read": 4, "burst": 0}) as node:
        node.filter.clock, node.filter.sleep = fake, fake.sleep
        for _ in range(3):
            node.read(0, 512)
    assert fake.sleeps == [0.25] * 3


def test_image_opts_values_are_strings_with_size_suffixes(image, clock):
    spec = parse_image_opts(f"driver=throttle,bps-write=16K,burst=0,file.driver=raw,"
                            f"file.file.filename={image}")
    with open_graph(spec) as node:
        assert node.info()["bps-write"] == RATE
        node.write(0, b"s" * REQUEST)
    assert clock.sleeps == [REQUEST / RATE]


@pytest.mark.parametrize(("options", "message"), [
    ({"bps-total": 1, "bps-read": 1}, "bps-total and bps-read/bps-write cannot be used"),
    ({"iops-total": 1, "iops-write": 1}, "iops-total and iops-read/iops-write cannot be used"),
    ({"bps-read": -1}, "must not be negative"),
    ({"burst": -0.5}, "burst must not be negative"),
    ({"iops-read": "many"}, "Parameter 'iops-read' expects a number"),
    ({"bps": 1}, "does not support the option 'bps'"),
])
def test_bad_options_are_refused(image, options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        throttled(image, **options)

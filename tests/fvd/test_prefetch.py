"""FVD's copy-on-read and prefetch (spec §7) in the tools and the API:
fills are never journaled, a finished prefetch never opens its base again,
an interrupted one loses at most 64 MiB, and the read-only verbs never write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corefmt_fvd.journal import replay_records
from corefmt_fvd.layout import HEADER_SIZE, FvdHeader

import corefmt
from corefmt.fills import COPY_ON_READ_ASYNC
from corefmt.ops.prefetch import CHECKPOINT_BYTES, Prefetcher, PrefetchState
from tests.fvd.helpers import cli, random_base

KiB, MiB = 1024, 1024 * 1024


def _pair(tmp_path: Path, size: int = 8 * MiB, options: dict | None = None,
          base_size: int | None = None) -> tuple[Path, Path, bytes]:
    base, top = tmp_path / "base.raw", tmp_path / "top.fvd"
    data = random_base(base, base_size or size, seed=size)
    corefmt.create(str(top), "fvd", size, backing=str(base), backing_format="raw",
                   options=options or {})
    return base, top, data


def _header(path: Path) -> FvdHeader:
    return FvdHeader.unpack(path.read_bytes()[:HEADER_SIZE])


def _records(path: Path) -> list:
    """Every record in the journal, as a replay reads it."""
    header = _header(path)
    from corefmt_fvd.journal import Journal

    raw = path.read_bytes()
    journal = Journal(header.journal_offset, header.journal_size)
    return [record for _, record in replay_records(
        lambda offset, length: raw[offset:offset + length], journal)]


def _unallocated(path: Path) -> int:
    with corefmt.open(str(path), "fvd", read_only=True, backing=False) as node:
        return sum(e.length for e in node.own_status(0, node.virtual_size) if not e.allocated)


@pytest.mark.parametrize("options", [{}, {"compact_image": "on", "chunk_size": "64k"}],
                         ids=["plain", "compact"])
def test_a_finished_prefetch_never_opens_the_base_again(tmp_path, options):
    base, top, data = _pair(tmp_path, options=options)
    with corefmt.open(str(top)) as node:
        node.write(3 * MiB + 100, b"guest" * 1000)
    status = corefmt.prefetch(str(top))
    assert status.state is PrefetchState.FINISHED and status.self_contained
    assert _header(top).all_data_in_fvd_img == 1
    expected = bytearray(data)
    expected[3 * MiB + 100:3 * MiB + 5100] = b"guest" * 1000
    base.rename(tmp_path / "moved.raw")  # an open of the base now fails
    with corefmt.open(str(top), "fvd") as node:
        assert node.layer().backing is None
        assert node.read(0, node.virtual_size) == bytes(expected)
        node.write(0, b"after")  # the fast path: no bitmap any more
    status, out, _ = cli("check", "-f", "fvd", top)
    assert status == 0, out
    status, out, _ = cli("prefetch", top)
    assert status == 0 and "no backing file" in out


def test_fills_add_no_journal_records(tmp_path):
    _, top, data = _pair(tmp_path, options={"compact_image": "on", "chunk_size": "64k"})
    with corefmt.open(str(top)) as node:
        node.write(0, b"x" * 4096)
        node.flush()  # one write's records
    before = _records(top)
    assert before
    with corefmt.open(str(top), copy_on_read="sync") as node:
        assert node.read(MiB, 2 * MiB) == data[MiB:3 * MiB]  # copy-on-read fills
        Prefetcher(node, throttle=False).copy_range(4 * MiB, 2 * MiB)
        node.flush()
        assert _records(top) == before
        assert node.own_status(MiB, 5 * MiB)[0].allocated
    assert _records(top) == before


def test_copy_on_read_runs_asynchronously_with_the_headers_bound(tmp_path):
    _, top, data = _pair(tmp_path, options={"max_outstanding_copy_on_read_data": "256k"})
    with corefmt.open(str(top), copy_on_read=True) as node:
        cor = node.filter
        assert cor.mode == COPY_ON_READ_ASYNC
        assert cor.max_outstanding == 256 * KiB
        assert node.read(0, 4 * MiB) == data[:4 * MiB]
        node.flush()  # waits for the fills in flight
        filled = sum(e.length for e in node.own_status(0, 4 * MiB) if e.allocated)
        assert 0 < filled < 4 * MiB or cor.fills_dropped == 0
        assert cor.fills_started >= 1


def test_io_with_copy_on_read_fills_and_the_read_only_verbs_never_write(tmp_path):
    _, top, _ = _pair(tmp_path, options={"copy_on_read": "on"})
    digest = hashlib.sha256(top.read_bytes()).hexdigest()
    for verb in (["info", top], ["map", top], ["compare", top, tmp_path / "base.raw"],
                 ["convert", "-O", "raw", top, tmp_path / "copy.raw"],
                 ["io", "-c", "read 0 64k", top]):
        status, out, err = cli(*verb)
        assert status == 0, (verb, out, err)
        assert hashlib.sha256(top.read_bytes()).hexdigest() == digest, verb
    status, out, err = cli("io", "-C", "-c", "read 0 128k", top)
    assert status == 0, err
    with corefmt.open(str(top), read_only=True, backing=False) as node:
        assert node.own_status(0, 128 * KiB)[0].allocated
        assert not node.own_status(MiB, 64 * KiB)[0].allocated
    assert _records(top) == []  # fills only: nothing journaled


def test_background_prefetch_through_the_api_while_the_guest_writes(tmp_path):
    base, top, data = _pair(tmp_path, size=16 * MiB)
    expected = bytearray(data)
    with corefmt.open(str(top), prefetch=True) as node:
        prefetcher = node.filter.prefetcher
        for index in range(64):
            offset = (index * 997 * 4096) % (15 * MiB)
            payload = bytes([index + 1]) * 5000
            node.write(offset, payload)  # a guest write always wins over a fill
            expected[offset:offset + 5000] = payload
            assert node.read(offset, 5000) == payload
        assert prefetcher.wait(60)
        assert node.info()["state"] == "finished", node.info()
        assert node.info()["self-contained"]
        assert node.read(0, 16 * MiB) == bytes(expected)
    base.unlink()
    with corefmt.open(str(top), "fvd") as node:
        assert node.read(0, 16 * MiB) == bytes(expected)


def test_prefetch_throttles_below_the_minimum_throughput(tmp_path):
    from corefmt.fills import PrefetchTuning

    # An unreachable floor: every throughput estimate is below it.
    slow = PrefetchTuning(read_measure_ms=1, write_measure_ms=1, min_read_kbs=10**9,
                          min_write_kbs=10**9, throttle_ms=2, bytes_per_prefetch=64 * KiB)
    for throttle, paused in ((True, True), (False, False)):
        directory = tmp_path / str(throttle)
        directory.mkdir()
        _, top, _ = _pair(directory, size=4 * MiB)
        with corefmt.open(str(top)) as node:
            status = Prefetcher(node, slow, throttle=throttle).run()
        assert status.state is PrefetchState.FINISHED
        assert (status.pauses > 0) is paused, status


def test_prefetch_backs_off_when_the_foreground_gets_slower(tmp_path):
    from corefmt.fills import PrefetchTuning

    _, top, _ = _pair(tmp_path, size=4 * MiB)
    tuning = PrefetchTuning(throttle_ms=1, bytes_per_prefetch=64 * KiB, min_read_kbs=0,
                            min_write_kbs=0)
    with corefmt.open(str(top)) as node:
        prefetcher = Prefetcher(node, tuning)
        latency = prefetcher._latency
        now = prefetcher.clock()
        for _ in range(32):  # idle: 1 ms; while prefetching: 5 ms
            latency.add(0.001, busy=False, now=now)
            latency.add(0.005, busy=True, now=now)
        latency.idle_at = now
        before = prefetcher.status.pauses
        for _ in range(20):
            latency.last_request = prefetcher.clock()
            assert prefetcher._gate()  # what the pipeline asks before each read
            for _ in range(32):
                latency.add(0.005, busy=True, now=prefetcher.clock())
        assert prefetcher.status.pauses > before
        # The same latency with and without prefetch: no pause.
        latency.reset_busy()
        latency.restart_idle(prefetcher.clock())
        for _ in range(32):
            latency.add(0.001, busy=False, now=prefetcher.clock())
            latency.add(0.001, busy=True, now=prefetcher.clock())
        latency.last_request = prefetcher.clock()
        before = prefetcher.status.pauses
        assert prefetcher._gate()
        assert prefetcher.status.pauses == before


def _percent(stream, target: float, deadline: float) -> float:
    """Read ``-p`` lines until the progress reaches ``target`` percent."""
    text = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            text += chunk
            found = re.findall(rb"\((\d+\.\d+)/100%\)", text)
            if found and float(found[-1]) >= target:
                return float(found[-1])
    raise AssertionError(f"progress never reached {target}%: {text[-200:]!r}")


def test_a_killed_prefetch_resumes_and_loses_at_most_64_mib(tmp_path):
    size = 4 * CHECKPOINT_BYTES
    base, top = tmp_path / "base.raw", tmp_path / "top.fvd"
    data = os.urandom(size)  # random.randbytes cannot make this much at once
    base.write_bytes(data)
    corefmt.create(str(top), "fvd", size, backing=str(base), backing_format="raw")
    process = subprocess.Popen(
        [sys.executable, "-c", "from corefmt.cli.main import main; import sys; "
         "sys.exit(main(sys.argv[1:]))", "prefetch", "-p", "--no-throttle", str(top)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        percent = _percent(process.stdout, 60.0, time.monotonic() + 120)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    reported = int(size * percent / 100)
    kept = size - _unallocated(top)
    assert kept >= CHECKPOINT_BYTES  # checkpoints made progress durable
    assert reported - kept <= CHECKPOINT_BYTES, (reported, kept)
    status, out, err = cli("prefetch", "--output", "json", top)
    assert status == 0, err
    assert f'"copied": {size - kept}' in out
    base.unlink()
    with corefmt.open(str(top), "fvd", read_only=True) as node:
        assert node.read(0, size) == data


def test_a_guest_write_racing_an_asynchronous_fill_wins(tmp_path):
    import threading

    _, top, data = _pair(tmp_path)
    with corefmt.open(str(top), copy_on_read=True) as node:
        layer = node.layer()
        release = threading.Event()
        real_copy_up = layer.copy_up

        def late_copy_up(offset, length, fill=None):
            release.wait(10)  # the fill starts only after the guest's write
            return real_copy_up(offset, length, fill)

        layer.copy_up = late_copy_up
        assert node.read(64 * KiB, 64 * KiB) == data[64 * KiB:128 * KiB]
        node.write(64 * KiB + 512, b"guest" * 100)
        release.set()
        node.flush()  # the fill has run
        expected = bytearray(data[64 * KiB:128 * KiB])
        expected[512:1012] = b"guest" * 100
        assert node.read(64 * KiB, 64 * KiB) == bytes(expected)
    with corefmt.open(str(top)) as node:
        assert node.read(64 * KiB, 64 * KiB) == bytes(expected)


def test_a_failed_store_is_not_held_up_by_a_pause_of_the_reader(tmp_path):
    from corefmt.fills import PrefetchTuning

    _, top, _ = _pair(tmp_path, size=4 * MiB)
    # The reader pauses for seconds after its second piece (two 5 ms reads fill
    # a throughput window; the floor is unreachable) while the first is stored.
    tuning = PrefetchTuning(slots=2, bytes_per_prefetch=64 * KiB, read_measure_ms=8,
                            min_read_kbs=10**9, min_write_kbs=0, throttle_ms=20_000)
    with corefmt.open(str(top)) as node:
        layer = node.layer()

        def failing_copy_up(offset, length, data=None):
            time.sleep(0.05)
            raise corefmt.StorageError(str(top), "write", OSError(5, "Input/output error"))

        real_read_below = layer.read_below
        # Each read takes 5 ms on the prefetcher's clock, whatever the machine's
        # load: the second (not the first, as a slow real read could) fills
        # the window, so the pause comes after the first piece is handed over.
        now = [time.monotonic()]

        def slow_read_below(offset, length):
            now[0] += 0.005
            return real_read_below(offset, length)

        layer.copy_up = failing_copy_up
        layer.read_below = slow_read_below
        prefetcher = Prefetcher(node, tuning, rng=random.Random(1),  # first coin: pause
                                clock=lambda: now[0])
        began = time.monotonic()
        with pytest.raises(corefmt.StorageError):
            prefetcher.run()
        assert time.monotonic() - began < 5
        assert prefetcher.status.state is PrefetchState.FAILED


def test_a_background_prefetch_that_fails_at_once_says_so(tmp_path):
    _, top, _ = _pair(tmp_path, size=4 * MiB)
    spec = {"driver": "prefetch", "start-delay": "0.2", "file": {"driver": "fvd", "file": str(top)}}
    with corefmt.open(spec) as node:
        def broken(offset, length):
            raise corefmt.ImageError(str(top), "block status", offset, "broken")

        node.layer().own_status = broken
        assert node.filter.prefetcher.wait(10)
        assert node.info()["state"] == "failed"
        assert "broken" in node.info()["error"]


@pytest.mark.parametrize("delay", ["inf", "nan", "-1", "1e10", "soon"])
def test_an_impossible_start_delay_is_refused(tmp_path, delay):
    _, top, _ = _pair(tmp_path, size=MiB)
    spec = {"driver": "prefetch", "start-delay": delay, "file": {"driver": "fvd", "file": str(top)}}
    with pytest.raises(corefmt.OptionError, match="start-delay"):
        corefmt.open(spec)


def test_a_reopen_read_only_pauses_background_prefetch_and_read_write_resumes_it(tmp_path):
    _, top, data = _pair(tmp_path, size=8 * MiB)
    spec = {"driver": "prefetch", "throttle": "off", "start-delay": "0.5",
            "file": {"driver": "fvd", "file": str(top)}}
    with corefmt.open(spec) as node:
        layer = node.layer()
        real_copy_up = layer.copy_up

        def slow_copy_up(offset, length, fill=None):
            time.sleep(0.02)
            return real_copy_up(offset, length, fill)

        layer.copy_up = slow_copy_up
        node.reopen(read_only=True)  # before the delay ends
        time.sleep(1.0)
        assert node.info()["state"] == "paused", node.info()
        node.reopen(read_only=False)
        assert node.filter.prefetcher.wait(30)
        assert node.info()["state"] == "finished", node.info()
        assert node.read(0, 8 * MiB) == data


def test_prefetch_json_is_parseable_with_progress_and_says_self_contained(tmp_path):
    _, top, _ = _pair(tmp_path, size=2 * MiB)
    for _ in range(2):  # the second run finds an image that needs no base
        status, out, err = cli("prefetch", "-p", "--output", "json", top)
        assert status == 0, err
        result = json.loads(out)
        assert result["state"] == "finished" and result["self-contained"] is True


def _nice_while_fetching(monkeypatch) -> list[int]:
    """The nice value of each thread that fetches from the base."""
    from corefmt.ops.prefetch import thread_nice

    seen: list[int] = []
    fetch = Prefetcher._fetch

    def recording(self, start, run):
        seen.append(thread_nice())
        return fetch(self, start, run)

    monkeypatch.setattr(Prefetcher, "_fetch", recording)
    return seen


def test_a_throttled_prefetch_runs_its_threads_nicer_and_leaves_the_callers(
        tmp_path, monkeypatch):
    """FVD's prefetch must not slow the VMs already running: its own threads
    yield the CPU (BACKGROUND_NICE), the caller's thread keeps its priority,
    and an unthrottled prefetch (the user waits for it) is not lowered."""
    from corefmt.ops.prefetch import BACKGROUND_NICE, MAX_NICE, thread_nice

    own = thread_nice()
    if own is None or own >= MAX_NICE:
        pytest.skip("no per-thread priority to lower here")
    lowered = min(MAX_NICE, own + BACKGROUND_NICE)
    seen = _nice_while_fetching(monkeypatch)
    for name, run, expected in (("background", "start", lowered), ("here", "run", lowered),
                                ("unthrottled", "run", own)):
        (tmp_path / name).mkdir()
        _, top, _ = _pair(tmp_path / name)
        seen.clear()
        with corefmt.open(str(top), "fvd") as node:
            prefetch = Prefetcher(node, throttle=name != "unthrottled")
            if run == "start":
                prefetch.start()
                assert prefetch.wait(30)
            else:
                prefetch.run()
            assert prefetch.status.state is PrefetchState.FINISHED
        assert seen and set(seen) == {expected}, name
        assert thread_nice() == own


def test_the_prefetch_verb_yields_the_cpu_unless_told_not_to_throttle(tmp_path, monkeypatch):
    """The verb's prefetch runs 10 levels nicer (not --no-throttle), on a
    thread of its own: a caller of the CLI in-process keeps its priority."""
    from corefmt.cli.main import main
    from corefmt.ops.prefetch import BACKGROUND_NICE, MAX_NICE, thread_nice

    own = thread_nice()
    if own is None or own >= MAX_NICE:
        pytest.skip("no per-thread priority to lower here")
    seen = _nice_while_fetching(monkeypatch)
    for name, extra, expected in (("a", [], min(MAX_NICE, own + BACKGROUND_NICE)),
                                  ("b", ["--no-throttle"], own)):
        (tmp_path / name).mkdir()
        _, top, _ = _pair(tmp_path / name, size=4 * MiB)
        seen.clear()
        assert main(["prefetch", "-q", *extra, str(top)]) == 0
        assert seen and set(seen) == {expected}, name
        assert thread_nice() == own

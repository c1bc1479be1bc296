"""Prefetch: copy everything the chain below holds into the top layer, so
the image soon stops depending on its base (FVD spec section 7.2, for
every format).

The pipeline is FVD's: ``slots`` buffers, one read from below in flight
ahead of one store, in ``bytes_per_prefetch`` pieces aligned to the
layer's copy granularity. Stores are fills (``copy_up``: never over a
guest write that got there first, never journaled by FVD). Every
``checkpoint_bytes`` the fills are made durable, so an interrupted
prefetch loses at most that much progress; a rerun starts over from
what the layer already holds.

Self-throttling, when on:
- FVD's throughput floor: read and store throughput are averaged (an
  exponentially weighted mean over ``measure_ms`` windows); below the
  minimum, with probability one half, prefetch pauses for 1 + U[0,
  throttle_ms] ms (the coin keeps contending images from pausing together).
- corefmt's foreground trigger, for fast links where the floor never
  fires: the image's own requests (reported by the prefetch filter) are
  timed while prefetch runs and while it is paused; when they take more
  than ``max_foreground_slowdown`` times as long, prefetch pauses, twice
  as long each time in a row (from 50 ms up to the throttle time), and
  half as long once they keep up: prefetch's share of the time settles
  where the foreground stays within the bound. A short probe pause
  measures the idle latency when it is unknown or old.

When nothing is left below, the fills are made durable and the driver may
record that the backing is no longer needed (FVD's all_data_in_fvd_img).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs

from corefmt import sync
from corefmt.block.align import align_down, align_up
from corefmt.errors import ReadOnlyError
from corefmt.fills import PrefetchTuning, fill_policy

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

#: Fills are made durable at least this often (bytes stored).
CHECKPOINT_BYTES = 64 * 1024 * 1024
#: Pieces of ranges still below looked up per status call.
SCAN_WINDOW_PIECES = 64
#: Walks over the image: a guest discard behind the cursor can open a hole again.
MAX_PASSES = 3
#: Foreground trigger: idle latency is re-measured after this long...
BASELINE_MAX_AGE = 5.0
#: ... in a probe pause this long,
PROBE_SECONDS = 0.2
#: ... and a comparison needs this many timed requests on each side.
MIN_LATENCY_SAMPLES = 16
#: Foreground requests older than this do not count as a foreground workload.
FOREGROUND_IDLE_AFTER = 1.0
#: The first pause for a slowed foreground; doubled while it stays slow,
#: halved when it keeps up (seconds).
FOREGROUND_PAUSE = 0.05
#: How often a reader waiting for a free slot, or a prefetch waiting for a
#: read-only layer to be writable again, looks whether to give up (seconds).
SLOT_POLL = 0.05
READ_ONLY_POLL = 0.1
#: 1 KB in the original's thresholds, and milliseconds per second.
KB, MS = 1024, 1000

ProgressFn = Callable[[int, int], None]


class PrefetchState(enum.Enum):
    WAITING = "waiting"  # for the start delay
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"  # FVD's DISABLED: a read or store failed


@attrs.define
class PrefetchStatus:
    state: PrefetchState = PrefetchState.WAITING
    #: Bytes this prefetch stored, and bytes the layer holds of ``total``.
    copied: int = 0
    done: int = 0
    total: int = 0
    pauses: int = 0
    checkpoints: int = 0
    #: The driver recorded that the backing is no longer needed.
    self_contained: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "copied": self.copied, "done": self.done,
                "total": self.total, "pauses": self.pauses, "checkpoints": self.checkpoints,
                "self-contained": self.self_contained, "error": self.error}


class _Throughput:
    """FVD's throughput estimate: bytes per ms over windows, averaged."""

    def __init__(self, measure_ms: int, alpha_percent: int, minimum_kbs: int):
        self.window = max(measure_ms, 1) / MS
        self.alpha = alpha_percent / 100
        self.minimum = minimum_kbs * KB  # bytes per second
        self.average: float | None = None
        self._bytes = 0
        self._seconds = 0.0

    def add(self, nbytes: int, seconds: float) -> bool:
        """Count one operation; True when the average fell below the minimum."""
        self._bytes += nbytes
        self._seconds += seconds
        if self._seconds < self.window:
            return False
        sample = self._bytes / self._seconds
        self.average = sample if self.average is None else (
            self.alpha * self.average + (1 - self.alpha) * sample)
        self._bytes, self._seconds = 0, 0.0
        return self.average < self.minimum

    def reset(self) -> None:
        self.average = None
        self._bytes, self._seconds = 0, 0.0


class _Latency:
    """Mean latency of foreground requests, split by whether prefetch ran."""

    def __init__(self) -> None:
        self.busy_total = self.idle_total = 0.0
        self.busy_count = self.idle_count = 0
        self.idle_at: float | None = None  # when the idle mean was last measured
        self.last_request = -FOREGROUND_IDLE_AFTER * 2

    def add(self, seconds: float, busy: bool, now: float) -> None:
        self.last_request = now
        if busy:
            self.busy_total += seconds
            self.busy_count += 1
        else:
            self.idle_total += seconds
            self.idle_count += 1

    def slowdown(self) -> float | None:
        if self.busy_count < MIN_LATENCY_SAMPLES or self.idle_count < MIN_LATENCY_SAMPLES:
            return None
        idle = self.idle_total / self.idle_count
        busy = self.busy_total / self.busy_count
        return busy / idle if idle > 0 else None

    def reset_busy(self) -> None:
        self.busy_total, self.busy_count = 0.0, 0

    def restart_idle(self, now: float) -> None:
        self.idle_total, self.idle_count, self.idle_at = 0.0, 0, now


_ZEROS = b""


#: How much nicer (lower CPU priority) than the thread that starts them a
#: throttled prefetch's own threads run. FVD's prefetch must not slow the VMs
#: already running; on a fast link what they share is the CPU, which the
#: original's throughput floor never sees.
BACKGROUND_NICE = 10
#: The lowest priority Linux has.
MAX_NICE = 19


def thread_nice() -> int | None:
    """The calling thread's nice value (Linux keeps one per thread), or None
    where the platform cannot tell."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


def lower_priority(base: int | None, by: int) -> None:
    """Run the calling thread ``by`` nicer than ``base`` (never less nice than
    it is: raising priority needs privileges). Threads it starts inherit it."""
    if base is None or by <= 0:
        return
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        wanted = min(MAX_NICE, base + by)
        if wanted > os.getpriority(os.PRIO_PROCESS, tid):
            os.setpriority(os.PRIO_PROCESS, tid, wanted)


def _zeros(length: int) -> bytes:
    global _ZEROS
    if len(_ZEROS) < length:
        _ZEROS = bytes(length)
    return _ZEROS[:length] if len(_ZEROS) != length else _ZEROS


class Prefetcher:
    """Fills one layer from the chain below; ``run`` in this thread, or
    ``start`` in the background (the prefetch filter does).

    A throttled prefetch's own threads (the background one, the reader) run
    ``nice`` (default BACKGROUND_NICE) lower in CPU priority than the thread
    that started them; the caller's thread keeps its own."""

    def __init__(self, node: BlockNode, tuning: PrefetchTuning | None = None, *,
                 throttle: bool = True, progress: ProgressFn | None = None,
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 above: BlockNode | None = None, nice: int | None = None):
        self.layer = node.layer()
        #: Copy only what the layers above this one decide (stream's base):
        #: the rest stays to be read from it, so the layer is never complete.
        self.above = above.layer() if above is not None else None
        self.tuning = tuning or fill_policy(self.layer).prefetch
        self.throttle = throttle and self.tuning.throttle_ms > 0
        self.nice = (BACKGROUND_NICE if self.throttle else 0) if nice is None else nice
        self.progress = progress
        self.checkpoint_bytes = checkpoint_bytes
        self.rng = rng or random.Random()
        self.clock = clock
        self.status = PrefetchStatus(total=self.layer.virtual_size)
        self._lock = sync.Lock()
        self._wake = threading.Event()
        self._stopping = False
        #: The store loop ended a pipelined pass early: its reader stops.
        self._halted = False
        self._thread: threading.Thread | None = None
        #: The ident of the background thread, once it runs (see start).
        self._in_background: int | None = None
        #: What made a background prefetch fail (``run`` raised it there).
        self.failure: Exception | None = None
        self._since_checkpoint = 0
        unit = max(self.layer.limits.copy_granularity, self.layer.request_alignment, 1)
        self.unit = unit
        self.step = max(unit, align_up(self.tuning.bytes_per_prefetch, unit))
        tuning = self.tuning
        self._reads = _Throughput(tuning.read_measure_ms, tuning.alpha_percent,
                                  tuning.min_read_kbs)
        self._stores = _Throughput(tuning.write_measure_ms, tuning.alpha_percent,
                                   tuning.min_write_kbs)
        self._latency = _Latency()
        self._foreground_pause = FOREGROUND_PAUSE

    # -- control ----------------------------------------------------------------
    def start(self, delay: float = 0.0) -> None:
        """Prefetch in a background thread, after ``delay`` seconds."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._background, args=(delay, thread_nice()),
                                        name="corefmt-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the piece in hand (its store completes); waits for a
        background prefetch to end (``run`` in another thread returns soon)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background prefetch to end; True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def note_foreground(self, seconds: float) -> None:
        """One of the image's own requests took ``seconds`` (the filter reports)."""
        with self._lock:
            busy = self.status.state is PrefetchState.RUNNING
            self._latency.add(seconds, busy, self.clock())

    # -- running ------------------------------------------------------------------
    def _background(self, delay: float, starter_nice: int | None) -> None:
        lower_priority(starter_nice, self.nice)
        self._in_background = threading.get_ident()
        if delay > 0 and self._wake.wait(delay) and self._stopping:
            self._set_state(PrefetchState.STOPPED)
            return
        try:
            self.run()
        except Exception as error:  # status.error has its text; a caller may raise it
            self.failure = error

    def run(self) -> PrefetchStatus:
        """Prefetch to the end (or to ``stop``); raises what made it fail."""
        status = self.status
        try:
            status.done = status.total - self.unallocated()
            self._set_state(PrefetchState.RUNNING)
            self._report()
            for _ in range(MAX_PASSES):
                self._pass()
                if self._stopping or self.unallocated() == 0:
                    break
            if self._stopping:
                self._set_state(PrefetchState.STOPPED)
                return status
            self.layer.persist_fills()
            status.checkpoints += 1
            remaining = self.unallocated()
            status.done = status.total - remaining
            if self.above is not None:
                pass  # the base stays needed
            elif remaining == 0 and self.layer.backing is not None:
                status.self_contained = self.layer.mark_self_contained()
            elif self.layer.backing is None:
                status.self_contained = True  # no base, or done before
            self._report()
            self._set_state(PrefetchState.FINISHED)
        except BaseException as error:
            status.error = str(error)
            self._set_state(PrefetchState.FAILED)
            raise
        return status

    def copy_range(self, offset: int, length: int) -> int:
        """Fill [offset, offset+length) from below (no pipeline, no throttling:
        a step the stress tester interleaves with guest requests)."""
        copied = 0
        for start, run in self._pieces(offset, offset + length):
            copied += self._store(start, run, self._fetch(start, run))
        return copied

    def complete(self) -> bool:
        """Whether the layer holds every byte (stops at the first hole, so
        asking of an image far from complete costs little)."""
        return next(self._holes(0, self.layer.virtual_size), None) is None

    def unallocated(self) -> int:
        """Bytes the layer does not hold yet."""
        return sum(end - start for start, end in self._holes(0, self.layer.virtual_size))

    def _pass(self) -> None:
        pieces = self._pieces(0, self.layer.virtual_size)
        if self.tuning.slots <= 1:
            for start, run in pieces:
                if not self._gate():
                    return
                self._store(start, run, self._fetch(start, run))
            return
        self._pipelined(pieces)

    def _pipelined(self, pieces: Iterator[tuple[int, int]]) -> None:
        """A reader thread fills up to ``slots`` buffers (the one being stored
        included, as FVD counts them) ahead of the store."""
        filled: queue.Queue[tuple[int, int, bytes] | BaseException | None] = queue.Queue()
        free = threading.Semaphore(self.tuning.slots)

        starter_nice = thread_nice()
        # The background thread is lowered already; its reader inherits that.
        lower_by = 0 if threading.get_ident() == self._in_background else self.nice

        def reader() -> None:
            lower_priority(starter_nice, lower_by)
            try:
                for start, run in pieces:
                    while not free.acquire(timeout=SLOT_POLL):
                        if self._halted:
                            return
                    if self._halted or not self._gate() or self._halted:
                        break  # (a pause may end because the store loop halted)
                    filled.put((start, run, self._fetch(start, run)))
                filled.put(None)
            except BaseException as error:
                filled.put(error)

        self._halted = False
        thread = threading.Thread(target=reader, name="corefmt-prefetch-read", daemon=True)
        thread.start()
        try:
            while True:
                item = filled.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self._stopping:
                    return
                self._store(*item)
                free.release()
        finally:
            self._halted = True  # the reader stops, a pause of its included
            self._wake.set()
            thread.join()
            self._halted = False
            if not self._stopping:
                self._wake.clear()

    # -- pieces ---------------------------------------------------------------------
    def _holes(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Ranges of [start, end) this layer does not hold, in windows."""
        window = self.step * SCAN_WINDOW_PIECES
        position = start
        while position < end:
            stop = min(position + window, end)
            for own in self.layer.own_status(position, stop - position):
                if not own.allocated:
                    yield from self._above_base(own.offset, own.offset + own.length)
            position = stop

    def _above_base(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of a hole that a layer above ``above`` decides (all of
        it without ``above``; past the backing's end: zeros it must store)."""
        below = self.layer.backing
        if self.above is None or below is None:
            yield start, end
            return
        inside = min(end, below.virtual_size)
        if start < inside:
            for run_start, run, allocated in below.is_allocated_above(self.above, start,
                                                                      inside - start):
                if allocated:
                    yield run_start, run_start + run
        if end > max(start, inside):
            yield max(start, inside), end

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Unit-aligned pieces of at most ``step`` bytes covering every hole."""
        size = self.layer.virtual_size
        covered = start
        for hole_start, hole_end in self._holes(start, end):
            piece = max(align_down(hole_start, self.unit), covered)
            stop = min(align_up(hole_end, self.unit), size)
            while piece < stop:
                run = min(self.step, stop - piece)
                yield piece, run
                piece += run
            covered = max(covered, stop)

    def _fetch(self, offset: int, length: int) -> bytes:
        """What the chain below holds there; a zero range is not read."""
        began = self.clock()
        below = self.layer.backing
        if below is None or self._all_zero_below(below, offset, length):
            data = _zeros(length)
        else:
            data = self.layer.read_below(offset, length)
        self._account(self._reads, length, began)
        return data

    @staticmethod
    def _all_zero_below(below: BlockNode, offset: int, length: int) -> bool:
        inside = min(offset + length, below.virtual_size) - offset
        if inside <= 0:
            return True
        return all(extent.zero or extent.node is None
                   for extent in below.block_status(offset, inside))

    def _store(self, offset: int, length: int, data: bytes) -> int:
        while True:
            if not self._wait_writable():
                return 0
            began = self.clock()
            try:
                written = self.layer.copy_up(offset, length, data)
            except ReadOnlyError:
                if self.layer.read_only:
                    continue  # reopened read-only meanwhile: wait, then store it
                raise
            break
        self._account(self._stores, length, began)
        status = self.status
        with self._lock:
            status.copied += written
            status.done = min(status.done + written, status.total)
        self._since_checkpoint += written
        if self._since_checkpoint >= self.checkpoint_bytes:
            self.layer.persist_fills()
            status.checkpoints += 1
            self._since_checkpoint = 0
        self._report()
        return written

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.status.done, self.status.total)

    def _wait_writable(self) -> bool:
        """A layer reopened read-only (a commit does) pauses prefetch until it
        is writable again; False once stopping."""
        while self.layer.read_only and not self._stopping:
            self._set_state(PrefetchState.PAUSED)
            self._wake.wait(READ_ONLY_POLL)
        if self.status.state is PrefetchState.PAUSED:
            self._set_state(PrefetchState.RUNNING)
        return not self._stopping

    # -- throttling -------------------------------------------------------------------
    def _account(self, meter: _Throughput, nbytes: int, began: float) -> None:
        if self.throttle and meter.add(nbytes, self.clock() - began):
            self._maybe_pause(meter.reset)

    def _gate(self) -> bool:
        """Before each read: pause if the foreground suffers; False once stopping."""
        if self._stopping:
            return False
        if self.throttle:
            self._foreground_check()
        return not self._stopping

    def _foreground_check(self) -> None:
        now = self.clock()
        latency = self._latency
        if now - latency.last_request > FOREGROUND_IDLE_AFTER:
            return  # no foreground workload to protect
        if latency.idle_at is None or now - latency.idle_at > BASELINE_MAX_AGE:
            with self._lock:
                latency.restart_idle(now)
            self._pause_for(PROBE_SECONDS, count=False)
            return
        slowdown = latency.slowdown()
        if slowdown is None:
            return
        if slowdown > self.tuning.max_foreground_slowdown:
            # Pause longer each time in a row, up to the throttle time: the
            # share of time prefetch runs settles where the foreground keeps up.
            pause = self._foreground_pause
            self._foreground_pause = min(pause * 2, max(self.tuning.throttle_ms / MS, pause))
            self._pause_for(pause * self.rng.uniform(0.5, 1.5))
        else:
            self._foreground_pause = max(self._foreground_pause / 2, FOREGROUND_PAUSE)
            with self._lock:
                latency.reset_busy()  # the next comparison starts afresh

    def _maybe_pause(self, otherwise: Callable[[], None]) -> None:
        """FVD's coin: pause, or forget the estimate and carry on."""
        if self.rng.random() < 0.5:
            self._pause_for((1 + self.rng.uniform(0, self.tuning.throttle_ms)) / MS)
        else:
            with self._lock:
                otherwise()

    def _pause_for(self, seconds: float, count: bool = True) -> None:
        with self._lock:
            if count:
                self.status.pauses += 1
        self._set_state(PrefetchState.PAUSED)
        self._wake.wait(seconds)
        if self._stopping or self._halted:
            return
        with self._lock:
            self._reads.reset()
            self._stores.reset()
            self._latency.reset_busy()
        self._set_state(PrefetchState.RUNNING)

    def _set_state(self, state: PrefetchState) -> None:
        with self._lock:
            self.status.state = state


def prefetch(node: BlockNode, *, throttle: bool = True, progress: ProgressFn | None = None,
             tuning: PrefetchTuning | None = None,
             checkpoint_bytes: int = CHECKPOINT_BYTES) -> PrefetchStatus:
    """Prefetch ``node``'s top layer to the end, in this thread."""
    return Prefetcher(node, tuning, throttle=throttle, progress=progress,
                      checkpoint_bytes=checkpoint_bytes).run()

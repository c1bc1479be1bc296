"""A cooperative scheduler: a batch of racing requests that replays exactly.

The worker threads of one batch run one at a time. A thread gives up its
turn when it issues a simulated storage request (it is held there until the
request completes), when it waits on a ``corefmt.sync`` lock or condition
(tracked requests, caches, driver locks) and when its request is done.

Time is virtual, a small discrete-event simulation: computing takes no
time, every storage request takes a seed-chosen latency, and every thread
starts at a seed-chosen moment. Threads whose lock or condition changed run
first (in seed-chosen order); only when none is left does the clock move to
the next event: a thread starting, or the held request due first completing
(it takes effect then). So requests issued together complete in any order,
and one thread's read-modify-write straddles another's write as it would on
a slow disk. Only one thread runs at any moment and every choice comes
from the seed: a seed replays exactly.

A thread that blocks on something the scheduler cannot see (a plain
``threading`` lock held across a storage request) would stop the batch;
the runner notices that no turn was handed over for ``STALL_SECONDS`` and
lets the batch finish unscheduled (``stall``), which it reports.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterable, Iterator

import attrs

from corefmt import sync
from corefmt.errors import CorefmtError

#: With no handover for this long, a thread waits on something unseen.
STALL_SECONDS = 2.0
#: How often an unscheduled (stalled) batch re-checks a lock it waits for.
UNSCHEDULED_POLL = 0.0002
#: A storage request takes 1..MAX_LATENCY ticks of virtual time.
MAX_LATENCY = 8
#: A thread of a batch starts 0..MAX_START ticks after the batch.
MAX_START = 2
#: How much slower the slow kinds of request are under a latency profile.
SLOWDOWN = 8
_WRITES = ("write", "zero", "discard", "truncate")
#: Kinds of request a batch slows down (the seed picks one profile per batch).
#: Slow writes make a read-modify-write span other threads' reads (listed
#: twice: the races it exposes are the commonest bugs); slow reads let
#: writes overtake them; slow flushes let later writes complete first.
LATENCY_PROFILES: tuple[tuple[str, ...], ...] = ((), _WRITES, _WRITES, ("read",), ("flush",))

READY, RUNNING, HELD, BLOCKED, DONE = "ready", "running", "held", "blocked", "done"


class ScheduleDeadlock(CorefmtError):
    """Every thread of a batch waits for another: the code under test deadlocks."""


@attrs.define(eq=False)
class _Task:
    tag: int
    turn: threading.Event = attrs.field(factory=threading.Event)
    state: str = READY
    resource: object = None
    woken: bool = False
    #: Virtual time at which it starts (ready) or its request completes (held).
    due: int = 0
    #: When it started waiting (handover count): first come, first served on ties.
    since: int = 0


class BatchScheduler:
    """Runs the threads of one batch at a time, in seed-chosen order.

    ``reorder=False`` makes every latency one tick and starts every thread
    at once: requests still overlap, but complete in the order issued.
    """

    def __init__(self, rng: random.Random, reorder: bool = True):
        self._rng = rng
        self._reorder = reorder
        self._lock = threading.Lock()
        self._local = threading.local()
        self._tasks: dict[int, _Task] = {}
        self._expected: frozenset[int] = frozenset()
        self._starts: dict[int, int] = {}
        self._slow: tuple[str, ...] = ()
        self._now = 0
        self._unscheduled = False
        self._deadlocked = False
        #: Turns handed over so far: the runner's measure of progress.
        self.handovers = 0

    # -- the runner's side --------------------------------------------------------------
    def begin(self, tags: Iterable[int]) -> None:
        """A new batch: its first turn is handed out once every tag has arrived."""
        with self._lock:
            self._tasks.clear()
            self._expected = frozenset(tags)
            self._starts = {tag: self._rng.randint(0, MAX_START) if self._reorder else 0
                            for tag in sorted(self._expected)}
            self._slow = self._rng.choice(LATENCY_PROFILES) if self._reorder else ()
            self._now = 0
            self._unscheduled = self._deadlocked = False

    def stall(self) -> bool:
        """Let the batch run on unscheduled (a thread waits on something unseen).

        Returns whether it was still scheduled."""
        with self._lock:
            if self._unscheduled:
                return False
            self._unscheduled = True
            for task in self._tasks.values():
                task.turn.set()
            return True

    @contextlib.contextmanager
    def task(self, tag: int) -> Iterator[None]:
        """Run the calling thread's request for ``tag`` as part of the batch."""
        task = _Task(tag, due=self._starts.get(tag, 0))
        with self._lock:
            if tag not in self._expected or tag in self._tasks:
                raise CorefmtError(f"scheduler: request {tag} is not expected")
            self._tasks[tag] = task
            scheduled = not self._unscheduled  # a stalled batch runs freely
            if self._tasks.keys() == self._expected:
                self._hand_over()
        self._local.task = task
        with sync.scheduled(self):
            if scheduled:
                self._wait_turn(task)
            try:
                yield
            finally:
                with self._lock:
                    task.state = DONE
                    self._hand_over()
                self._local.task = None

    # -- the storage's and sync's side ----------------------------------------------------
    def hold(self, kind: str) -> None:
        """A storage request: wait here until the scheduler lets it complete."""
        task: _Task | None = getattr(self._local, "task", None)
        if task is None:
            return  # not one of this batch's threads (setup, checks)
        with self._lock:
            if self._unscheduled:
                return
            latency = 1
            if self._reorder:
                latency = self._rng.randint(1, MAX_LATENCY)
                latency *= SLOWDOWN if kind in self._slow else 1
            task.state, task.due, task.since = HELD, self._now + latency, self.handovers
            self._hand_over()
        self._wait_turn(task)

    def block(self, resource: object) -> None:
        task: _Task | None = getattr(self._local, "task", None)
        with self._lock:
            unscheduled = self._unscheduled or task is None
            if not unscheduled:
                assert task is not None
                task.state, task.resource, task.woken = BLOCKED, resource, False
                task.since = self.handovers
                self._hand_over()
        if unscheduled:
            time.sleep(UNSCHEDULED_POLL)  # callers re-check; no wakeup can be lost
            return
        assert task is not None
        self._wait_turn(task)
        if self._deadlocked:
            raise ScheduleDeadlock(f"request {task.tag} waits for another forever")

    def notify(self, resource: object) -> None:
        with self._lock:
            for task in self._tasks.values():
                if task.state == BLOCKED and task.resource is resource:
                    task.woken = True

    # -- turns ----------------------------------------------------------------------------
    def _hand_over(self) -> None:
        """Give the turn to a runnable task (the caller holds ``_lock`` and stops running)."""
        if self._unscheduled:
            return
        tasks = sorted(self._tasks.values(), key=lambda t: t.tag)
        now = [task for task in tasks if task.state == BLOCKED and task.woken]
        if not now:
            timed = [task for task in tasks if task.state in (READY, HELD)]
            if not timed:
                if any(task.state == BLOCKED for task in tasks):
                    self._deadlocked = self._unscheduled = True
                    for task in tasks:
                        task.turn.set()
                return
            self._now = min(task.due for task in timed)
            now = [task for task in timed if task.due == self._now]
        if self._reorder:
            chosen = self._rng.choice(now)
        else:
            chosen = min(now, key=lambda t: (t.since, t.tag))
        chosen.state = RUNNING
        self.handovers += 1
        chosen.turn.set()

    @staticmethod
    def _wait_turn(task: _Task) -> None:
        task.turn.wait()
        task.turn.clear()

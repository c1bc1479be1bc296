"""What the format fuzz tests share: a per-case time limit that no driver
``except`` can swallow."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so no driver ``except`` hides it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

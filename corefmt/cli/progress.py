"""Progress of long operations, three ways, one model.

Every long operation reports ``(done, total)`` in bytes through a plain
callable (the API's ``progress=``). The CLI renders it:

- ``-p`` (or ``--progress=qemu``): exactly qemu-img's simple progress,
  ``"    (NN.NN/100%)\\r"`` on stdout each time it moved by more than a
  point (and at 0 and 100; 0 at once, before anything can fail), a line
  end when the operation ends, whether it succeeded or not. vdsm,
  CDI and Proxmox parse this line, so it is byte for byte qemu's.
- ``--progress=bar``: a progress bar on stderr with rate and time left,
  for people.
- ``--progress=json``: one JSON object per line on stderr, for programs:
  ``{"phase": ..., "done": ..., "total": ..., "percent": ..., "rate": ...}``
  (rate in bytes per second since the start), a line at most every
  JSON_INTERVAL seconds, and always the first and the last.

``-q`` silences all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

ProgressFn = Callable[[int, int], None]

QEMU, BAR, JSON = "qemu", "bar", "json"
STYLES = (QEMU, BAR, JSON)
#: qemu-img prints its progress when it moved by more than this many points.
QEMU_MIN_SKIP = 1.0
#: Seconds between two JSON progress lines (the first and last always print).
JSON_INTERVAL = 0.5


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``-p``, ``--progress=STYLE`` and ``-q`` on a verb's parser."""
    parser.add_argument("-p", dest="progress", action="store_const", const=QEMU,
                        help="print qemu-img's progress line on stdout")
    parser.add_argument("--progress", dest="progress", choices=STYLES,
                        help="progress as qemu-img prints it (qemu), a bar with rate and "
                             "time left on stderr (bar), or JSON lines on stderr (json)")
    parser.add_argument("-q", dest="quiet", action="store_true", help="quiet")


class QemuProgress:
    """qemu-img's simple progress (qemu-progress.c), in percent."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.last: float | None = None

    def percent(self, value: float) -> None:
        current = max(0.0, min(value, 100.0))
        last = self.last
        if (last is None or current > last + QEMU_MIN_SKIP or current < last - QEMU_MIN_SKIP
                or current in (0.0, 100.0)):
            self.last = current
            self.out.write(f"    ({current:3.2f}/100%)\r")
            self.out.flush()

    def __call__(self, done: int, total: int) -> None:
        self.percent(100.0 * done / total if total else 100.0)

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


class BarProgress:
    """A tqdm bar in bytes, with rate and time left, on stderr."""

    def __init__(self, phase: str, out: TextIO | None = None):
        self.phase = phase
        self.out = out or sys.stderr
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self.out, dynamic_ncols=True, desc=self.phase)
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()


class JsonProgress:
    """JSON lines for programs (see the module docstring)."""

    def __init__(self, phase: str, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.phase = phase
        self.out = out or sys.stderr
        self._clock = clock
        self._started = clock()
        self._last_line: float | None = None
        self._last: tuple[int, int] | None = None
        self._printed: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self._last = (done, total)
        now = self._clock()
        if (self._last_line is None or done >= total
                or now - self._last_line >= JSON_INTERVAL):
            self._line(done, total, now)

    def _line(self, done: int, total: int, now: float) -> None:
        self._last_line = now
        self._printed = (done, total)
        elapsed = now - self._started
        record = {"phase": self.phase, "done": done, "total": total,
                  "percent": round(100.0 * done / total, 2) if total else 100.0,
                  "rate": round(done / elapsed) if elapsed > 0 else 0}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def end(self) -> None:
        if self._last is not None and self._last != self._printed:
            self._line(*self._last, self._clock())


Reporter = QemuProgress | BarProgress | JsonProgress


def reporter(style: str | None, phase: str, *, quiet: bool = False) -> Reporter | None:
    """The renderer for a style (None: no progress)."""
    if quiet or not style:
        return None
    if style == QEMU:
        shown = QemuProgress()
        shown.percent(0.0)  # qemu-img prints 0 at once, even if the operation then fails
        return shown
    if style == BAR:
        return BarProgress(phase)
    return JsonProgress(phase)


@contextlib.contextmanager
def progress_for(args: argparse.Namespace, phase: str) -> Iterator[Reporter | None]:
    """The progress callable a verb passes to its operation (None without
    ``-p``/``--progress`` or with ``-q``), ended when the block ends."""
    shown = reporter(getattr(args, "progress", None), phase,
                     quiet=getattr(args, "quiet", False))
    try:
        yield shown
    finally:
        if shown is not None:
            shown.end()

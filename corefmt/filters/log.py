"""log: one line per request, appended to a file, for tracing what a guest
(or a conversion) asks of an image without changing what it gets.

A line is written when the request completes, so lines are in completion
order and carry the duration and the outcome::

    write offset=4096 length=512 flags=FUA duration=0.000120 ok
    read offset=0 length=512 flags=NONE duration=0.000031 error: a.raw: read failed: ...

``flags`` are RequestFlags names joined by ``|``; flush has offset and
length 0, truncate has the new size as its length. Each line is flushed to
the file at once, so a crash or another process sees every finished request.
The clock is an attribute of the filter (default: the module's ``CLOCK``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs

from corefmt import sync
from corefmt.errors import OptionError
from corefmt.filters.base import Filter, FilterContext, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.options import option

if TYPE_CHECKING:
    from corefmt.block.node import BlockNode

#: Where durations are measured from (tests replace it).
CLOCK: Callable[[], float] = time.perf_counter
#: Decimal places of the duration (seconds): microseconds.
DURATION_DIGITS = 6
OK = "ok"


def _required(_instance: object, _attribute: attrs.Attribute, value: str | None) -> None:
    if not value:
        raise OptionError("the log filter needs a 'path' option (the log file)")


@attrs.frozen
class LogOptions:
    path: str | None = option(None, "file the request lines are appended to",
                              validator=_required)


def flag_names(flags: RequestFlags) -> str:
    """``FUA|MAY_UNMAP``; ``NONE`` for no flags."""
    names = [flag.name for flag in RequestFlags if flag and flag in flags and flag.name]
    return "|".join(names) or "NONE"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class LogFilter(Filter):
    def __init__(self, child: BlockNode, options: LogOptions, context: FilterContext):
        super().__init__(child, options, context)
        self.clock = CLOCK
        self._lock = sync.Lock()
        try:
            self._file = open(options.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        except OSError as error:
            raise OptionError(f"Could not open log file '{options.path}': "
                              f"{error.strerror}") from None

    @contextmanager
    def _logged(self, operation: str, offset: int, length: int,
                flags: RequestFlags = RequestFlags.NONE) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        except Exception as error:
            self._line(operation, offset, length, flags, start, f"error: {_one_line(str(error))}")
            raise
        self._line(operation, offset, length, flags, start, OK)

    def _line(self, operation: str, offset: int, length: int, flags: RequestFlags,
              start: float, outcome: str) -> None:
        duration = self.clock() - start
        line = (f"{operation} offset={offset} length={length} flags={flag_names(flags)} "
                f"duration={duration:.{DURATION_DIGITS}f} {outcome}\n")
        with self._lock:
            if not self._file.closed:
                self._file.write(line)
                self._file.flush()

    def readinto(self, offset: int, buf: memoryview, flags: RequestFlags) -> None:
        with self._logged("read", offset, len(buf), flags):
            self.child.readinto(offset, buf, flags)

    def write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        with self._logged("write", offset, len(data), flags):
            self.child.write(offset, data, flags)

    def write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        with self._logged("write_zeroes", offset, length, flags):
            self.child.write_zeroes(offset, length, flags=flags)

    def discard(self, offset: int, length: int) -> None:
        with self._logged("discard", offset, length):
            self.child.discard(offset, length)

    def flush(self) -> None:
        with self._logged("flush", 0, 0):
            self.child.flush()

    def truncate(self, size: int) -> None:
        with self._logged("truncate", 0, size):
            self.child.truncate(size)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def info(self) -> dict[str, Any]:
        return {"path": self.options.path}


class LogDriver(FilterDriver):
    name = "log"
    open_options = LogOptions
    child_key = "file"
    filter_class = LogFilter

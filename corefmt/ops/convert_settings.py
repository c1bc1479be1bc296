"""convert's settings that the CLI needs to build its parser, apart from
the convert itself so that every command does not import it to start."""

from __future__ import annotations

import os

#: Requests in flight: one per core (measured on 2 cores: 4 workers were 10-15%
#: slower than 2 from page cache, the extra threads contending on the file).
MIN_WORKERS, MAX_WORKERS = 2, 8
DEFAULT_WORKERS = max(MIN_WORKERS, min(MAX_WORKERS, os.cpu_count() or MIN_WORKERS))
#: qemu-img's cache modes for the target: (O_DIRECT, flush at all).
#: qemu-img convert defaults to "unsafe"; corefmt defaults to "writeback", so
#: a finished convert is on disk unless the caller says it need not be.
CACHE_MODES: dict[str, tuple[bool, bool]] = {
    "writeback": (False, True),
    "writethrough": (False, True),
    "none": (True, True),
    "directsync": (True, True),
    "unsafe": (False, False),
}
DEFAULT_CACHE_MODE = "writeback"
#: qemu-img's two-line refusal of a bad -r (the CLI prints both lines).
RATE_LIMIT_INVALID = ("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes "
                      "for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and "
                      "exabytes.")

"""How an image wants its fills run: copy-on-read and prefetch settings.

A fill copies data the chain below holds into the top layer. The copy-on-
read filter and the prefetcher run fills for any format; a format that
stores preferences for them (FVD keeps them in its header, spec section
7) returns a ``FillPolicy`` from the optional ``Image.fill_policy()``.
Everything else gets the defaults here, which are FVD's stored defaults.
"""

from __future__ import annotations

import attrs

COPY_ON_READ_SYNC = "sync"
COPY_ON_READ_ASYNC = "async"

#: FVD's stored defaults (spec section 2.4), used for every format.
DEFAULT_MAX_OUTSTANDING = 2_000_000
DEFAULT_SLOTS = 2
DEFAULT_BYTES_PER_PREFETCH = 1024 * 1024
DEFAULT_MEASURE_MS = 100
#: Weight of the old average in the throughput estimates, in percent.
DEFAULT_ALPHA_PERCENT = 80
#: KB/s (1 KB = 1024 bytes, as the original reads its thresholds).
DEFAULT_MIN_THROUGHPUT_KBS = 5120
DEFAULT_THROTTLE_MS = 30_000
#: corefmt's foreground trigger: prefetch backs off when the image's own
#: requests take this many times longer than while prefetch is paused
#: (1.25: foreground throughput stays at 0.8 or better).
DEFAULT_MAX_FOREGROUND_SLOWDOWN = 1.25


@attrs.frozen
class PrefetchTuning:
    """Adaptive prefetch parameters (FVD spec section 7.2)."""

    #: Reads from below that may be buffered ahead of the stores.
    slots: int = DEFAULT_SLOTS
    bytes_per_prefetch: int = DEFAULT_BYTES_PER_PREFETCH
    read_measure_ms: int = DEFAULT_MEASURE_MS
    write_measure_ms: int = DEFAULT_MEASURE_MS
    alpha_percent: int = DEFAULT_ALPHA_PERCENT
    min_read_kbs: int = DEFAULT_MIN_THROUGHPUT_KBS
    min_write_kbs: int = DEFAULT_MIN_THROUGHPUT_KBS
    #: A pause lasts 1 + U[0, throttle_ms] ms; 0 never pauses.
    throttle_ms: int = DEFAULT_THROTTLE_MS
    max_foreground_slowdown: float = DEFAULT_MAX_FOREGROUND_SLOWDOWN


@attrs.frozen
class FillPolicy:
    """What an image asks of copy-on-read and prefetch."""

    #: ``async`` (FVD): reads return at once and fills run behind them, dropped
    #: when ``max_outstanding`` bytes are in flight; ``sync`` (QEMU): reads wait.
    copy_on_read_mode: str = COPY_ON_READ_SYNC
    max_outstanding: int = DEFAULT_MAX_OUTSTANDING
    prefetch: PrefetchTuning = attrs.field(factory=PrefetchTuning)
    #: Seconds after opening that background prefetch starts (None: only when
    #: asked for; the prefetch filter's ``start-delay`` overrides it).
    prefetch_start_delay: float | None = None


def fill_policy(node: object) -> FillPolicy:
    """The policy of the image a node shows (the defaults for formats without one)."""
    layer = getattr(node, "layer", None)
    image = getattr(layer() if callable(layer) else node, "image", None)
    method = getattr(image, "fill_policy", None)
    if callable(method):
        policy = method()
        if isinstance(policy, FillPolicy):
            return policy
    return FillPolicy()

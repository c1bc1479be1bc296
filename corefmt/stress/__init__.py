"""Stress, race and crash testing of any format driver or chain.

``workload`` generates seeded batches of concurrent requests, ``model``
says which contents every sector may hold (now, and after a power cut),
``runner`` drives a seed against images on the simulated storage and
``report`` sums seeds up. The ``corefmt stress`` verb is the front end.
The names below load on first use, so the CLI starts without the testers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StressSummary": "corefmt.stress.report",
    "SeedResult": "corefmt.stress.runner",
    "StressConfig": "corefmt.stress.runner",
    "run_seed": "corefmt.stress.runner",
    "run_seeds": "corefmt.stress.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corefmt.stress' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)

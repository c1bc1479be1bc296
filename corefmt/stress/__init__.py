"""Stress, race and crash testing of any format driver or chain.

``workload`` generates seeded batches of concurrent requests, ``model``
says which contents every sector may hold (now, and after a power cut),
``runner`` drives a seed against images on the simulated storage and
``report`` sums seeds up. The ``corefmt stress`` verb is the front end.
"""

from corefmt.stress.report import StressSummary
from corefmt.stress.runner import SeedResult, StressConfig, run_seed, run_seeds

__all__ = ["SeedResult", "StressConfig", "StressSummary", "run_seed", "run_seeds"]

"""Defaults of the stress and fuzz runs, apart so the CLI can show them
without importing the testers (which costs every corefmt command start-up)."""

from __future__ import annotations

MiB = 1024 * 1024
SECTOR_SIZE = 512

#: stress: image size, requests per seed, seeds per run.
DEFAULT_SIZE = MiB
DEFAULT_OPERATIONS = 40
DEFAULT_SEEDS = 100

#: fuzz: cases per run, seconds per case, traced memory per case.
DEFAULT_EXAMPLES = 200
DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY_LIMIT = 256 * MiB

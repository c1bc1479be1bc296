"""Entry point (group ``corefmt``) of the test-only blockmap format."""

from __future__ import annotations

from corefmt import hookimpl
from corefmt_blockmap.driver import BlockMapDriver


@hookimpl
def corefmt_register(registry) -> None:
    registry.add_format(BlockMapDriver())

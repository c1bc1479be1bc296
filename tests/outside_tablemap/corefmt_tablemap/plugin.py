"""Entry point (group ``corefmt``) of the test-only tablemap format."""

from __future__ import annotations

from corefmt import hookimpl
from corefmt_tablemap.driver import TableMapDriver


@hookimpl
def corefmt_register(registry) -> None:
    registry.add_format(TableMapDriver())

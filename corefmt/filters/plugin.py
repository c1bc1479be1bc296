"""Entry point (group ``corefmt``) of the built-in filters."""

from __future__ import annotations

from corefmt.filters.copy_on_read import CopyOnReadDriver
from corefmt.hookspecs import hookimpl


@hookimpl
def corefmt_register(registry) -> None:
    registry.add_filter(CopyOnReadDriver())

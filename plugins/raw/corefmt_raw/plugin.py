"""Entry point of the raw plugin (group ``corefmt``)."""

from __future__ import annotations

from corefmt import hookimpl
from corefmt.registry import Registry
from corefmt_raw.driver import RawDriver


@hookimpl
def corefmt_register(registry: Registry) -> None:
    registry.add_format(RawDriver())

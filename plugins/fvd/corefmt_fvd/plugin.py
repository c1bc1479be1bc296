"""Entry point of the FVD plugin (group ``corefmt``)."""

from __future__ import annotations

from corefmt import hookimpl
from corefmt.registry import Registry
from corefmt_fvd.driver import FvdDriver


@hookimpl
def corefmt_register(registry: Registry) -> None:
    registry.add_format(FvdDriver())

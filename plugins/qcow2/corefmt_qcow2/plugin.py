"""Entry point of the qcow2 plugin (group ``corefmt``)."""

from __future__ import annotations

from corefmt import hookimpl
from corefmt.registry import Registry
from corefmt_qcow2.driver import Qcow2Driver


@hookimpl
def corefmt_register(registry: Registry) -> None:
    registry.add_format(Qcow2Driver())

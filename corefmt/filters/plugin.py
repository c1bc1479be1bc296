"""Entry point (group ``corefmt``) of the built-in filters."""

from __future__ import annotations

from corefmt.filters.blkdebug import BlkdebugDriver
from corefmt.filters.blkverify import BlkverifyDriver
from corefmt.filters.copy_on_read import CopyOnReadDriver
from corefmt.filters.log import LogDriver
from corefmt.filters.prefetch import PrefetchDriver
from corefmt.filters.throttle import ThrottleDriver
from corefmt.hookspecs import hookimpl


@hookimpl
def corefmt_register(registry) -> None:
    for driver in (CopyOnReadDriver(), PrefetchDriver(), ThrottleDriver(), LogDriver(),
                   BlkverifyDriver(), BlkdebugDriver()):
        registry.add_filter(driver)

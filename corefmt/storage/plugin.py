"""Registers the core's storage drivers through the ordinary plugin hook."""

from __future__ import annotations

from corefmt.hookspecs import hookimpl
from corefmt.registry import Registry
from corefmt.storage.file import FileStorageDriver
from corefmt.storage.http import SCHEMES, HttpStorageDriver
from corefmt.storage.memory import MemoryStorageDriver
from corefmt.storage.s3 import S3StorageDriver
from corefmt.storage.simulated import SimStorageDriver


@hookimpl
def corefmt_register(registry: Registry) -> None:
    registry.add_storage(FileStorageDriver())
    registry.add_storage(MemoryStorageDriver())
    registry.add_storage(SimStorageDriver())
    for scheme in SCHEMES:
        registry.add_storage(HttpStorageDriver(scheme))
    registry.add_storage(S3StorageDriver())

"""Storage (protocol) drivers: where an image's bytes live."""

from corefmt.storage.base import Storage, StorageDriver

__all__ = ["Storage", "StorageDriver"]

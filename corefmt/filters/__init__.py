"""Filters: nodes (or storage wrappers) that see requests without changing
the data below them. The built-ins register through the same hook as any
plugin's (``corefmt.filters.plugin``)."""

from corefmt.filters.base import (
    Filter,
    FilterContext,
    FilterDriver,
    StorageFilterDriver,
)

__all__ = ["Filter", "FilterContext", "FilterDriver", "StorageFilterDriver"]

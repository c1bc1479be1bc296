"""Fixtures of the stress tests: the broken format variants, registered as a plugin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corefmt import plugins
from tests.stress import broken_formats


@pytest.fixture
def broken() -> Iterator[None]:
    plugins.register_plugin(broken_formats)
    yield
    plugins.unregister_plugin(broken_formats)

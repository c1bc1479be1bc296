"""Fixtures for the qcow2 tests: they run the real qemu-img / qemu-io."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(autouse=True)
def _skip_interop_without_qemu(request: pytest.FixtureRequest) -> None:
    """Interop tests need qemu-img and qemu-io; CI installs them (qemu-utils)."""
    if request.node.get_closest_marker("interop") and not (
            shutil.which("qemu-img") and shutil.which("qemu-io")):
        pytest.skip("qemu-img/qemu-io not installed (Debian: apt-get install qemu-utils)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test module's ``known_bug(item_name) -> reason | None`` marks the
    tests a known driver bug fails as strict xfails (they go red, XPASS,
    once the bug is fixed: then the entry goes)."""
    for item in items:
        known_bug = getattr(getattr(item, "module", None), "known_bug", None)
        reason = known_bug(item.name) if known_bug is not None else None
        if reason:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))

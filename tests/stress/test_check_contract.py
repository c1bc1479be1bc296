"""The stress runner calls a driver's check through the core's adapter: a
driver written to today's contract, ``check(fix: CheckFix)``, gets a
CheckFix, never the bool older drivers took."""

from __future__ import annotations

from corefmt_raw.driver import RawDriver, RawImage

from corefmt import hookimpl, plugins
from corefmt.capabilities import CheckFix, CheckResult
from corefmt.stress import StressConfig, run_seeds

CALLS: list[object] = []


class _StrictImage(RawImage):
    def check(self, fix: CheckFix) -> CheckResult:
        CALLS.append(fix)
        if not isinstance(fix, CheckFix):
            return CheckResult(check_errors=1, messages=[f"check got {fix!r}"])
        return CheckResult()


class _StrictDriver(RawDriver):
    name = "raw-strictcheck"

    def probe(self, head, path):
        return 0

    def open(self, storage, context):
        return _StrictImage(storage, context)


class _Plugin:
    @hookimpl
    def corefmt_register(self, registry):
        registry.add_format(_StrictDriver())


def test_the_runner_checks_with_a_checkfix():
    plugin = _Plugin()
    plugins.register_plugin(plugin)
    CALLS.clear()
    try:
        summary = run_seeds(StressConfig(format="raw-strictcheck", crash=True), range(3))
    finally:
        plugins.unregister_plugin(plugin)
    assert CALLS and all(isinstance(fix, CheckFix) for fix in CALLS)
    assert summary.ok, summary.line()

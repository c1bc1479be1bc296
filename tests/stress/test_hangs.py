"""A deadlock fails its test instead of hanging the whole run.

Inside a stress batch the scheduler reports a deadlock (ScheduleDeadlock)
or lets a stalled batch run on; a hang anywhere else (a plain lock, a
thread that never finishes) is cut by pytest-timeout, which every run has.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: A hanging test must be cut within this (its timeout is 1 s; start-up is the rest).
CUT_WITHIN_SECONDS = 60


def test_every_test_has_a_timeout(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert float(pytestconfig.getini("timeout")) > 0
    assert pytestconfig.getini("timeout_method") == "thread"


def test_a_deadlocked_test_fails_with_a_timeout(tmp_path):
    (tmp_path / "test_deadlock.py").write_text(textwrap.dedent("""
        import threading

        def test_waits_forever():
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
    """))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=1",
         "--timeout-method=thread", "test_deadlock.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=CUT_WITHIN_SECONDS)
    assert done.returncode != 0
    assert "Timeout" in done.stdout + done.stderr

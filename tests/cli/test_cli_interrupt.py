"""Ctrl-C while the CLI is still importing ends with one line, no traceback."""

from __future__ import annotations

import subprocess
import sys

#: Sends SIGINT to itself when the CLI module starts importing: the moment a
#: user's Ctrl-C lands in the first tens of milliseconds. Python's own
#: SIGINT handler first, as an interactive shell gives it: run as a shell's
#: background job (``cmd &``), the tests would inherit SIGINT ignored.
INTERRUPT_DURING_IMPORT = """
import builtins, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "corefmt.cli.main":
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
{entry}
"""


def _run(entry: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INTERRUPT_DURING_IMPORT.format(entry=entry),
                           "formats"], capture_output=True, text=True, timeout=60)


def test_ctrl_c_during_start_up_is_one_line():
    result = _run("import corefmt_launcher; sys.exit(corefmt_launcher.main())")
    assert result.returncode == 130
    assert result.stderr == "corefmt: interrupted\n"
    assert result.stdout == ""


def test_the_window_is_real_without_the_launcher():
    # Importing the CLI directly (the old entry point) shows the traceback
    # the launcher exists to prevent.
    result = _run("from corefmt.cli.main import main; sys.exit(main())")
    assert "KeyboardInterrupt" in result.stderr and "Traceback" in result.stderr


def test_the_installed_command_uses_the_launcher():
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "corefmt"]
    assert script.value == "corefmt_launcher:main"

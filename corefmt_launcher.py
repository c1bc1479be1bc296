"""The ``corefmt`` command's entry point, outside the corefmt package.

Importing corefmt takes tens of milliseconds; a Ctrl-C in that window
would print a KeyboardInterrupt traceback, because the CLI's own handler
is not running yet. This module imports nothing heavy: it turns SIGINT
into a one-line exit first, then imports the CLI, whose main() restores
Python's KeyboardInterrupt so requests in flight unwind normally.
"""

from __future__ import annotations

import os
import signal
import sys

#: Exit status of a command ended by SIGINT (128 + 2), as shells report it.
EXIT_INTERRUPTED = 130


def _interrupted_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"corefmt: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from corefmt.cli.main import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())

"""``corefmt --version`` and ``corefmt --help``.

``--version`` (and ``-V``, as qemu-img) prints one line, ``corefmt version
X``, and exits 0: scripts detect the tool and its version from it.
``--help`` ends, like ``qemu-img --help``, with a "Command syntax:" section:
every verb's usage line with all its options, built when asked for (verbs
added after this call are included, and start-up pays nothing for it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from corefmt import __version__

PROGRAM = "corefmt"
VERSION_LINE = f"{PROGRAM} version {__version__}"
USAGE_PREFIX = "usage: "


class _FullHelp(argparse.Action):
    """The parser's help, then each verb's usage."""

    def __init__(self, option_strings: list[str], dest: str, verbs: Any = None,
                 **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.verbs = verbs

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stdout.write(parser.format_help() + "\n" + command_syntax(self.verbs))
        parser.exit()

    def format_usage(self) -> str:
        return self.option_strings[0]


def command_syntax(verbs: Any) -> str:
    """'Command syntax:' and one usage line per verb (unwrapped, as qemu-img's)."""
    lines = ["Command syntax:"]
    for verb_parser in verbs.choices.values():
        usage = verb_parser.format_usage().strip().removeprefix(USAGE_PREFIX)
        lines.append("  " + " ".join(usage.split()))
    return "\n".join(lines) + "\n"


def add_version_and_help(parser: argparse.ArgumentParser, verbs: Any) -> None:
    """-h/--help that also shows every verb's usage (the parser is made with
    add_help=False), and -V/--version."""
    parser.add_argument("-h", "--help", action=_FullHelp, verbs=verbs,
                        help="show this help, with every verb's usage, and exit")
    parser.add_argument("-V", "--version", action="version", version=VERSION_LINE,
                        help="print 'corefmt version X' and exit")

"""``corefmt --version`` (one line scripts parse, exit 0) and ``corefmt
--help`` (every verb's usage line, with all its options)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from cli_inprocess import run_corefmt

import corefmt
from corefmt.cli.main import build_parser

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
VERSION_LINE = re.compile(r"^corefmt version (\d+\.\d+\.\d+\S*)\n$")


def test_version_is_one_line_and_exit_0(corefmt):  # a real run: what scripts see
    result = corefmt("--version")
    assert result.returncode == 0 and result.stderr == ""
    match = VERSION_LINE.match(result.stdout)
    assert match and match.group(1) == corefmt_version()


def corefmt_version() -> str:
    return corefmt.__version__


def test_one_version_everywhere(tmp_path):
    result = run_corefmt(tmp_path, "-V")
    assert result.returncode == 0 and result.stdout == f"corefmt version {corefmt.__version__}\n"
    project = tomllib.loads(PYPROJECT.read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "corefmt.__version__"
    assert metadata.version("corefmt") == corefmt.__version__  # the installed metadata


def _verb_parsers():
    parser = build_parser()
    verbs = next(action for action in parser._actions if action.dest == "verb")
    return verbs.choices


def test_help_shows_every_verb_with_every_option(tmp_path):
    result = run_corefmt(tmp_path, "--help")
    assert result.returncode == 0 and result.stderr == ""
    syntax = result.stdout.split("Command syntax:\n", 1)[1].splitlines()
    lines = {line.split()[1]: line for line in syntax}
    verbs = _verb_parsers()
    assert list(lines) == list(verbs)
    for name, verb in verbs.items():
        assert lines[name].startswith(f"  corefmt {name} ")
        if any(action.nargs == argparse.REMAINDER for action in verb._actions):
            continue  # a verb that parses its own words (bench) names them itself
        for action in verb._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert any(re.search(rf"\[{re.escape(option)}[\] =]", lines[name])
                           for option in action.option_strings), (name, action.option_strings)
    assert "--shrink" in lines["resize"] and "if=INPUT" in lines["dd"]
    assert "-p" in lines["compare"] and "-U" in lines["compare"]


def test_short_help_is_the_same(tmp_path):
    assert run_corefmt(tmp_path, "-h").stdout == run_corefmt(tmp_path, "--help").stdout


def test_a_verb_imports_no_other_verbs_module(tmp_path):
    """Each command pays only for its own verb: importing every verb's
    module (the NBD server, bench, snapshot...) cost every command ~50 ms."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    probe = ("import sys\nfrom corefmt.cli.main import main\n"
             f"main(['info', {str(image)!r}])\n"
             "print(sorted(m for m in sys.modules if m.startswith('corefmt.cli.')))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    loaded = result.stdout.splitlines()[-1]
    assert "corefmt.cli.nbd" not in loaded and "corefmt.cli.bench" not in loaded
    assert "corefmt.nbd" not in result.stdout


def test_import_and_info_load_neither_convert_nor_compare(tmp_path):
    """``import corefmt`` and a command that neither converts nor compares
    do not import convert's and compare's modules (8 ms of ``import corefmt``);
    ``corefmt.convert`` and the rest still work, imported on first use."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    probe = ("import sys\nimport corefmt\nfrom corefmt.cli.main import main\n"
             f"main(['info', {str(image)!r}])\n"
             "print(sorted(m for m in sys.modules if m.startswith('corefmt.ops.')))\n"
             "print(corefmt.convert.__module__, corefmt.compare_nodes.__module__)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    loaded, used = result.stdout.splitlines()[-2:]
    assert "corefmt.ops.convert'" not in loaded and "corefmt.ops.compare'" not in loaded
    assert used == "corefmt.ops.convert corefmt.ops.compare"

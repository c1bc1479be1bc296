"""The same json: and --image-opts strings open the same graph in corefmt and
qemu: same size, same bytes, same qemu-io output (timing lines aside), same
refusals for keys neither knows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from corefmt_cli_helpers import QEMU_IMG, QEMU_IO, commands, io_stderr, io_stdout, runner

pytestmark = pytest.mark.interop

#: Lines qemu-io prints for a probed raw (both tools print them; corefmt's
#: probing work may still differ in wording), left out of the comparison.
PROBE_WARNING_PREFIXES = ("WARNING:", "         ")


def _image(directory: Path) -> Path:
    qemu_io = runner([QEMU_IO or "qemu-io"], directory)
    assert runner([QEMU_IMG or "qemu-img"], directory)(
        "create", "-f", "raw", "disk.raw", "1M").returncode == 0
    made = qemu_io("-f", "raw", *commands("write -P 0x11 0 64k", "write -P 0x22 4k 4k",
                                          "write -P 0x33 512k 4k"), "disk.raw")
    assert made.returncode == 0, made.stderr
    return directory / "disk.raw"


def _spec(value: dict) -> str:
    return "json:" + json.dumps(value)


FILE = {"driver": "file", "filename": "disk.raw"}
#: (arguments naming the image, qemu-io commands); from qemu-img's manual
#: (json: and --image-opts forms) and QEMU's block drivers' options.
CASES = [
    ([_spec({"driver": "raw", "file": FILE})], ["length", "read -v 4064 64"]),
    ([_spec({"driver": "raw", "file.driver": "file", "file.filename": "disk.raw"})],
     ["length", "read -P 0x22 4k 4k"]),
    (["--image-opts", "driver=raw,file.driver=file,file.filename=disk.raw"],
     ["length", "read -P 0x11 0 4k"]),
    (["--image-opts", "driver=raw,file.filename=disk.raw,offset=4096,size=65536"],
     ["length", "read -P 0x22 0 4k", "read -P 0x11 4k 4k", "write -P 0x44 8k 512"]),
    ([_spec({"driver": "raw", "offset": 512 * 1024, "size": 8192, "file": FILE})],
     ["length", "read -P 0x33 0 4k", "read -P 0 4k 4k"]),
    ([_spec({"file": {"filename": "disk.raw"}})], ["length", "read -P 0x11 0 4k"]),
    ([_spec({"driver": "copy-on-read", "file": {"driver": "raw", "file": FILE}})],
     ["length", "read -P 0x22 4k 4k"]),
    ([_spec({"driver": "raw", "file": {"driver": "blkdebug", "image": FILE,
                                       "inject-error": [{"event": "read_aio", "errno": 5,
                                                         "once": True}]}})],
     ["read 0 4k", "read -P 0x11 0 4k"]),
    (["--image-opts", "driver=raw,file.driver=blkdebug,file.image.driver=file,"
      "file.image.filename=disk.raw,file.inject-error.0.event=read_aio,"
      "file.inject-error.0.errno=5,file.inject-error.0.once=on"], ["read 0 4k", "read 0 4k"]),
    (["--image-opts", "driver=raw,file.filename=disk.raw,bogus=1"], ["length"]),
    ([_spec({"driver": "raw", "file": {"driver": "file", "filename": "disk.raw", "x": 1}})],
     ["length"]),
]


def _outcome(result, image: Path) -> tuple:
    stderr = "\n".join(line for line in io_stderr(result.stderr).splitlines()
                       if not line.startswith(PROBE_WARNING_PREFIXES))
    return (result.returncode != 0, io_stdout(result.stdout), _error_kind(stderr),
            image.read_bytes())


def _error_kind(stderr: str) -> str:
    """The reason of a refusal (qemu prefixes "Could not open 'SPEC': ")."""
    return stderr.rsplit(": ", 1)[-1].strip() if stderr else ""


@pytest.mark.parametrize(("image_args", "io_commands"), CASES,
                         ids=[" ".join(case[0])[:60] for case in CASES])
def test_the_same_graph_in_both_tools(tmp_path, image_args, io_commands):
    theirs_dir, ours_dir = tmp_path / "qemu", tmp_path / "corefmt"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    theirs, ours = _image(theirs_dir), _image(ours_dir)
    qemu = runner([QEMU_IO or "qemu-io"], theirs_dir)(*commands(*io_commands), *image_args)
    mine = runner([sys.executable, "-m", "corefmt.cli.main", "io"], ours_dir)(
        *commands(*io_commands), *image_args)
    assert _outcome(mine, ours) == _outcome(qemu, theirs), (qemu.stderr, mine.stderr)

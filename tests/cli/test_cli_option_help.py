"""`-o help` prints qemu-img's lists: the format's options without a
filename, every option (the file's too) with one."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "-o", "help"],
    ["create", "-f", "raw", "-o", "help", "new.raw"],
    ["create", "-f", "raw", "-o", "?"],
    ["convert", "-O", "raw", "-o", "help"],
])
def test_option_help_matches_qemu_img(corefmt, qemu_img, tmp_path, args):
    ours, theirs = corefmt(*args), qemu_img(*args)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert not (tmp_path / "new.raw").exists()


def test_option_help_of_an_unknown_format_is_refused(corefmt):
    result = corefmt("create", "-f", "nosuch", "-o", "help")
    assert result.returncode == 1 and "Unknown file format 'nosuch'" in result.stderr

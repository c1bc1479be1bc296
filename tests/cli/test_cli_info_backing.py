"""``info`` reads the image alone, as qemu-img info does (it opens with
BDRV_O_NO_BACKING): an image whose backing file is missing or elsewhere is
still described, which is how scripts find out what it is backed by. Only
``--backing-chain`` opens the chain."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.interop


@pytest.fixture
def orphan(tmp_path, qemu_img):
    """d/top.qcow2 backed by d/base.raw (a relative name), base removed."""
    (tmp_path / "d").mkdir()
    assert qemu_img("create", "-q", "-f", "raw", "d/base.raw", "1M").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    "d/top.qcow2", "1M").returncode == 0
    return tmp_path / "d"


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("base", ["present", "missing"])
def test_info_describes_the_image_without_opening_its_backing(orphan, corefmt, qemu_img,
                                                               output, base):
    if base == "missing":
        (orphan / "base.raw").unlink()
    args = ("info", f"--output={output}", "d/top.qcow2")
    ours, theirs = corefmt(*args), qemu_img(*args)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    if output == "json":
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)
        assert json.loads(ours.stdout)["full-backing-filename"] == "d/base.raw"
    else:
        assert ours.stdout == theirs.stdout


def test_backing_chain_still_needs_the_backing(orphan, corefmt, qemu_img):
    (orphan / "base.raw").unlink()
    ours = corefmt("info", "--backing-chain", "d/top.qcow2")
    theirs = qemu_img("info", "--backing-chain", "d/top.qcow2")
    assert ours.returncode == theirs.returncode == 1
    assert "Could not open" in ours.stderr and "base.raw" in ours.stderr

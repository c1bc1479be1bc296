"""corefmt prefetch on a qcow2 overlay: every byte copied in, qemu-img
finds the image clean and equal to its base, and the qcow2 still names its
backing file (qcow2 records no completion); a qcow2 over an FVD base is
prefetched through the chain the same way."""

from __future__ import annotations

import json
import subprocess

import pytest

import corefmt
from tests.fvd.helpers import cli, random_base

MiB = 1024 * 1024
pytestmark = pytest.mark.interop


def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("cluster", ["64k", "4k"])
def test_a_prefetched_qcow2_overlay_is_clean_and_complete(tmp_path, cluster):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    random_base(base, 6 * MiB, seed=3)
    made = _qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", str(base),
                     "-F", "raw", str(top), "8M")
    assert made.returncode == 0, made.stderr
    status, out, err = cli("prefetch", top)
    assert status == 0, err
    assert "still names its backing file" in out
    checked = _qemu_img("check", "-f", "qcow2", str(top))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compared = _qemu_img("compare", "-f", "qcow2", "-F", "raw", str(top), str(base))
    assert compared.returncode == 0, compared.stdout  # 8 MiB vs 6: the tail reads zeros
    mapped = json.loads(_qemu_img("map", "--output=json", "-f", "qcow2", str(top)).stdout)
    assert all(entry["depth"] == 0 for entry in mapped), mapped  # nothing left below
    info = json.loads(_qemu_img("info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == str(base)


def test_a_qcow2_overlay_over_an_fvd_base_is_prefetched_through_the_chain(tmp_path):
    raw, middle, top = tmp_path / "base.raw", tmp_path / "mid.fvd", tmp_path / "top.qcow2"
    data = random_base(raw, 4 * MiB, seed=4)
    corefmt.create(str(middle), "fvd", 4 * MiB, backing=str(raw), backing_format="raw")
    with corefmt.open(str(middle)) as node:
        node.write(MiB, b"\x5a" * 65536)
    corefmt.create(str(top), "qcow2", 4 * MiB, backing=str(middle), backing_format="fvd")
    status, _, err = cli("prefetch", top)
    assert status == 0, err
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(top)},
            "backing": None}  # qemu has no FVD driver: check the top alone
    checked = _qemu_img("check", f"json:{json.dumps(spec)}")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    expected = bytearray(data)
    expected[MiB:MiB + 65536] = b"\x5a" * 65536
    with corefmt.open(str(top), backing=False) as node:  # the top answers every read itself
        assert node.read(0, 4 * MiB) == bytes(expected)

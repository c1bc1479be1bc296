"""What scripts see of corefmt create, next to qemu-img create: the
"Formatting ..." line field for field (qemu's option order, defaults,
value forms), sizes rounded up to 512 as qemu does, and a fresh raw file
with its first 4 KiB allocated (qemu's allocate_first_block). corefmt runs
in-process; qemu-img as a subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_inprocess import run_corefmt

pytestmark = pytest.mark.interop

#: create arguments; NAME is replaced by each tool's own file name.
CASES = [
    ["-f", "raw", "NAME", "1000001"],
    ["-f", "qcow2", "NAME", "1000001"],
    ["-f", "raw", "NAME", "0x10"],
    ["-f", "raw", "NAME", "1.5k"],
    ["-f", "raw", "NAME", "0"],
    ["-f", "raw", "-o", "preallocation=full", "NAME", "1k"],
    ["-f", "raw", "-o", "extent_size_hint=1M,preallocation=falloc,nocow=on", "NAME", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10", "NAME", "1G"],
    ["-f", "qcow2", "-o", "refcount_bits=8,extended_l2=on,cluster_size=64k", "NAME", "1G"],
    ["-f", "qcow2", "-o", "lazy_refcounts=true,cluster_size=4k,preallocation=falloc,"
     "extent_size_hint=2M,nocow=on,data_file=NAME.a,,b", "NAME", "1M"],
    ["-f", "qcow2", "-o", "compression_type=zstd", "NAME", "1M"],
    ["-f", "qcow2", "-o", "encryption=off,data_file_raw=off", "NAME", "1M"],
    ["-f", "qcow2", "-o", "size=2M", "NAME"],
    ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "NAME"],
    ["-f", "qcow2", "-o", "cluster_size=4k,compat=1.1", "-b", "base.raw", "-F", "raw", "NAME",
     "3M"],
    ["-f", "qcow2", "-u", "-b", "nothere", "-F", "qcow2", "NAME", "1M"],
    ["-q", "-f", "raw", "NAME", "1M"],
]


def test_formatting_line_and_image_as_qemu_img(tmp_path: Path, qemu_img):
    assert qemu_img("create", "-q", "-f", "raw", "base.raw", "1M").returncode == 0
    for number, args in enumerate(CASES):
        mine, reference = f"ours{number}", f"theirs{number}"
        ours = run_corefmt(tmp_path, "create", *[a.replace("NAME", mine) for a in args])
        theirs = qemu_img("create", *[a.replace("NAME", reference) for a in args])
        assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr), args
        assert ours.stdout.replace(mine, reference) == theirs.stdout, args
        fmt = args[args.index("-f") + 1]
        info = [json.loads(qemu_img("info", "-U", "-f", fmt, "--output=json", name).stdout)
                for name in (mine, reference)]
        assert info[0]["virtual-size"] == info[1]["virtual-size"], args
        if fmt == "raw":
            assert info[0]["actual-size"] == info[1]["actual-size"], args
            assert os.path.getsize(tmp_path / mine) == os.path.getsize(tmp_path / reference)


def test_a_user_run_of_raw(tmp_path: Path, corefmt, qemu_img):
    result = corefmt("create", "-f", "raw", "disk.raw", "100")
    assert result.stdout == "Formatting 'disk.raw', fmt=raw size=100\n"
    assert os.path.getsize(tmp_path / "disk.raw") == 512
    mapped = json.loads(qemu_img("map", "-f", "raw", "--output=json", "disk.raw").stdout)
    assert mapped[0]["data"] and mapped[0]["length"] == 512

"""FVD's create options (spec §2.3): every one under its 2011 name, bad
values and combinations refused with one line before any file is made."""

from __future__ import annotations

import pytest
from corefmt_fvd.layout import FvdHeader

import corefmt
from corefmt import CorefmtError
from corefmt.cli.main import main

MiB = 1024 * 1024
SPEC_OPTIONS = ("size", "backing_file", "backing_fmt", "compact_image", "block_size",
                "chunk_size", "storage_grow_unit", "add_storage_cmd", "data_file",
                "data_file_fmt", "copy_on_read", "prefetch_start_delay",
                "detect_sparse_hole", "journal_size")


def test_help_lists_every_option_of_the_spec(capsys):
    assert main(["create", "-f", "fvd", "-o", "help"]) == 0
    listed = {line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines()
              if "=<" in line}
    assert set(SPEC_OPTIONS) <= listed


@pytest.mark.parametrize(("options", "message"), [
    ("copy_on_read=on", "copy_on_read needs a base image"),
    ("prefetch_start_delay=5", "prefetch_start_delay needs a base image"),
    ("bytes_per_prefetch=1M", "bytes_per_prefetch needs a base image"),
    ("detect_sparse_hole=1M", "detect_sparse_hole needs a base image"),
    ("compact_image=on,detect_sparse_hole=1M", "cannot be used with compact_image"),
    ("data_file_fmt=raw", "data_file_fmt needs data_file"),
    ("add_storage_cmd=/bin/true", "only used by compact images"),
    ("block_size=2G", "block_size must be between"),
    ("journal_size=5G", "at most 4 GiB"),
    ("journal_size=-x", "journal_size expects"),
    ("prefetch_perf_calc_alpha=101", "between 0 and 100"),
    ("compact_image=maybe", "compact_image"),
    ("data_file=" + "d" * 1024, "longer than 1023 bytes"),
])
def test_refused(tmp_path, options, message):
    path = tmp_path / "img.fvd"
    with pytest.raises(CorefmtError, match=message):
        corefmt.create(str(path), "fvd", MiB, options=options)
    assert not path.exists()


def _header(path) -> FvdHeader:
    return FvdHeader.unpack(path.read_bytes()[:4336])


def test_sizes_are_rounded_as_the_original_rounds_them(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * MiB)
    path = tmp_path / "img.fvd"
    corefmt.create(str(path), "fvd", 3 * MiB + 1, backing=str(base), backing_format="raw",
                   options="compact_image=on,block_size=1000,chunk_size=5000,"
                   "storage_grow_unit=1,journal_size=1000")
    header = _header(path)
    assert header.virtual_disk_size == 3 * MiB + 512
    assert header.block_size == 1024
    assert header.chunk_size == 8192
    assert header.storage_grow_unit == 8192  # at least one chunk
    assert header.journal_size == 4096
    assert header.base_img_fmt == "raw"


def test_negative_journal_size_disables_the_journal(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * MiB)
    path = tmp_path / "img.fvd"
    corefmt.create(str(path), "fvd", MiB, backing=str(base), backing_format="raw",
                   options="journal_size=-1")
    header = _header(path)
    assert header.journal_size == 0
    assert header.metadata_size == 8192 + 4096

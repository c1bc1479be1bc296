"""Names read from images are untrusted: they may name local files (or the
protocol the image is on), never another protocol unless the user allows it."""

from __future__ import annotations

import json

import pytest

import corefmt
from corefmt.errors import BackingChainError
from tests.conftest import run_cli

MiB = 1024 * 1024


def _overlay_naming(tmp_path, name: str) -> str:
    top = str(tmp_path / "top.bm")
    corefmt.create(top, "blockmap", MiB, backing=name, backing_format="raw", unsafe=True)
    return top


def test_a_local_image_cannot_name_another_protocol(blockmap, tmp_path):
    corefmt.create("memory:secret", "raw", MiB)
    top = _overlay_naming(tmp_path, "memory:secret")
    with pytest.raises(BackingChainError, match="selects the 'memory' protocol"):
        corefmt.open(top)
    with corefmt.open(top, allow_protocols=["memory"]) as disk:
        assert disk.chain()[1].filename == "memory:secret"


def test_a_json_graph_stored_as_a_backing_name_needs_permission(blockmap, tmp_path):
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", MiB)
    spec = "json:" + json.dumps({"driver": "raw", "file": {"filename": base}})
    top = _overlay_naming(tmp_path, spec)
    with pytest.raises(BackingChainError, match="'json' protocol"):
        corefmt.open(top)
    with corefmt.open(top, allow_protocols=["json"]) as disk:
        assert disk.chain()[1].filename == base


def test_an_image_on_a_protocol_may_name_its_siblings(blockmap):
    corefmt.create("memory:base", "raw", MiB)
    corefmt.create("memory:top", "blockmap", backing="memory:base", backing_format="raw")
    with corefmt.open("memory:top") as disk:
        assert [layer.filename for layer in disk.chain()] == ["memory:top", "memory:base"]


def test_names_the_user_gives_are_the_users_own(tmp_path):
    corefmt.create("memory:given", "raw", MiB)
    with corefmt.open("memory:given") as disk:
        assert disk.virtual_size == MiB


def test_the_cli_refuses_in_one_line_and_allows_with_the_option(blockmap, tmp_path):
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", MiB)
    spec = "json:" + json.dumps({"driver": "raw", "file": {"filename": base}})
    top = _overlay_naming(tmp_path, spec)
    refused = run_cli("info", "--backing-chain", top)  # info alone opens no backing
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--allow-protocol json" in refused.stderr
    allowed = run_cli("info", "--allow-protocol", "json", "--backing-chain", top, check=True)
    assert base in allowed.stdout

"""``corefmt stress`` over a remote base: the overlay under test lives on
simulated storage (races, injected errors, power cuts), its base is an
image on nginx or in a Ceph bucket, read-only and never faulted. Every
read must show what the model allows; copy-on-read and prefetch fill the
overlay from the server."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.remote.conftest import S3Served, Served

SEEDS = "8"
SIZE = "2M"  # the first MiB of the served images is data, the second a hole


def _stress(format: str, base_format: str, url: str, env: dict[str, str] | None = None
            ) -> str:
    result = run_cli("stress", "--format", format, "--base", base_format, "--remote-base", url,
                     "--size", SIZE, "--seeds", SEEDS, "--crash", "--errors", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches 0, check failures 0" in result.stdout, result.stdout
    return result.stderr


@pytest.mark.parametrize(("format", "base"), [("fvd", "qcow2"), ("qcow2", "qcow2"),
                                              ("fvd", "raw"), ("qcow2", "fvd")])
def test_stress_over_a_base_on_nginx(served: Served, format: str, base: str):
    name = {"qcow2": "disk.qcow2", "raw": "disk.raw", "fvd": "disk-compact.fvd"}[base]
    summary = _stress(format, base, served.url(name))
    assert "prefetches completed" in summary


@pytest.mark.xdist_group("ceph")
def test_stress_over_a_base_in_a_bucket(s3_served: S3Served):
    _stress("fvd", "qcow2", s3_served.url("disk.qcow2"), env=s3_served.env())


def test_remote_base_needs_its_format():
    result = run_cli("stress", "--remote-base", "http://127.0.0.1:1/x", "--seeds", "1")
    assert result.returncode != 0 and "--remote-base needs --base" in result.stderr

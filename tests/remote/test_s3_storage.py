"""The s3 storage driver against a real one-node Ceph cluster's RADOS Gateway.

Every format reads from a bucket exactly as from the local file, through
the CLI a user runs with the standard AWS environment; overlays over an S3
base work and refuse a base replaced in the bucket; keys never show in a
message.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from pathlib import Path

import pytest

from corefmt.errors import CorefmtError
from corefmt.storage.s3 import S3StorageDriver
from tests.conftest import run_cli
from tests.remote.conftest import DATA_RUNS, IMAGE_NAMES, S3Served

# One worker runs them all, so one cluster serves them (tox: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ceph")
ALLOW = ("--allow-protocol", "s3")
#: How long the gateway stays away in the restart test (the retries wait longer).
RGW_DOWN_SECONDS = 0.5
#: A range of the restart test no earlier read (or readahead) fetched.
MIDDLE = 512 * 1024


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def _no_secrets(text: str, served: S3Served) -> None:
    for secret in (served.rgw.secret_key, served.rgw.access_key, "X-Amz", "Signature"):
        assert secret not in text, text


def _info(target: str, env: dict[str, str]) -> dict:
    info = json.loads(run_cli("info", "--output=json", target, check=True, env=env).stdout)
    for key in ("filename", "actual-size"):
        info.pop(key, None)
    return info


@pytest.mark.interop
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_in_a_bucket_reads_as_the_local_file(s3_served: S3Served, name: str,
                                                    tmp_path: Path):
    env = s3_served.env()
    compared = run_cli("compare", s3_served.url(name), str(s3_served.local(name)), env=env)
    assert compared.returncode == 0 and "identical" in compared.stdout, compared.stderr
    copy = tmp_path / "copy.raw"
    converted = run_cli("convert", "-p", "-O", "raw", s3_served.url(name), str(copy), env=env)
    assert converted.returncode == 0 and "100.00/100%" in converted.stdout, converted.stderr
    checked = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy),
                              str(s3_served.local("disk.raw"))], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2", "disk-compact.fvd"])
def test_info_and_map_in_a_bucket_match_the_local_file(s3_served: S3Served, name: str):
    env = s3_served.env()
    url, local = s3_served.url(name), str(s3_served.local(name))
    assert _info(url, env) == _info(local, env)
    mapped = [run_cli("map", "--output=json", where, check=True, env=env).stdout
              for where in (url, local)]
    assert mapped[0] == mapped[1]
    info = run_cli("info", url, check=True, env=env).stdout
    assert f"image: {url}\n" in info
    _no_secrets(info, s3_served)


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_a_local_overlay_over_an_s3_base(s3_served: S3Served, fmt: str, tmp_path: Path):
    """The overlay reads as the same overlay over the local base; its name
    of the base is followed only with --allow-protocol s3."""
    env = s3_served.env()
    remote, local = tmp_path / f"remote.{fmt}", tmp_path / f"local.{fmt}"
    run_cli("create", "-f", fmt, "-b", s3_served.url("disk.qcow2"), "-F", "qcow2",
            str(remote), check=True, env=env)
    run_cli("create", "-f", fmt, "-b", str(s3_served.local("disk.qcow2")), "-F", "qcow2",
            str(local), check=True, env=env)
    for overlay, allow in ((remote, ALLOW), (local, ())):
        run_cli("io", *allow, "-c", f"write -P 0x3c {DATA_RUNS[1][0] + 512} 8192",
                str(overlay), check=True, env=env)
    line = _one_line(run_cli("map", str(remote), env=env))
    assert "'s3' protocol" in line and "--allow-protocol s3" in line
    compared = run_cli("compare", *ALLOW, str(remote), str(local), env=env)
    assert compared.returncode == 0 and "identical" in compared.stdout, compared.stderr
    assert run_cli("check", *ALLOW, str(remote), env=env).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_an_overlay_refuses_its_base_once_replaced_in_the_bucket(
        s3_served: S3Served, fmt: str, tmp_path: Path):
    env = s3_served.env()
    key = f"replaced-under-{fmt}.qcow2"
    s3_served.rgw.put(s3_served.bucket, key, s3_served.local("disk.qcow2"))
    overlay = tmp_path / f"overlay.{fmt}"
    run_cli("create", "-f", fmt, "-b", s3_served.url(key), "-F", "qcow2", str(overlay),
            check=True, env=env)
    assert run_cli("map", *ALLOW, str(overlay), env=env).returncode == 0
    changed = bytearray(s3_served.local("disk.qcow2").read_bytes())
    changed[-1] ^= 0xFF  # another version: another ETag (the MD5)
    s3_served.rgw.put(s3_served.bucket, key, bytes(changed))
    line = _one_line(run_cli("map", *ALLOW, str(overlay), env=env))
    assert f"'{s3_served.url(key)}'" in line and "changed since" in line and "ETag" in line


def test_a_bucket_image_reaches_its_sibling_without_permission(s3_served: S3Served,
                                                              tmp_path: Path):
    """A relative backing name inside an object is a key beside it."""
    sibling = tmp_path / "sibling.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "disk.qcow2", "-F",
                    "qcow2", str(sibling), "16M"], check=True, capture_output=True)
    s3_served.rgw.put(s3_served.bucket, "sibling.qcow2", sibling)
    env = s3_served.env()
    compared = run_cli("compare", s3_served.url("sibling.qcow2"),
                       str(s3_served.local("disk.qcow2")), env=env)
    assert compared.returncode == 0, compared.stderr
    chain = json.loads(run_cli("info", "--backing-chain", "--output=json",
                               s3_served.url("sibling.qcow2"), check=True, env=env).stdout)
    assert chain[1]["filename"] == s3_served.url("disk.qcow2")


def test_errors_are_one_line_naming_the_object_without_keys(s3_served: S3Served):
    env = s3_served.env()
    missing = _one_line(run_cli("info", s3_served.url("missing.qcow2"), env=env))
    assert missing == "corefmt: Could not open 's3://images/missing.qcow2': HTTP 404 Not Found"
    no_bucket = _one_line(run_cli("info", "s3://no-such-bucket/disk.qcow2", env=env))
    assert "'s3://no-such-bucket/disk.qcow2'" in no_bucket and "404" in no_bucket
    wrong = _one_line(run_cli("info", s3_served.url("disk.qcow2"),
                              env=s3_served.env(AWS_SECRET_ACCESS_KEY="not-the-secret")))
    assert "'s3://images/disk.qcow2'" in wrong and "403" in wrong
    written = _one_line(run_cli("io", "-c", "write 0 512", s3_served.url("disk.raw"), env=env))
    assert "s3 storage is read-only" in written
    for line in (missing, no_bucket, wrong, written):
        _no_secrets(line, s3_served)
    assert "not-the-secret" not in wrong


def test_without_credentials_requests_go_unsigned(s3_served: S3Served):
    """As ``aws --no-sign-request``: a public object reads, a private one is
    refused by the store."""
    s3_served.rgw.client.put_object(Bucket=s3_served.bucket, Key="public.raw", ACL="public-read",
                                    Body=s3_served.local("disk.raw").read_bytes())
    anonymous = s3_served.env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        anonymous.pop(key)
    anonymous["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance-metadata lookup
    compared = run_cli("compare", s3_served.url("public.raw"), str(s3_served.local("disk.raw")),
                       env=anonymous)
    assert compared.returncode == 0, compared.stderr
    line = _one_line(run_cli("info", s3_served.url("disk.raw"), env=anonymous))
    assert "403" in line


def test_reads_ride_through_a_gateway_restart_and_refuse_a_new_version(
        s3_served: S3Served, monkeypatch: pytest.MonkeyPatch):
    """In one open: the gateway restarting costs retries, not the read; the
    object replaced under the open is refused from then on."""
    for key, value in s3_served.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COREFMT_HTTP_RETRIES", "8")
    monkeypatch.setenv("COREFMT_HTTP_BACKOFF", "0.2")
    key = "restarted.raw"
    content = s3_served.local("disk.raw").read_bytes()
    s3_served.rgw.put(s3_served.bucket, key, content)
    driver = S3StorageDriver()
    storage = driver.open(s3_served.url(key), read_only=True)
    try:
        assert storage.read(0, 4096) == content[:4096]
        s3_served.rgw.restart_rgw()  # the pooled connections are dead now
        offset = DATA_RUNS[1][0]
        assert storage.read(offset, 65536) == content[offset:offset + 65536]
        # a read that starts while the gateway is down waits for it (retries)
        s3_served.rgw.stop_rgw()
        back = threading.Timer(RGW_DOWN_SECONDS, s3_served.rgw.start_rgw)
        back.start()
        try:
            assert storage.read(MIDDLE, 65536) == content[MIDDLE:MIDDLE + 65536]
        finally:
            back.join()
        s3_served.rgw.put(s3_served.bucket, key, content[:-1] + b"\x01")
        with pytest.raises(CorefmtError, match="changed on the server"):
            storage.read(DATA_RUNS[2][0], 4096)
    finally:
        storage.close()
        driver.close()


def test_names_are_checked_and_siblings_stay_in_the_bucket():
    driver = S3StorageDriver()
    assert driver.resolve("base.qcow2", "s3://vms/vm/top.qcow2") == "s3://vms/vm/base.qcow2"
    assert driver.resolve("../base.qcow2", "s3://vms/vm/top.qcow2") == "s3://vms/base.qcow2"
    assert driver.resolve("s3://other/x", "s3://vms/vm/top.qcow2") == "s3://other/x"
    with pytest.raises(CorefmtError, match="out of the bucket"):
        driver.resolve("../../etc/passwd", "s3://vms/vm/top.qcow2")
    for bad in ("s3://", "s3://bucket", "s3://bucket/", "s3://-x/key", "s3://ab/key"):
        with pytest.raises(CorefmtError, match="not an s3://BUCKET/KEY name"):
            driver.target(bad)


def test_a_prefetched_fvd_overlay_no_longer_needs_the_store(s3_served: S3Served,
                                                            tmp_path: Path):
    """FVD's promise over S3: prefetch copies the base in, and from then on
    the overlay reads with the gateway down (it never opens the base)."""
    env = s3_served.env(COREFMT_HTTP_RETRIES="0")
    overlay = tmp_path / "vm.fvd"
    run_cli("create", "-f", "fvd", "-b", s3_served.url("disk.qcow2"), "-F", "qcow2",
            str(overlay), check=True, env=env)
    reference = str(s3_served.local("disk.raw"))
    s3_served.rgw.stop_rgw()
    try:
        line = _one_line(run_cli("compare", *ALLOW, str(overlay), reference, env=env))
        assert "s3://images/disk.qcow2" in line  # not prefetched yet: the base is needed
        s3_served.rgw.start_rgw()
        run_cli("prefetch", *ALLOW, str(overlay), check=True, env=env)
        s3_served.rgw.stop_rgw()
        compared = run_cli("compare", *ALLOW, str(overlay), reference, env=env)
        assert compared.returncode == 0 and "identical" in compared.stdout, compared.stderr
    finally:
        s3_served.rgw.start_rgw()


def test_an_object_may_not_name_another_bucket_unasked(s3_served: S3Served, tmp_path: Path):
    """A bucket's image reaching into another bucket would read it with the
    user's keys: that needs --allow-protocol s3, as any remote name does."""
    s3_served.rgw.create_bucket("private")
    s3_served.rgw.put("private", "disk.qcow2", s3_served.local("disk.qcow2"))
    pointer = tmp_path / "pointer.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "s3://private/disk.qcow2",
                    "-F", "qcow2", str(pointer), "16M"], check=True, capture_output=True)
    s3_served.rgw.put(s3_served.bucket, "pointer.qcow2", pointer)
    env, reference = s3_served.env(), str(s3_served.local("disk.qcow2"))
    line = _one_line(run_cli("compare", s3_served.url("pointer.qcow2"), reference, env=env))
    assert "'s3' protocol" in line and "--allow-protocol s3" in line
    allowed = run_cli("compare", *ALLOW, s3_served.url("pointer.qcow2"), reference, env=env)
    assert allowed.returncode == 0, allowed.stderr


def test_debug_logging_never_shows_a_presigned_query(s3_served: S3Served,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture):
    for key, value in s3_served.env().items():
        monkeypatch.setenv(key, value)
    driver = S3StorageDriver()
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        storage = driver.open(s3_served.url("disk.raw"), read_only=True)
        storage.read(0, 4096)
        storage.close()
    driver.close()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/images/disk.raw?(presigned)" in logged
    _no_secrets(logged, s3_served)

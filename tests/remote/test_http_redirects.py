"""Redirects, followed as qemu's curl driver follows them: against nginx
(301, 302, a loop, http to https and back) and a scripted pair of servers
(whom the login goes to, where later requests go, a location gone stale)."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corefmt.errors import CorefmtError
from corefmt.storage.http import (
    ENV_BACKOFF,
    ENV_CA_FILE,
    MAX_REDIRECTS,
    HttpSettings,
    HttpStorageDriver,
)
from tests.conftest import fill, run_cli
from tests.remote.conftest import MiB, Served
from tests.remote.servers import Script, scripted_server

FAST = HttpSettings(retries=1, backoff=0.01, timeout=5.0)
LOGIN = "user:secret"
BASIC = "Basic " + base64.b64encode(LOGIN.encode()).decode()


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


# -- nginx ---------------------------------------------------------------------------------
@pytest.mark.interop
@pytest.mark.parametrize("place", ["moved", "found"])
def test_a_redirected_image_reads_as_the_local_file(served: Served, place: str, tmp_path: Path):
    url, local = served.url(f"{place}/disk.qcow2"), str(served.local("disk.qcow2"))
    compared = run_cli("compare", url, local)
    assert compared.returncode == 0 and "identical" in compared.stdout, compared.stderr
    info = run_cli("info", url, check=True).stdout
    assert f"image: {url}" in info  # the name the user gave, not where it led
    copy = tmp_path / "copy.raw"
    run_cli("convert", "-p", "-O", "raw", url, str(copy), check=True)
    checked = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy),
                              str(served.local("disk.raw"))], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_relative_backing_resolves_against_the_name_given(served: Served):
    """An image reached through /found/ names its base relatively: the base
    is /found/BASE, redirected in its turn."""
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
                    str(served.local("redirected-top.qcow2"))], check=True, capture_output=True)
    top = served.url("found/redirected-top.qcow2")
    compared = run_cli("compare", top, str(served.local("disk.qcow2")))
    assert compared.returncode == 0, compared.stderr


def test_a_redirect_loop_ends_in_one_line(served: Served):
    url = served.url("loop/disk.qcow2")
    line = _one_line(run_cli("info", url))
    assert line == f"corefmt: {url}: more than {MAX_REDIRECTS} redirects"


def test_http_may_lead_to_https_but_https_never_to_http(served: Served):
    if served.nginx.certificate is None:
        pytest.skip("openssl not installed: no https port")
    trusting = {**os.environ, ENV_CA_FILE: str(served.nginx.certificate[0])}
    local = str(served.local("disk.qcow2"))
    upgraded = run_cli("compare", served.url("to-tls/disk.qcow2"), local, env=trusting)
    assert upgraded.returncode == 0, upgraded.stderr
    insecure = served.nginx.tls_url("insecure/disk.qcow2")
    line = _one_line(run_cli("info", insecure, env=trusting))
    assert line == (f"corefmt: {insecure}: redirected from https to plain http "
                    f"({served.url('disk.qcow2')}); refusing to leave TLS")


# -- scripted servers ----------------------------------------------------------------------
@pytest.fixture
def target() -> Iterator[tuple[Script, str]]:
    script = Script(content=fill(MiB, 21))
    with scripted_server(script) as url:
        yield script, url


@pytest.fixture
def redirector() -> Iterator[tuple[Script, str]]:
    script = Script()
    with scripted_server(script) as url:
        yield script, url


def _with_login(url: str) -> str:
    return url.replace("http://", f"http://{LOGIN}@", 1)


def test_the_login_goes_to_the_urls_own_server_only(target, redirector):
    """curl's rule: a redirect to another server (here another port) loses
    the Authorization header; the server of the URL itself always gets it."""
    (content_script, content_url), (script, url) = target, redirector
    script.redirect = content_url
    storage = HttpStorageDriver("http", FAST).open(_with_login(url), read_only=True)
    assert storage.read(4096, 4096) == content_script.content[4096:8192]
    assert script.authorizations and set(script.authorizations) == {BASIC}
    assert content_script.authorizations and set(content_script.authorizations) == {None}


def test_later_requests_go_where_the_redirect_led(target, redirector):
    (content_script, content_url), (script, url) = target, redirector
    script.redirect, script.redirect_status = content_url, 301
    storage = HttpStorageDriver("http", FAST).open(url, read_only=True)
    for offset in range(0, MiB, 256 * 1024):
        assert storage.read(offset, 512) == content_script.content[offset:offset + 512]
    assert script.requests == ["HEAD "]  # asked once; every range went to the target
    assert sum(request.startswith("GET") for request in content_script.requests) >= 1


def test_a_stale_location_is_asked_for_again(target, redirector):
    """A signed location expires: its 403 sends the next request back to the
    URL, whose new redirect is followed."""
    (content_script, content_url), (script, url) = target, redirector
    script.redirect = content_url
    storage = HttpStorageDriver("http", FAST).open(url, read_only=True)
    storage.read(0, 512)
    asked = len(script.requests)
    second = Script(content=content_script.content)
    with scripted_server(second) as fresh:
        script.redirect = fresh
        content_script.fail_always, content_script.error_status = True, 403
        offset = MiB // 2
        assert storage.read(offset, 512) == content_script.content[offset:offset + 512]
        assert len(script.requests) == asked + 1
        assert any(request.startswith("GET") for request in second.requests)


def test_a_location_signed_for_get_only_still_opens(target, redirector):
    """HEAD of a presigned GET location is refused (403): the first byte,
    asked for with GET, tells the size and version instead."""
    (content_script, content_url), (script, url) = target, redirector
    script.redirect = content_url
    content_script.head_status = 403
    storage = HttpStorageDriver("http", FAST).open(url, read_only=True)
    assert storage.size() == MiB
    assert storage.read(MiB - 512, 512) == content_script.content[-512:]


def test_a_redirect_without_location_or_to_another_protocol_is_refused(redirector):
    script, url = redirector
    script.redirect = ""
    with pytest.raises(CorefmtError, match=rf"^{url}: HTTP 302 Found without a Location"):
        HttpStorageDriver("http", FAST).open(url, read_only=True)
    script.redirect = "ftp://127.0.0.1/disk.raw?token=secret"
    with pytest.raises(CorefmtError, match=r"redirected to 'ftp://127.0.0.1/disk.raw\?…', "
                                           r"which is not http\(s\)$"):
        HttpStorageDriver("http", FAST).open(url, read_only=True)


def test_the_cli_follows_a_redirect_to_another_server(target, redirector, tmp_path: Path):
    (content_script, content_url), (script, url) = target, redirector
    script.redirect = content_url
    local = tmp_path / "disk.raw"
    local.write_bytes(content_script.content)
    compared = run_cli("compare", "-f", "raw", url, str(local),
                       env={**os.environ, ENV_BACKOFF: "0.01"})
    assert compared.returncode == 0, compared.stderr


@pytest.mark.parametrize("location", [
    "http://bob:hunter2@127.0.0.1:99999/x?X-Amz-Signature=SECRETSIG",
    "http://[::1/x?X-Amz-Signature=SECRETSIG",
])
def test_a_malformed_location_is_one_line_without_its_login_or_signature(redirector, location):
    script, url = redirector
    script.redirect = location
    result = run_cli("info", url, env={**os.environ, ENV_BACKOFF: "0.01"})
    line = _one_line(result)
    assert line.startswith(f"corefmt: {url}: ") and "malformed" in line, line
    assert "hunter2" not in line and "SECRETSIG" not in line, line
    assert len(script.requests) == 1  # not retried as if the network had failed


def test_a_base_named_in_an_image_may_not_be_redirected_to_another_server_unasked(
        served: Served):
    """A relative base name passes as a sibling; its server's redirect to
    another one (here the https port) would bypass that rule: refused unless
    the user allows the protocol."""
    if served.nginx.certificate is None:
        pytest.skip("openssl not installed: no second (https) port")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "to-tls/disk.qcow2",
                    "-F", "qcow2", str(served.local("confined-top.qcow2")), "16M"],
                   check=True, capture_output=True)
    top = served.url("confined-top.qcow2")
    trusting = {**os.environ, ENV_CA_FILE: str(served.nginx.certificate[0])}
    line = _one_line(run_cli("map", top, env=trusting))
    assert "redirected to another server" in line and "--allow-protocol http" in line, line
    allowed = run_cli("map", "--allow-protocol", "http", top, env=trusting)
    assert allowed.returncode == 0, allowed.stderr


def test_s3_does_not_follow_redirects(target, redirector):
    """A signed request is valid for its endpoint only (and S3 answers a
    bucket of another region with a 301): the 3xx is reported."""
    from corefmt.storage.http import _Client, _identify
    from corefmt.storage.s3 import S3Target

    (_, content_url), (script, url) = target, redirector
    script.redirect = content_url

    class Unsigned:
        def presign(self, method, bucket, key):
            return url

    with pytest.raises(CorefmtError, match=r"^Could not open 's3://bucket/key': HTTP 302 Found$"):
        _identify(S3Target("bucket", "key", Unsigned()), _Client(FAST))
    # the plain http path follows the same answer:
    assert HttpStorageDriver("http", FAST).open(url, read_only=True).size() == MiB

"""The http(s) storage drivers against nginx and a scripted misbehaving server.

nginx shows that images of every format read over HTTP exactly as the local
file does, through the CLI a user runs; the scripted server shows what nginx
cannot be made to do: errors before success, an object swapped without
honouring If-Range, a body cut short, no range support.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import corefmt
from corefmt.credentials import without_credentials
from corefmt.errors import CorefmtError, ReadOnlyError
from corefmt.storage.http import (
    ENV_BACKOFF,
    ENV_CA_FILE,
    ENV_RETRIES,
    HttpSettings,
    HttpStorage,
    HttpStorageDriver,
)
from tests.conftest import fill, run_cli
from tests.remote.conftest import DATA_RUNS, MiB, Served
from tests.remote.servers import Script, scripted_server

#: Retries in the scripted tests: quick, and few enough to count.
FAST = HttpSettings(retries=2, backoff=0.01, timeout=5.0)
OBJECT_SIZE = MiB


def _env(**values: str) -> dict[str, str]:
    return {**os.environ, ENV_BACKOFF: "0.01", **values}


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def _info(target: str) -> dict:
    info = json.loads(run_cli("info", "--output=json", target, check=True).stdout)
    for key in ("filename", "actual-size"):  # where it is, and what a file occupies
        info.pop(key, None)
    return info


# -- nginx: every format reads as the local file --------------------------------------------
@pytest.mark.interop
@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2", "disk.fvd", "disk-compact.fvd"])
def test_image_over_http_reads_as_the_local_file(served: Served, name: str, tmp_path: Path):
    url = served.url(name)
    compared = run_cli("compare", url, str(served.local(name)))
    assert compared.returncode == 0 and "identical" in compared.stdout, compared.stderr
    copy = tmp_path / "copy.raw"
    run_cli("convert", "-O", "raw", url, str(copy), check=True)
    checked = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy),
                              str(served.local("disk.raw"))], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2", "disk-compact.fvd"])
def test_info_and_map_over_http_match_the_local_file(served: Served, name: str):
    """(A plain FVD or a sparse raw maps its holes from the file system, which
    HTTP cannot tell: over HTTP they read as data, as with qemu's curl.)"""
    url, local = served.url(name), str(served.local(name))
    assert _info(url) == _info(local)
    mapped = [run_cli("map", "--output=json", where, check=True).stdout for where in (url, local)]
    assert mapped[0] == mapped[1]
    if name != "disk.raw":  # all data; the others: data and holes
        assert len(json.loads(mapped[0])) > 1


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_http_backing_named_in_a_local_overlay_needs_allow_protocol(
        served: Served, fmt: str, tmp_path: Path):
    overlay = tmp_path / f"overlay.{fmt}"
    # A name on the command line is the user's own: create follows it.
    run_cli("create", "-f", fmt, "-b", served.url("disk.qcow2"), "-F", "qcow2", str(overlay),
            check=True)
    base = str(served.local("disk.qcow2"))
    for refused in ([], ["--allow-protocol", "https,json"]):
        line = _one_line(run_cli("compare", *refused, str(overlay), base))
        assert "'http' protocol" in line and "--allow-protocol http" in line
    allowed = run_cli("compare", "--allow-protocol", "file,http", str(overlay), base)
    assert allowed.returncode == 0, allowed.stderr


def test_a_remote_image_reaches_its_sibling_without_permission(served: Served):
    """A relative backing name inside an image on the server is its neighbour
    there (same protocol: allowed without --allow-protocol)."""
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
                    str(served.local("sibling.qcow2"))], check=True, capture_output=True)
    compared = run_cli("compare", served.url("sibling.qcow2"), str(served.local("disk.qcow2")))
    assert compared.returncode == 0, compared.stderr
    chain = json.loads(run_cli("info", "--backing-chain", "--output=json",
                               served.url("sibling.qcow2"), check=True).stdout)
    assert chain[1]["filename"] == served.url("disk.qcow2")


def test_a_remote_image_may_not_name_another_server_unasked(served: Served):
    """Only the same server (scheme, host, port) is a sibling: an image may
    not make corefmt fetch from elsewhere (with the user's netrc login)."""
    if served.nginx.certificate is None:
        pytest.skip("openssl not installed: no second (https) port")
    elsewhere = served.nginx.url("disk.qcow2").replace(str(served.nginx.port),
                                                        str(served.nginx.port + 1))
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", elsewhere, "-F", "qcow2",
                    str(served.local("elsewhere.qcow2")), "16M"], check=True,
                   capture_output=True)
    same = served.url("disk.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", same, "-F", "qcow2",
                    str(served.local("same.qcow2")), "16M"], check=True, capture_output=True)
    base = str(served.local("disk.qcow2"))
    assert run_cli("compare", served.url("same.qcow2"), base).returncode == 0
    line = _one_line(run_cli("map", served.url("elsewhere.qcow2")))
    assert "'http' protocol" in line and "--allow-protocol http" in line


def test_a_missing_object_is_one_line_naming_the_url_without_credentials(served: Served):
    url = served.url("missing.qcow2")
    with_password = url.replace("http://", "http://alice:s3cret@")
    line = _one_line(run_cli("info", with_password))
    assert f"'{url}'" in line and "404" in line
    assert "s3cret" not in line and "alice" not in line
    assert without_credentials(with_password) == url


def test_an_object_replaced_under_an_open_image_is_refused(served: Served):
    """nginx honours If-Range: the new version arrives whole (200), with a
    new ETag, and is refused; so is every read after, of any range."""
    local = served.local("replaced.qcow2")
    shutil.copyfile(served.local("disk.qcow2"), local)
    expected = served.local("disk.raw").read_bytes()
    with corefmt.open(served.url("replaced.qcow2"), read_only=True) as node:
        assert node.read(0, 4096) == expected[:4096]
        newer = local.with_suffix(".new")
        shutil.copyfile(local, newer)  # the same bytes, another version (ETag)
        os.utime(newer, (1_000_000_000, 1_000_000_000))
        os.replace(newer, local)
        offset = DATA_RUNS[1][0]
        with pytest.raises(CorefmtError, match="changed on the server"):
            node.read(offset, 4096)
        with pytest.raises(CorefmtError, match="changed on the server"):
            node.read(0, 4096)


def test_https_trusts_the_ca_file_it_is_given(served: Served):
    if served.nginx.certificate is None:
        pytest.skip("openssl not installed: no certificate for the https server")
    url, local = served.nginx.tls_url("disk.qcow2"), str(served.local("disk.qcow2"))
    line = _one_line(run_cli("info", url))  # self-signed: not in the system's store
    assert f"{url}: TLS failed" in line and "certificate verify failed" in line
    trusting = _env(**{ENV_CA_FILE: str(served.nginx.certificate[0])})
    compared = run_cli("compare", url, local, env=trusting)
    assert compared.returncode == 0, compared.stderr


# -- the scripted server ------------------------------------------------------------------
@pytest.fixture
def script() -> Script:
    return Script(content=fill(OBJECT_SIZE, 15))


@pytest.fixture
def url(script: Script) -> Iterator[str]:
    with scripted_server(script) as address:
        yield address


def _open(url: str, settings: HttpSettings = FAST) -> HttpStorage:
    return HttpStorageDriver("http", settings).open(url, read_only=True)


def test_a_swapped_object_is_told_by_its_etag_after_a_reconnect(script: Script, url: str):
    """This server ignores If-Range: only the ETag of the 206 shows the swap."""
    storage = _open(url)
    for offset in (0, 4096):  # sequential: the second reads ahead into the cache
        assert storage.read(offset, 4096) == script.content[offset:offset + 4096]
    script.replace(fill(OBJECT_SIZE, 16), '"v2"')
    storage.drop_connections()
    with pytest.raises(CorefmtError, match=r'changed on the server.*"v1" became "v2"'):
        storage.read(OBJECT_SIZE // 2, 4096)
    with pytest.raises(CorefmtError, match="changed on the server"):
        storage.read(8192, 4096)  # cached, but of a version now known replaced
    script.replace(script.content, '"v1"')  # swapped back: still never mixed
    with pytest.raises(CorefmtError, match="changed on the server"):
        storage.read(0, 4096)


def test_ranged_reads_are_conditional_on_the_version_opened(script: Script, url: str):
    """If-Range: a server that honours it sends a replaced object whole
    (refused) instead of a range of the new version."""
    storage = _open(url)
    storage.read(0, 512)
    assert script.if_ranges[-1] == '"v1"'


def test_an_object_that_grew_is_refused(script: Script, url: str):
    storage = _open(url)
    script.replace(script.content + bytes(4096), '"v1"')
    with pytest.raises(CorefmtError, match="size 1048576 became 1052672"):
        storage.read(0, 512)


def test_a_flaky_server_is_read_through_retries(script: Script, url: str, tmp_path: Path):
    """503 twice (the HEAD and its retry), then success: the CLI reads it all."""
    local = tmp_path / "disk.raw"
    local.write_bytes(script.content)
    script.fail_first = 2
    compared = run_cli("compare", "-f", "raw", url, str(local), env=_env(**{ENV_RETRIES: "2"}))
    assert compared.returncode == 0, compared.stderr
    assert script.requests[:3] == ["HEAD ", "HEAD ", "HEAD "]


def test_reads_retry_a_bounded_number_of_times(script: Script, url: str):
    storage = _open(url)
    script.fail_first = FAST.retries
    assert storage.read(4096, 100) == script.content[4096:4196]
    script.fail_first = FAST.retries + 1
    with pytest.raises(CorefmtError, match="after 3 attempts: HTTP 503"):
        storage.read(0, 100)


def test_a_permanently_failing_server_ends_in_one_line(script: Script, url: str):
    script.fail_always = True
    line = _one_line(run_cli("info", url, env=_env(**{ENV_RETRIES: "2"})))
    assert line.startswith(f"corefmt: {url}: open failed after 3 attempts: HTTP 503")
    assert len(script.requests) == 3


def test_a_client_error_is_not_retried(script: Script, url: str):
    storage = _open(url)
    script.fail_always, script.error_status = True, 403
    del script.requests[:]
    with pytest.raises(CorefmtError, match=rf"^{url}: read of 100 bytes at offset 0 failed: "
                                           "HTTP 403 Forbidden$"):
        storage.read(0, 100)
    assert len(script.requests) == 1


def test_a_body_cut_short_is_resumed_from_where_it_stopped(script: Script, url: str):
    storage = _open(url)
    script.truncate_bodies = 1
    length = 256 * 1024
    assert storage.read(0, length) == script.content[:length]
    resumed = [request for request in script.requests if request.startswith("GET")]
    assert resumed == [f"GET bytes=0-{length - 1}", f"GET bytes={length // 2}-{length - 1}"]


def test_a_server_without_ranges_is_refused(script: Script, url: str):
    script.ranges = False
    line = _one_line(run_cli("info", url))
    assert f"'{url}'" in line and "does not support range requests" in line


def test_reads_past_the_end_are_zeros(script: Script, url: str):
    storage = _open(url)
    assert storage.size() == OBJECT_SIZE
    assert storage.read(OBJECT_SIZE - 10, 20) == script.content[-10:] + bytes(10)
    assert storage.read(OBJECT_SIZE + 4096, 10) == bytes(10)


def test_writes_are_refused(script: Script, url: str):
    driver = HttpStorageDriver("http", FAST)
    with pytest.raises(CorefmtError, match="http storage is read-only"):
        driver.open(url, read_only=False)
    with pytest.raises(CorefmtError, match="read-only"):
        driver.create(url)
    storage = driver.open(url, read_only=True)
    for change in (lambda: storage.write(0, b"x"), lambda: storage.truncate(0),
                   lambda: storage.write_zeroes(0, 512)):
        with pytest.raises(ReadOnlyError):
            change()


def test_exists_is_false_only_when_the_server_says_so(script: Script, url: str):
    driver = HttpStorageDriver("http", FAST)
    assert driver.exists(url)
    script.fail_always, script.error_status = True, 404
    assert not driver.exists(url)
    script.error_status = 403
    assert driver.exists(url)  # open reports the real problem


def test_relative_names_resolve_next_to_the_image():
    driver = HttpStorageDriver("https", FAST)
    top = "https://host:8443/images/top.qcow2"
    assert driver.resolve("base.qcow2", top) == "https://host:8443/images/base.qcow2"
    assert driver.resolve("../b.raw", top) == "https://host:8443/b.raw"
    assert driver.resolve("http://other/x", top) == "http://other/x"


def test_credentials_in_a_json_backing_name_stay_out_of_the_image(served: Served,
                                                                  tmp_path: Path):
    spec = {"driver": "qcow2",
            "file": served.url("disk.qcow2").replace("http://", "http://alice:s3cret@")}
    overlay = tmp_path / "overlay.qcow2"
    created = run_cli("create", "-f", "qcow2", "-b", "json:" + json.dumps(spec), "-F", "qcow2",
                      str(overlay))
    assert created.returncode == 0, created.stderr
    assert "s3cret" not in created.stdout
    assert b"s3cret" not in overlay.read_bytes()
    assert "s3cret" not in run_cli("info", str(overlay), check=True).stdout


def test_a_typed_login_stays_within_its_own_open(script: Script, url: str, monkeypatch):
    """The login typed for one open serves the images of that open only: a
    later open of the same server in the same process (another tenant of a
    long-running program) sends none."""
    import base64

    with_login = url.replace("http://", "http://alice:pw1@", 1)
    with corefmt.open(with_login, "raw", read_only=True) as node:
        node.read(0, 512)
    basic = "Basic " + base64.b64encode(b"alice:pw1").decode()
    assert script.authorizations and set(script.authorizations) == {basic}
    del script.authorizations[:]
    monkeypatch.setenv("NETRC", os.devnull)
    with corefmt.open(url, "raw", read_only=True) as node:
        node.read(4096, 512)
    assert script.authorizations and set(script.authorizations) == {None}

"""The Ceph RGW fixture the s3 driver's tests stand on: it starts, takes
objects small and multipart, serves byte ranges of them, and keeps them when
radosgw goes away and comes back."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import fill
from tests.remote.ceph import MULTIPART_THRESHOLD, PART_SIZE, Rgw, ceph_available, ceph_rgw
from tests.remote.servers import LOOPBACK

MiB = 1024 * 1024
BUCKET = "smoke"
SMALL_SIZE = 3 * MiB + 5
#: Two parts, the second short and of an odd size.
BIG_SIZE = MULTIPART_THRESHOLD + 3 * MiB + 17


@pytest.fixture(scope="module")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rgw]:
    reason = ceph_available()
    if reason is not None:
        pytest.skip(reason)
    with ceph_rgw(tmp_path_factory.mktemp("ceph")) as gateway:
        yield gateway


def _read(rgw: Rgw, key: str, start: int, length: int, size: int) -> bytes:
    end = start + length - 1
    answer = rgw.client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")
    assert answer["ContentRange"] == f"bytes {start}-{end}/{size}"
    return answer["Body"].read()


def test_objects_read_by_range_and_outlive_radosgw(rgw: Rgw, tmp_path: Path):
    rgw.create_bucket(BUCKET)
    small, big = fill(SMALL_SIZE, 1), fill(BIG_SIZE, 2)
    rgw.put(BUCKET, "small", small)
    (tmp_path / "big").write_bytes(big)
    rgw.put(BUCKET, "big", tmp_path / "big")

    heads = {key: rgw.client.head_object(Bucket=BUCKET, Key=key) for key in ("small", "big")}
    assert heads["small"]["ContentLength"] == SMALL_SIZE
    assert heads["small"]["ETag"] == f'"{hashlib.md5(small).hexdigest()}"'
    assert heads["big"]["ContentLength"] == BIG_SIZE
    assert heads["big"]["ETag"].endswith('-2"')  # multipart: the MD5 of the parts' MD5s
    for head in heads.values():
        assert head["AcceptRanges"] == "bytes" and head["LastModified"]
    boundary = PART_SIZE - 4096  # a range across the two parts
    assert _read(rgw, "big", boundary, 8192, BIG_SIZE) == big[boundary:boundary + 8192]
    assert _read(rgw, "small", SMALL_SIZE - 10, 10, SMALL_SIZE) == small[-10:]

    rgw.stop_rgw()
    port = int(rgw.endpoint.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), 1).close()
    rgw.start_rgw()
    rgw.start_rgw()  # running: a no-op, not a second radosgw
    rgw.restart_rgw()
    assert rgw.client.head_object(Bucket=BUCKET, Key="big")["ETag"] == heads["big"]["ETag"]
    assert _read(rgw, "big", boundary, 8192, BIG_SIZE) == big[boundary:boundary + 8192]

    rgw.delete(BUCKET, "small")
    with pytest.raises(ClientError) as missing:
        rgw.client.head_object(Bucket=BUCKET, Key="small")
    assert missing.value.response["Error"]["Code"] == "404"

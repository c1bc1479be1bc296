"""Fixtures: nginx and Ceph's RADOS Gateway on loopback, serving images made
by qemu-img and corefmt."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import fill, run_cli
from tests.remote.ceph import Rgw, ceph_available, ceph_rgw
from tests.remote.servers import Nginx, nginx_binary, nginx_serving

MiB = 1024 * 1024
IMAGE_SIZE = 16 * MiB
#: The images every remote test reads, made by _make_images.
IMAGE_NAMES = ("disk.raw", "disk.qcow2", "disk.fvd", "disk-compact.fvd")
#: The bucket the S3 tests read from.
BUCKET = "images"
#: (offset, length) runs written into the test images; the rest is unallocated.
DATA_RUNS = ((0, MiB), (5 * MiB, 64 * 1024), (IMAGE_SIZE - 4096, 4096))


@dataclass
class Served:
    """nginx and the images it serves (the same files are read locally)."""

    nginx: Nginx

    def url(self, name: str) -> str:
        return self.nginx.url(name)

    def local(self, name: str) -> Path:
        return self.nginx.root / name


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _make_images(root: Path) -> None:
    """disk.raw (all data), disk.qcow2, disk.fvd and disk-compact.fvd with
    the same guest contents."""
    content = bytearray(IMAGE_SIZE)
    for offset, length in DATA_RUNS:
        content[offset:offset + length] = fill(length, offset)
    (root / "disk.raw").write_bytes(bytes(content))
    sparse = root / "sparse.raw"
    sparse.write_bytes(b"")
    with open(sparse, "r+b") as stream:
        stream.truncate(IMAGE_SIZE)
        for offset, length in DATA_RUNS:
            stream.seek(offset)
            stream.write(content[offset:offset + length])
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(sparse), str(root / "disk.qcow2"))
    run_cli("convert", "-f", "raw", "-O", "fvd", str(sparse), str(root / "disk.fvd"), check=True)
    run_cli("convert", "-f", "raw", "-O", "fvd", "-o", "compact_image=on", str(sparse),
            str(root / "disk-compact.fvd"), check=True)
    sparse.unlink()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if nginx_binary() is None:
        pytest.skip("nginx not installed (Debian: apt-get install nginx-light)")
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed (Debian: apt-get install qemu-utils)")
    base = tmp_path_factory.mktemp("http")
    (base / "root").mkdir()
    _make_images(base / "root")
    with nginx_serving(base) as nginx:
        yield Served(nginx)


@dataclass
class S3Served:
    """The RADOS Gateway and the images in its bucket (the same files are
    kept locally to compare with)."""

    rgw: Rgw
    root: Path
    bucket: str = BUCKET

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def local(self, name: str) -> Path:
        return self.root / name

    def env(self, **extra: str) -> dict[str, str]:
        """The CLI's environment: the user's keys and the endpoint, and none
        of the AWS settings of whoever runs the tests."""
        clean = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        return {**clean, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **self.rgw.env(), **extra}


@pytest.fixture(scope="session")
def s3_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Served]:
    """One cluster per test worker (the S3 tests share an xdist group, so
    they run on one worker and start one cluster in all)."""
    reason = ceph_available()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed (Debian: apt-get install qemu-utils)")
    base = tmp_path_factory.mktemp("s3")
    root = base / "root"
    root.mkdir()
    _make_images(root)
    with ceph_rgw(base / "ceph") as rgw:
        rgw.create_bucket(BUCKET)
        for name in IMAGE_NAMES:
            rgw.put(BUCKET, name, root / name)
        yield S3Served(rgw, root)

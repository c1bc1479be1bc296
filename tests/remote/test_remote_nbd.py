"""An FVD overlay over a base on a web server, served over NBD: a VM (here
qemu-img and nbdinfo as its stand-ins) runs from it while copy-on-read
fills the overlay from the server."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.nbd.test_nbd_interop import cli, unix_uri, wait_for
from tests.remote.conftest import DATA_RUNS, Served

TIMEOUT = 60


@contextlib.contextmanager
def _serving(*args: str) -> Iterator[str]:
    """``corefmt nbd -t`` on a Unix socket until the block ends; yields its URI."""
    sock = Path(args[-1]).with_suffix(".sock")
    process = cli("-t", "-k", str(sock), *args)
    try:
        wait_for(sock, process)
        yield unix_uri(sock)
    finally:
        process.terminate()
        process.wait(TIMEOUT)


@pytest.mark.interop
def test_a_vm_runs_from_an_fvd_overlay_over_a_remote_base(served: Served, tmp_path: Path):
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo not installed (Debian: apt-get install libnbd-bin)")
    overlay = tmp_path / "vm.fvd"
    run_cli("create", "-f", "fvd", "-b", served.url("disk.qcow2"), "-F", "qcow2",
            str(overlay), check=True)
    reference = str(served.local("disk.raw"))
    with _serving("-C", "--allow-protocol", "http", "-f", "fvd", str(overlay)) as uri:
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                         text=True, check=True, timeout=TIMEOUT).stdout)
        assert info["exports"][0]["export-size"] == served.local("disk.raw").stat().st_size
        offset, length = DATA_RUNS[1]
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"read {offset} {length}", uri],
                       check=True, capture_output=True, timeout=TIMEOUT)
        compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri,
                                   reference], capture_output=True, text=True, timeout=TIMEOUT)
        assert compared.returncode == 0, compared.stdout + compared.stderr
    # copy-on-read kept what the VM read: it is the overlay's own now
    own = json.loads(run_cli("map", "--output=json", "--image-opts",
                             f"driver=fvd,file.filename={overlay},backing=",
                             check=True).stdout)
    assert any(entry["data"] and entry["start"] <= offset < entry["start"] + entry["length"]
               for entry in own)

"""qemu-img check as the stress tester's second opinion (real qemu-img)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from corefmt.stress.qemu_check import applies_to, qemu_check

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]
QCOW2_REFCOUNT_TABLE_OFFSET = 48  # header field: u64 big endian


def _qcow2_with_data(tmp_path, backing: bool = False) -> bytes:
    path = tmp_path / "image.qcow2"
    command = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
        command += ["-b", "base.raw", "-F", "raw"]
    subprocess.run([*command, str(path), "1M"], check=True, cwd=tmp_path)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(path)],
                   check=True, capture_output=True, cwd=tmp_path)
    return path.read_bytes()


def test_clean_image_passes_even_without_its_backing_file(tmp_path):
    content = _qcow2_with_data(tmp_path, backing=True)
    (tmp_path / "base.raw").unlink()  # the check judges the image alone
    assert applies_to("qcow2")
    assert qemu_check("qcow2", content) is None


def test_leaked_cluster_is_allowed(tmp_path):
    content = bytearray(_qcow2_with_data(tmp_path))
    content += bytes(65536)  # a cluster past the end, counted nowhere: not a corruption
    assert qemu_check("qcow2", bytes(content)) is None


def test_zeroed_refcounts_are_corruptions(tmp_path):
    content = bytearray(_qcow2_with_data(tmp_path))
    table = struct.unpack_from(">Q", content, QCOW2_REFCOUNT_TABLE_OFFSET)[0]
    block = struct.unpack_from(">Q", content, table)[0]
    content[block:block + 64] = bytes(64)  # every cluster in use now has refcount 0
    problem = qemu_check("qcow2", bytes(content))
    assert problem is not None and problem.startswith("qemu-img check found 8 corruptions")


def test_formats_qemu_cannot_check_are_left_alone():
    assert not applies_to("raw") and not applies_to("blockmap")
    assert qemu_check("raw", b"anything") is None


class _NotReallyQcow2:
    """A plugin registering raw under the name qcow2: qemu-img must object."""

    @staticmethod
    def driver():
        from corefmt_raw.driver import RawDriver

        class ImpostorDriver(RawDriver):
            name = "qcow2"

        return ImpostorDriver()

    from corefmt import hookimpl

    @hookimpl
    def corefmt_register(self, registry):
        registry.add_format(self.driver())


def test_stress_crash_runs_ask_qemu_img():
    from corefmt import plugins
    from corefmt.stress import StressConfig, run_seeds

    if "qcow2" in plugins.registry().formats:
        pytest.skip("a real qcow2 driver is installed; its own stress runs cover this")
    impostor = _NotReallyQcow2()
    plugins.register_plugin(impostor)
    try:
        summary = run_seeds(StressConfig(format="qcow2", crash=True), range(2))
    finally:
        plugins.unregister_plugin(impostor)
    assert summary.mismatches == 0  # the data itself is right ...
    assert summary.check_failures == 2  # ... but it is no qcow2 image

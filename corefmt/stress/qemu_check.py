"""``qemu-img check`` as a second opinion on images a stress run leaves.

For every format qemu can check, the image (as corefmt left it after a
power cut and reopen) is written to a temporary file and checked by the
reference implementation, with its backing chain cut off (``backing``:
null) so only the image's own metadata is judged. Leaks are allowed, as in
corefmt's own check; corruptions and check errors are failures, except (``copied_flags``, after
a snapshot operation was interrupted) COPIED flags that disagree with the
refcounts harmlessly (``corefmt.stress.snapshots.harmless_copied_flags``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile

from corefmt.stress.snapshots import harmless_copied_flags

#: Formats whose qemu driver implements check (qemu-img exits 63 for others).
QEMU_CHECK_FORMATS = frozenset({"qcow2", "qed", "vdi", "vhdx", "parallels"})
#: qemu-img check's exit codes.
EXIT_CLEAN = 0
EXIT_CHECK_ERRORS = 1
EXIT_CORRUPTIONS = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63
CHECK_TIMEOUT_SECONDS = 60
#: Where a qcow2 header keeps cluster_bits (a big-endian u32).
QCOW2_CLUSTER_BITS = struct.Struct(">I")
QCOW2_CLUSTER_BITS_OFFSET = 20


def qemu_img() -> str | None:
    return shutil.which("qemu-img")


def applies_to(format_name: str) -> bool:
    """Whether qemu-img can give a second opinion on this format here."""
    return format_name in QEMU_CHECK_FORMATS and qemu_img() is not None


def qemu_check(format_name: str, content: bytes, copied_flags: bool = False) -> str | None:
    """None if qemu-img finds the image consistent (leaks allowed, and with
    ``copied_flags`` harmless COPIED flags), else why not."""
    program = qemu_img()
    if format_name not in QEMU_CHECK_FORMATS or program is None:
        return None
    with tempfile.TemporaryDirectory(prefix="corefmt-qemu-check-") as folder:
        path = os.path.join(folder, f"image.{format_name}")
        with open(path, "wb") as file:
            file.write(content)
        spec = {"driver": format_name, "file": {"driver": "file", "filename": path},
                "backing": None}
        try:
            done = subprocess.run(
                [program, "check", "--output=json", "json:" + json.dumps(spec)],
                capture_output=True, text=True, timeout=CHECK_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return f"qemu-img check did not finish in {CHECK_TIMEOUT_SECONDS} s"
    if done.returncode in (EXIT_CLEAN, EXIT_LEAKS, EXIT_UNSUPPORTED):
        return None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    details = "; ".join(line for line in done.stderr.splitlines()[:3] if line)
    if (done.returncode == EXIT_CORRUPTIONS and copied_flags and format_name == "qcow2"
            and _only_harmless_flags(report, done.stderr, content)):
        return None
    if done.returncode == EXIT_CORRUPTIONS:
        return (f"qemu-img check found {report.get('corruptions', '?')} corruptions"
                + (f": {details}" if details else ""))
    return f"qemu-img check failed (exit {done.returncode}): {details or 'no message'}"


def _only_harmless_flags(report: dict[str, int], messages: str, content: bytes) -> bool:
    """Whether every corruption qemu-img reported is a harmless COPIED flag."""
    (cluster_bits,) = QCOW2_CLUSTER_BITS.unpack_from(content, QCOW2_CLUSTER_BITS_OFFSET)
    corruptions = report.get("corruptions")
    return (not report.get("check-errors") and corruptions is not None and corruptions
            == harmless_copied_flags(messages.splitlines(), 1 << cluster_bits))

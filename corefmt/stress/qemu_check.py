"""``qemu-img check`` as a second opinion on images a stress run leaves.

For every format qemu can check, the image (as corefmt left it after a
power cut and reopen) is written to a temporary file and checked by the
reference implementation, with its backing chain cut off (``backing``:
null) so only the image's own metadata is judged. Leaks are allowed, as in
corefmt's own check; corruptions and check errors are failures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

#: Formats whose qemu driver implements check (qemu-img exits 63 for others).
QEMU_CHECK_FORMATS = frozenset({"qcow2", "qed", "vdi", "vhdx", "parallels"})
#: qemu-img check's exit codes.
EXIT_CLEAN = 0
EXIT_CHECK_ERRORS = 1
EXIT_CORRUPTIONS = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63
CHECK_TIMEOUT_SECONDS = 60


def qemu_img() -> str | None:
    return shutil.which("qemu-img")


def applies_to(format_name: str) -> bool:
    """Whether qemu-img can give a second opinion on this format here."""
    return format_name in QEMU_CHECK_FORMATS and qemu_img() is not None


def qemu_check(format_name: str, content: bytes) -> str | None:
    """None if qemu-img finds the image consistent (leaks allowed), else why not."""
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
    if done.returncode == EXIT_CORRUPTIONS:
        return (f"qemu-img check found {report.get('corruptions', '?')} corruptions"
                + (f": {details}" if details else ""))
    return f"qemu-img check failed (exit {done.returncode}): {details or 'no message'}"

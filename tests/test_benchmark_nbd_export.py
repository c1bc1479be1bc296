"""benchmarks/nbd_export.py --quick runs to the end and prints every ratio:
the benchmark is run on demand, so nothing else would notice it broke."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "nbd_export.py"
CLIENTS = ("qemu-img convert", "nbdcopy", "4 KiB reads QD1", "4 KiB reads QD16")
FORMATS = ("raw", "qcow2")
#: The quick run takes about 3 s; this only stops a hang.
TIMEOUT = 60
RATIO = r"\d+\.\d\d"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(any(shutil.which(tool) is None
                           for tool in ("qemu-img", "qemu-nbd", "nbdcopy")),
                       reason="needs qemu-img, qemu-nbd and nbdcopy"),
]


def test_quick_run_prints_every_ratio(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for fmt in FORMATS:
        for client in CLIENTS:
            line = (rf"^{fmt} {re.escape(client)}: ratio corefmt/qemu-nbd {RATIO} "
                    rf"\(per repetition {RATIO} - {RATIO}; ")
            assert re.search(line, out, re.M), out
    targets = re.findall(r"; (?:meets|misses) target >= 0\.8\)$", out, re.M)
    assert len(targets) == 2 * len(FORMATS), out
    assert "content: every copy identical to the image" in out

"""benchmarks/fvd_paper.py --quick runs to the end and prints its ratios:
the benchmark is run on demand, so nothing else would notice it broke."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fvd_paper.py"
WORKLOADS = ("postmark", "random write", "seq read fresh", "seq read after 2")
#: The quick run takes about 2 s; this only stops a hang.
TIMEOUT = 60
RATIO = r"\d+\.\d\d"


def run_quick(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(workdir)],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_quick_run_prints_every_ratio(tmp_path: Path) -> None:
    result = run_quick(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for against in ("qcow2", "raw"):
        found = re.findall(rf"^  ratio fvd/{against} {RATIO} \(per repetition ", out, re.M)
        assert len(found) == len(WORKLOADS), out
    for workload in WORKLOADS:
        line = rf"^summary {re.escape(workload)} +fvd +fvd/qcow2 +{RATIO} .* fvd/raw +{RATIO} "
        assert re.search(line, out, re.M), out
    assert re.search(r"^summary postmark +fvd .*paper: fvd/qcow2 3\.49", out, re.M), out
    assert "content: every image read the same as raw" in out

"""corefmt against an older corefmt: random 4 KiB I/O through the API and a
raw convert, each tree in its own process, interleaved, same inputs.

    python3 benchmarks/api_against_commit.py --baseline HEAD~3
    python3 benchmarks/api_against_commit.py --baseline 8745448 --repeat 5

The baseline commit is checked out into a temporary git worktree; both
trees run the same workload script (printed timings only), alternating
which goes first. Printed: the median and range of each measure and the
ratio new/baseline of the medians (below 1: the new tree is faster).
Not a test: it exits 0 whatever the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPEAT = 5
DEFAULT_OPS = 20000
DEFAULT_IMAGE = 256 * 1024 * 1024
DEFAULT_CONVERT = 1024 * 1024 * 1024

#: Runs inside each tree's own process: prints one JSON line of timings.
WORKLOAD = r"""
import json, os, random, sys, time
import corefmt
from corefmt.ops.convert import convert

work = sys.argv[1]
ops, image_size, convert_size = (int(word) for word in sys.argv[2:5])
block = 4096
path = os.path.join(work, "io.raw")
corefmt.create(path, "raw", image_size)
rng = random.Random(1)
offsets = [rng.randrange(image_size // block) * block for _ in range(ops)]
payload = rng.randbytes(block)
result = {}
with corefmt.open(path, "raw") as disk:
    start = time.perf_counter()
    for offset in offsets:
        disk.write(offset, payload)
    result["write 4k ops/s"] = ops / (time.perf_counter() - start)
    buf = bytearray(block)
    start = time.perf_counter()
    for offset in offsets:
        disk.readinto(offset, buf)
    result["read 4k ops/s"] = ops / (time.perf_counter() - start)
os.unlink(path)
source = os.path.join(work, "source.raw")
target = os.path.join(work, "target.raw")
start = time.perf_counter()
convert(source, target, source_format="raw", target_format="raw", cache="unsafe")
result["convert s"] = time.perf_counter() - start
os.unlink(target)
print(json.dumps(result))
"""


def make_source(path: Path, size: int) -> None:
    """Half data in 1 MiB runs, half holes (deterministic)."""
    import random

    rng = random.Random(7)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in range(0, size, 2 * 1024 * 1024):
            handle.seek(offset)
            handle.write(rng.randbytes(1024 * 1024))


#: Third-party packages the workload imports (found in this interpreter).
DEPENDENCIES = ("pluggy", "attr", "attrs", "tqdm")


def isolated_path(tree: Path, scratch: Path) -> str:
    """A sys.path that sees only ``tree``'s corefmt and its plugins' entry
    points: the interpreter runs with -S (no site-packages, so no installed
    corefmt), its dependencies linked in, and dist-info folders made from the
    tree's own pyproject files."""
    import importlib
    import tomllib

    scratch.mkdir(parents=True, exist_ok=True)
    for name in DEPENDENCIES:
        module = importlib.import_module(name)
        link = scratch / name
        if not link.exists():
            link.symlink_to(Path(module.__file__).parent)
    for project in (tree, tree / "plugins" / "raw"):
        meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        info = scratch / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\n"
                                       f"Version: {meta['version']}\n")
        points = meta.get("entry-points", {}).get("corefmt", {})
        (info / "entry_points.txt").write_text(
            "[corefmt]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()))
    return os.pathsep.join([str(tree), str(tree / "plugins" / "raw"), str(scratch)])


def run(tree: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=isolated_path(tree, work.parent / f"path-{tree.name}"))
    done = subprocess.run([sys.executable, "-S", "-c", WORKLOAD, str(work), str(args.ops),
                           str(args.image_size), str(args.convert_size)],
                          capture_output=True, text=True, env=env, cwd=work, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD~1", help="commit to compare against")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE)
    parser.add_argument("--convert-size", type=int, default=DEFAULT_CONVERT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corefmt-bench-") as temp:
        temp_path = Path(temp)
        baseline = temp_path / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline),
                        args.baseline], check=True, capture_output=True)
        try:
            work = temp_path / "work"
            work.mkdir()
            make_source(work / "source.raw", args.convert_size)
            trees = {"new": ROOT, "baseline": baseline}
            samples: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
            for round_number in range(args.repeat):
                order = list(trees) if round_number % 2 == 0 else list(reversed(trees))
                for name in order:
                    for key, value in run(trees[name], work, args).items():
                        samples[name].setdefault(key, []).append(value)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(baseline)], capture_output=True)
    print(f"new tree vs {args.baseline}, {args.repeat} interleaved runs each")
    for key in samples["new"]:
        new, old = samples["new"][key], samples["baseline"][key]
        ratio = statistics.median(new) / statistics.median(old)
        print(f"  {key:<16} new {statistics.median(new):10.1f} ({min(new):.1f}-{max(new):.1f})"
              f"  baseline {statistics.median(old):10.1f} ({min(old):.1f}-{max(old):.1f})"
              f"  ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

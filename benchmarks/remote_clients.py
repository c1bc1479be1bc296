#!/usr/bin/env python3
"""Benchmark: several VMs over one remote base, FVD's scenario.

``--clients`` processes (default 4), each with its own FVD overlay over the
same raw base on nginx (``--s3``: in a bucket on a one-node Ceph cluster
instead), started together:

- ``clients - 1`` of them run ``corefmt prefetch`` (FVD's adaptive
  prefetch with its throttling on, as a VM's would run);
- one is a guest: it opens its overlay through the API with background
  prefetch on (the ``prefetch`` filter) and reads 4 KiB at uniformly random
  offsets for ``--seconds`` (default 4), one reader as a guest's.

Measured, ``--repeat`` times (default 3), interleaved:

- time to first read: from the guest process's start to its first read
  returning (what a VM waits before it runs);
- the prefetchers' total throughput (base bytes over the wall time until
  the last one finishes), against ``clients - 1`` plain downloads of the
  same object at the same time (1 MiB ranged GETs on urllib3 written to a
  local file, as ``curl -r`` would): target >= 0.8;
- the guest's reads per second among the prefetchers, against the same
  guest alone (its own prefetch on, no other client): target >= 0.8.

Every prefetched overlay, opened without its base, is compared with the
base (``corefmt compare``), so wrong data cannot look fast. Exits 0 whatever the timings, 1 when an
overlay is wrong or a client fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.qcow2_benchlib import COREFMT_CLI, KiB, MiB, load_line

READ_SIZE = 4 * KiB
DOWNLOAD_CHUNK = 1 * MiB
TARGET = 0.8
GUEST, DOWNLOAD = "--guest", "--download"


# -- the children ------------------------------------------------------------------------
def guest(overlay: str, seconds: float, started: float, allow: str) -> None:
    """Random 4 KiB reads; prints JSON: first-read seconds, reads/s."""
    import corefmt

    spec = {"driver": "prefetch", "file": {"driver": "fvd", "file": overlay}}
    with corefmt.open(spec, allow_protocols=[allow]) as node:
        rng = random.Random(1)
        slots = node.virtual_size // READ_SIZE
        buf = bytearray(READ_SIZE)
        node.readinto(rng.randrange(slots) * READ_SIZE, buf)
        first = time.time() - started
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            node.readinto(rng.randrange(slots) * READ_SIZE, buf)
            count += 1
        rate = count / (time.perf_counter() - began)
    print(json.dumps({"first_read": first, "reads_per_second": rate}))


def download(url: str, out: str, size: int) -> None:
    """The plain client: the whole object in 1 MiB ranged GETs to a file."""
    import urllib3

    pool = urllib3.PoolManager()
    with open(out, "wb") as target:
        for offset in range(0, size, DOWNLOAD_CHUNK):
            end = min(offset + DOWNLOAD_CHUNK, size) - 1
            answer = pool.request("GET", url, headers={"Range": f"bytes={offset}-{end}"})
            if answer.status != 206:
                raise SystemExit(f"HTTP {answer.status}")
            target.write(answer.data)


# -- the runs ----------------------------------------------------------------------------
def _python(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *args]


def _wait_all(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a client failed: {err.strip()[-500:]}")
        outputs.append(out)
    return outputs


def fresh_overlays(work: Path, url: str, count: int, env: dict[str, str]) -> list[str]:
    overlays = []
    for index in range(count):
        path = work / f"vm{index}.fvd"
        path.unlink(missing_ok=True)
        subprocess.run([*COREFMT_CLI, "create", "-q", "-f", "fvd", "-b", url, "-F", "raw",
                        "-o", "block_size=64k", str(path)], check=True, env=env)
        overlays.append(str(path))
    return overlays


def run_downloads(work: Path, url: str, size: int, count: int, env: dict[str, str]) -> float:
    """Total MiB/s of ``count`` plain downloads at once."""
    began = time.perf_counter()
    processes = [subprocess.Popen(_python(DOWNLOAD, url, str(work / f"dl{index}"), str(size)),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for index in range(count)]
    _wait_all(processes)
    elapsed = time.perf_counter() - began
    for index in range(count):
        (work / f"dl{index}").unlink()
    return count * size / MiB / elapsed


def run_mixed(work: Path, url: str, size: int, clients: int, seconds: float,
              env: dict[str, str], allow: str, check: Callable[[str], bool]
              ) -> tuple[float, dict]:
    """Prefetchers' total MiB/s and the guest's figures, all at once."""
    overlays = fresh_overlays(work, url, clients, env)
    began = time.perf_counter()
    prefetchers = [subprocess.Popen([*COREFMT_CLI, "prefetch", "--allow-protocol", allow,
                                     overlay], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for overlay in overlays[1:]]
    guest_run = subprocess.Popen(_python(GUEST, overlays[0], str(seconds), str(time.time()),
                                         allow), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    _wait_all(prefetchers)
    elapsed = time.perf_counter() - began
    (figures,) = [json.loads(out) for out in _wait_all([guest_run])]
    if not all(check(overlay) for overlay in overlays[1:]):
        raise SystemExit("a prefetched overlay differs from the base")
    return (clients - 1) * size / MiB / elapsed, figures


def run_alone(work: Path, url: str, seconds: float, env: dict[str, str], allow: str) -> dict:
    (overlay,) = fresh_overlays(work, url, 1, env)
    process = subprocess.Popen(_python(GUEST, overlay, str(seconds), str(time.time()), allow),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    (out,) = _wait_all([process])
    return json.loads(out)


def _line(name: str, values: list[float], unit: str) -> str:
    return (f"  {name:<44}{statistics.median(values):>10.2f} {unit:<8}"
            f"({min(values):.2f} - {max(values):.2f})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [GUEST]:
        guest(argv[1], float(argv[2]), float(argv[3]), argv[4])
        return 0
    if argv[:1] == [DOWNLOAD]:
        download(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256 * MiB, help="base size in bytes")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="the base in a Ceph bucket")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 s, 2 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.seconds, args.repeat = 64 * MiB, 2.0, 2
    from tests.remote.ceph import ceph_available, ceph_rgw
    from tests.remote.servers import nginx_binary, nginx_serving

    if nginx_binary() is None or (args.s3 and ceph_available() is not None):
        print("needs nginx (and Ceph with --s3)", file=sys.stderr)
        return 0
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=parent, prefix="remote-clients-") as folder, \
            contextlib.ExitStack() as servers:
        work = Path(folder)
        (work / "root").mkdir()
        base = work / "root" / "base.raw"
        with open(base, "wb") as out:
            for _ in range(args.size // MiB):
                out.write(os.urandom(MiB))

        def check(overlay: str) -> bool:
            """The overlay alone (no base: the prefetch completed) holds the base."""
            return subprocess.run(
                [*COREFMT_CLI, "compare", "--image-opts",
                 f"driver=fvd,file.filename={overlay},backing=",
                 f"driver=raw,file.filename={base}"],
                capture_output=True, env=env).returncode == 0

        nginx = servers.enter_context(nginx_serving(work))
        url, allow = nginx.url("base.raw"), "http"
        plain = url  # what the plain downloads fetch
        if args.s3:
            rgw = servers.enter_context(ceph_rgw(work / "ceph"))
            rgw.create_bucket("bench")
            rgw.put("bench", "base.raw", base)
            env.update(rgw.env())
            os.environ.update(env)  # the presigning below reads the keys from there
            from corefmt.storage.s3 import S3StorageDriver

            url, allow = "s3://bench/base.raw", "s3"
            plain = S3StorageDriver().target(url).wire("GET")
        downloads, prefetch, guest_mixed, guest_alone, first_mixed, first_alone = \
            [], [], [], [], [], []
        for repetition in range(args.repeat):
            steps = ["downloads", "mixed", "alone"]
            steps = steps[repetition % 3:] + steps[:repetition % 3]
            for step in steps:
                if step == "downloads":
                    downloads.append(run_downloads(work, plain, args.size, args.clients - 1,
                                                   env))
                elif step == "mixed":
                    rate, figures = run_mixed(work, url, args.size, args.clients,
                                              args.seconds, env, allow, check)
                    prefetch.append(rate)
                    guest_mixed.append(figures["reads_per_second"])
                    first_mixed.append(figures["first_read"])
                else:
                    figures = run_alone(work, url, args.seconds, env, allow)
                    guest_alone.append(figures["reads_per_second"])
                    first_alone.append(figures["first_read"])
    where = "Ceph RGW (s3)" if args.s3 else "nginx"
    print(f"{args.clients} clients over one {args.size // MiB} MiB raw base on {where}, "
          f"{args.repeat} repetitions; {load_line()}")
    print(_line(f"{args.clients - 1} plain downloads at once, total", downloads, "MiB/s"))
    print(_line(f"{args.clients - 1} prefetches at once, total", prefetch, "MiB/s"))
    print(_line("guest among them: random 4 KiB reads", guest_mixed, "reads/s"))
    print(_line("guest alone: random 4 KiB reads", guest_alone, "reads/s"))
    print(_line("time to first read among them", first_mixed, "s"))
    print(_line("time to first read alone", first_alone, "s"))
    for name, ours, theirs in (("prefetch/plain downloads", prefetch, downloads),
                               ("guest among them/alone", guest_mixed, guest_alone)):
        ratio = statistics.median(ours) / statistics.median(theirs)
        verdict = "meets" if ratio >= TARGET else "misses"
        print(f"{name}: {ratio:.2f} ({verdict} target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

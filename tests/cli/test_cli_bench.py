"""`corefmt bench` against `qemu-img bench` 7.2 (the reference) on the same
raw and qcow2 images: the same lines (timings aside), messages and exit
codes, and the requests where qemu's bench sends them: written images
compared with the ones qemu-img bench writes, flushes and requests in
flight counted on the node corefmt opened."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from corefmt_cli_helpers import QEMU_IMG

from corefmt.block.chain import open_chain
from corefmt.cli.main import main
from corefmt.ops import bench as bench_op

pytestmark = pytest.mark.interop

IMAGE_SIZE = 1024 * 1024
FORMATS = ("raw", "qcow2")
TIMING = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$", re.MULTILINE)
TRY_HELP = re.compile(r"^Try '.*--help' for more information$")
STRACE = shutil.which("strace")


def qemu_img(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG or "qemu-img", *map(str, args)], capture_output=True,
                          text=True, timeout=60, check=False, env={"LC_ALL": "C"}, cwd=cwd)


def corefmt(*args: str | Path, cwd: Path | None = None) -> tuple[int, str, str]:
    """corefmt in this process (dozens of runs: no interpreter start each)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            contextlib.chdir(cwd or Path.cwd()):
        status = main([*map(str, args)])
    return status, out.getvalue(), err.getvalue()


def image(directory: Path, fmt: str, name: str = "x") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.{fmt}"
    assert qemu_img("create", "-q", "-f", fmt, path, str(IMAGE_SIZE)).returncode == 0
    return path


def shown(stdout: str) -> str:
    return TIMING.sub("Run completed in T seconds.", stdout)


def messages(stderr: str, program: str) -> list[str]:
    return [line.removeprefix(f"{program}: ") for line in stderr.splitlines()
            if not TRY_HELP.match(line)]


def both(tmp_path: Path, fmt: str, *args: str) -> tuple[tuple, tuple]:
    """Each tool on its own fresh image made by qemu-img, named alike (messages
    name it); (status, stdout, messages)."""
    ours, theirs = tmp_path / "corefmt", tmp_path / "qemu"
    name = image(ours, fmt).name
    image(theirs, fmt)
    status, out, err = corefmt("bench", *args, name, cwd=ours)
    qemu = qemu_img("bench", *args, name, cwd=theirs)
    return ((status, shown(out), messages(err, "corefmt")),
            (qemu.returncode, shown(qemu.stdout), messages(qemu.stderr, "qemu-img")))


RUNS = [
    ("-c", "100"),
    ("-c", "64", "-d", "1"),
    ("-c", "50", "-d", "8", "-o", "1000", "-s", "512", "-S", "8k"),
    ("-c", "0x20", "-d", "010", "-o", "1.5k", "-s", "1k", "-S", "0"),
    ("-c", "30", "-s", "64k", "-o", "960k"),  # wraps past the end to 0
    ("-c", "40", "-d", "4", "-w", "--pattern=0xab"),
    ("-c", "40", "-d", "4", "-w", "--flush-interval=8"),
    ("-c", "40", "-d", "4", "-w", "--flush-interval=4", "--no-drain"),
    ("-c", "10", "-t", "none", "-n"),
    ("-c", "10", "-t", "directsync", "-w", "-i", "io_uring"),
    ("-c", "10", "-t", "unsafe", "-w", "-q"),
    ("-c", "10", "-U"),
    ("-c", "3", "-o", "1048575", "-s", "1"),
    ("-c", "0", "-d", "0"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("args", RUNS, ids=" ".join)
def test_same_lines_as_qemu_img(tmp_path: Path, fmt: str, args: tuple[str, ...]) -> None:
    ours, theirs = both(tmp_path, fmt, "-f", fmt, *args)
    assert ours == theirs
    assert ours[0] == 0


REFUSALS = [
    ("-c", "-1"), ("-c", "abc"), ("-c", "2147483648"), ("-c", "5 "), ("-c", ""),
    ("-d", "x"), ("-d", "-1"),
    ("-o", "-1"), ("-o", "1x"), ("-o", "8E"), ("-o", "1e3"),
    ("-s", "2G"), ("-s", "-1"), ("-S", "3G"), ("-S", "z"),
    ("-w", "--pattern=256"), ("-w", "--pattern=0x"), ("-w", "--pattern=0777"),
    ("--pattern", "-w"),
    ("-w", "--flush-interval=x"), ("--flush-interval=4",),
    ("-w", "--flush-interval=8", "-d", "16"),
    ("-t", "bogus"), ("-i", "bogus"), ("-n",), ("-i", "native"),
    ("-x",), ("-wx",), ("-xw",), ("--bogus",), ("--f",), ("--no-drain=1",), ("--object", "o"),
    ("-c",), ("--pattern",), ("extra",), ("-c", "1", "--", "-w"),
    ("-w", "-U"),
    ("-c", "2", "-s", "1M", "-S", "1M", "-o", "1"),  # the first request crosses the end
    ("-c", "1", "-o", "2M"),  # starts past the end
]


@pytest.mark.parametrize("args", REFUSALS, ids=" ".join)
def test_refusals_as_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    (status, out, err), (qemu_status, qemu_out, qemu_err) = both(tmp_path, "raw", "-f", "raw",
                                                                 *args)
    assert (status, out) == (qemu_status, qemu_out)
    assert status == 1
    if "-U" in args:  # qemu names the image first ("Could not open 'x': ..."); corefmt not
        assert err[0] in qemu_err[0]
    else:
        assert err == qemu_err


def test_options_after_the_filename_and_long_prefixes(tmp_path: Path) -> None:
    path = image(tmp_path, "raw")
    status, out, _ = corefmt("bench", "-f", "raw", path, "-c", "3", "--pat=7", "-w", "--no-d",
                             "-d2")
    assert status == 0
    assert out.splitlines()[0] == ("Sending 3 write requests, 4096 bytes each, 2 in parallel "
                                   "(starting at offset 0, step size 4096)")
    assert qemu_img("compare", "-f", "raw", "-F", "raw", path, path).returncode == 0


def test_help(tmp_path: Path) -> None:
    status, out, _ = corefmt("bench", "-h")
    assert status == 0 and out.startswith("usage: corefmt bench")


def _wrapping_options() -> tuple[str, ...]:
    """A run that wraps at the image size three times and never crosses the
    end; unaligned offsets, lengths and steps."""
    count, size, step, offset = 50, 3000, 70001, 1000
    offsets = list(bench_op.request_offsets(offset, step, IMAGE_SIZE, count))
    assert all(start + size <= IMAGE_SIZE for start in offsets)
    assert sum(1 for a, b in itertools.pairwise(offsets) if b < a) == 3
    return ("-c", str(count), "-s", str(size), "-S", str(step), "-o", str(offset))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("depth", ["1", "16"])
def test_writes_land_where_qemu_img_writes_them(tmp_path: Path, fmt: str, depth: str) -> None:
    args = ("-f", fmt, "-w", "--pattern=0xab", "-d", depth, *_wrapping_options())
    ours, theirs = image(tmp_path, fmt, "ours"), image(tmp_path, fmt, "theirs")
    assert corefmt("bench", *args, ours)[0] == 0
    assert qemu_img("bench", *args, theirs).returncode == 0
    compared = qemu_img("compare", "-f", fmt, "-F", fmt, ours, theirs)
    assert compared.returncode == 0, compared.stdout
    if fmt == "qcow2":
        assert qemu_img("check", ours).returncode == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_failing_request_stops_the_run_as_qemu_img(tmp_path: Path, fmt: str) -> None:
    """Depth 1: the requests before the one that crosses the end are written.
    qemu's reference is its raw image: qemu-img bench exits without closing
    the image, so a qcow2 one keeps none of its writes (the L2 updates were
    still in its cache); corefmt closes the image and keeps them."""
    args = ("-w", "--pattern=0x5a", "-d", "1", "-c", "20", "-s", "100000",
            "-S", "320000", "-o", "5")  # 5, 320005, 640005, then 960005 crosses the end
    ours, theirs = image(tmp_path, fmt, "ours"), image(tmp_path, "raw", "theirs")
    status, out, err = corefmt("bench", "-f", fmt, *args, ours)
    qemu = qemu_img("bench", "-f", "raw", *args, theirs)
    assert (status, shown(out), messages(err, "corefmt")) == \
        (qemu.returncode, shown(qemu.stdout), messages(qemu.stderr, "qemu-img"))
    assert messages(err, "corefmt") == ["Failed request: Input/output error"]
    assert qemu_img("compare", "-f", fmt, "-F", "raw", ours, theirs).returncode == 0
    assert theirs.read_bytes()[640005:740005] == b"\x5a" * 100000


class Recorder:
    """Wraps an open node's requests: the order they start in, and how many
    run at once (each holds its worker a moment, so the queue fills up)."""

    HOLD = 0.002

    def __init__(self, node):
        self.node = node
        self.events: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.in_flight_at_flush: list[int] = []
        self._lock = threading.Lock()
        for name in ("readinto", "write"):
            setattr(node, name, self._wrap(name, getattr(node, name)))
        flush = node.flush

        def counted_flush() -> None:
            with self._lock:
                self.events.append(("flush", 0))
                self.in_flight_at_flush.append(self.in_flight)
            flush()

        node.flush = counted_flush

    def _wrap(self, name, request):
        def wrapped(offset, buf, *args):
            with self._lock:
                self.events.append((name, offset))
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                time.sleep(self.HOLD)
                return request(offset, buf, *args)
            finally:
                with self._lock:
                    self.in_flight -= 1
        return wrapped


def qemu_flushes(args: tuple[str, ...], path: Path) -> int:
    """fdatasync calls of a qemu-img bench run (drained flushes are never
    merged by qemu's block layer: nothing else is in flight)."""
    trace = path.with_suffix(".strace")
    subprocess.run([STRACE, "-f", "-qq", "-e", "trace=fdatasync", "-o", str(trace),
                    QEMU_IMG or "qemu-img", "bench", *args, str(path)],
                   capture_output=True, check=True, timeout=60)
    return trace.read_text().count("fdatasync(")


@pytest.mark.parametrize("fmt", FORMATS)
def test_depth_requests_in_flight(tmp_path: Path, fmt: str) -> None:
    with open_chain(str(image(tmp_path, fmt)), fmt, read_only=True) as node:
        recorder = Recorder(node)
        result = bench_op.run_bench(node, count=48, depth=6, offset=4096, step=24576)
    assert recorder.most_in_flight == 6
    assert [offset for _, offset in recorder.events] == \
        [(4096 + k * 24576) % IMAGE_SIZE for k in range(48)]  # wraps once
    assert result.requests == 48 and result.flushes == 0


def test_flush_interval_drains_then_flushes(tmp_path: Path) -> None:
    path = image(tmp_path, "raw")
    with open_chain(str(path), "raw") as node:
        recorder = Recorder(node)
        result = bench_op.run_bench(node, count=100, depth=4, write=True, flush_interval=8)
    flushes = [index for index, (name, _) in enumerate(recorder.events) if name == "flush"]
    # a flush each time the requests not yet sent reach a multiple of 8 (96 ... 8, 0),
    # with none in flight
    assert result.flushes == len(flushes) == 13
    assert recorder.in_flight_at_flush == [0] * 13
    assert [flushes[0], *(b - a - 1 for a, b in itertools.pairwise(flushes))] == [4] + [8] * 12
    assert recorder.most_in_flight == 4
    if STRACE:
        qemu_path = image(tmp_path, "raw", "theirs")
        assert qemu_flushes(("-f", "raw", "-c", "100", "-d", "4", "-w",
                             "--flush-interval=8"), qemu_path) == 13


def test_no_drain_flushes_beside_requests(tmp_path: Path) -> None:
    with open_chain(str(image(tmp_path, "raw")), "raw") as node:
        recorder = Recorder(node)
        result = bench_op.run_bench(node, count=100, depth=4, write=True, flush_interval=8,
                                    drain=False)
    # 96, 88 ... 8 not yet sent, then the last 4 completions (0 not yet sent)
    assert result.flushes == 16
    assert max(recorder.in_flight_at_flush) > 0
    assert recorder.most_in_flight == 4


def test_writethrough_writes_are_fua(tmp_path: Path) -> None:
    path = image(tmp_path, "raw")
    log = tmp_path / "requests.log"
    status, _, _ = corefmt("bench", "--image-opts", "-w", "-c", "5", "-d", "2", "-t",
                           "writethrough",
                           f"driver=log,path={log},file.driver=raw,file.file.filename={path}")
    assert status == 0
    writes = [line for line in log.read_text().splitlines() if line.startswith("write")]
    assert len(writes) == 5 and all("flags=FUA" in line for line in writes)


def test_python_api(tmp_path: Path) -> None:
    import corefmt

    path = image(tmp_path, "qcow2")
    result = corefmt.bench(str(path), "qcow2", count=20, depth=4, write=True, pattern=0xcd,
                           flush_interval=5, buffer_size=512)
    assert (result.requests, result.flushes, result.bytes) == (20, 4, 20 * 512)
    assert result.elapsed > 0
    with corefmt.open(str(path), "qcow2", read_only=True) as node:
        assert node.read(0, 20 * 512) == b"\xcd" * (20 * 512)

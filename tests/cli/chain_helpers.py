"""Helpers for the chain verbs' tests (rebase, commit, stream): chains made by
qemu-img, corefmt run in-process or as a child, and what a chain looks like
to qemu-img (content, map without host offsets, check, backing)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from corefmt.cli.main import main

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
ENV = {**os.environ, "LC_ALL": "C"}
MIB = 1024 * 1024


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A qemu program; output decoded without newline translation (-p's \\r)."""
    result = subprocess.run([*map(str, args)], capture_output=True, env=ENV, cwd=cwd,
                            check=False)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def qemu_img(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run(QEMU_IMG or "qemu-img", *args, cwd=cwd)


def qemu_io(image: Path, *commands: str, fmt: str | None = None) -> None:
    words: list[str] = [*(("-f", fmt) if fmt else ())]
    for command in commands:
        words += ["-c", command]
    result = run(QEMU_IO or "qemu-io", *words, image)
    assert result.returncode == 0, result.stderr


def corefmt(*args: str | Path, cwd: Path | None = None) -> tuple[int, str, str]:
    """corefmt's CLI in this process (fast): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([*map(str, args)])
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def messages(text: str) -> list[str]:
    """Error lines without the program's name and qemu-img's usage hint."""
    lines = []
    for line in text.splitlines():
        if line.startswith("Try 'qemu-img --help'"):
            continue
        for prefix in ("qemu-img: ", "corefmt: "):
            line = line.removeprefix(prefix)
        lines.append(line)
    return lines


def layout(image: Path, fmt: str | None = None) -> list[tuple]:
    """qemu-img map --output=json without host offsets and file names:
    (start, length, depth, present, zero, data) runs."""
    result = qemu_img("map", "--output=json", *(("-f", fmt) if fmt else ()), image)
    assert result.returncode == 0, result.stderr
    runs: list[tuple] = []
    for entry in json.loads(result.stdout):
        key = (entry["depth"], entry["present"], entry["zero"], entry["data"])
        if runs and runs[-1][2:] == key and runs[-1][0] + runs[-1][1] == entry["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + entry["length"], *key)
        else:
            runs.append((entry["start"], entry["length"], *key))
    return runs


def backing_of(image: Path) -> tuple[str | None, str | None]:
    info = json.loads(qemu_img("info", "--output=json", "-U", image).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


def same_content(image: Path, reference: Path, fmt: str | None = None) -> bool:
    """qemu-img compare (which opens the chain) says the guest views match."""
    result = qemu_img("compare", *(("-f", fmt) if fmt else ()), "-F", "raw", image, reference)
    return result.returncode == 0


def content_via_corefmt(image: Path, target: Path) -> None:
    """A raw copy of what corefmt reads (chains qemu cannot open: FVD)."""
    status, _out, err = corefmt("convert", "-O", "raw", image, target)
    assert status == 0, err


def check_clean(image: Path) -> None:
    result = qemu_img("check", image)
    assert result.returncode == 0, result.stdout + result.stderr


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def run_time(args: list[str], directory: Path) -> float:
    """Seconds corefmt ``args`` takes on a copy of ``directory``: the kill
    tests draw their delays within it, so a kill lands before the run ends
    however fast the machine is (a fixed bound let quick runs finish first)."""
    copy = copy_tree(directory, directory.with_name(directory.name + "-timing"))
    started = time.monotonic()
    status = corefmt(*args, cwd=copy)[0]
    elapsed = time.monotonic() - started
    shutil.rmtree(copy)
    assert status == 0
    return elapsed


def kill_at_random(args: list[str], cwd: Path, rng: random.Random,
                   longest: float) -> int | None:
    """Run corefmt as a child and SIGKILL it after a random delay (None: it
    finished first; else the signal)."""
    child = subprocess.Popen([sys.executable, "-m", "corefmt.cli.main", *args], cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    time.sleep(rng.uniform(0, longest))
    if child.poll() is not None:
        return None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return signal.SIGKILL


def scattered_writes(image: Path, size: int, count: int, pattern: int, rng: random.Random,
                     fmt: str | None = None, unit: int = 64 * 1024) -> None:
    """``count`` writes of 1..4 units at random unit-aligned places."""
    commands = []
    for _ in range(count):
        length = rng.randint(1, 4) * unit
        offset = rng.randrange(0, size - length, unit)
        commands.append(f"write -P {pattern} {offset} {length}")
    qemu_io(image, *commands, fmt=fmt)


def three_layer_chain(directory: Path, size: int, rng: random.Random, mid_writes: int,
                      top_writes: int) -> None:
    """base.raw (empty) <- mid.qcow2 <- top.qcow2, each overlay with
    scattered writes, and ref.raw: what top.qcow2 reads (the interrupted
    rebase and stream tests' chain)."""
    qemu_img("create", "-q", "-f", "raw", directory / "base.raw", str(size))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             directory / "mid.qcow2")
    scattered_writes(directory / "mid.qcow2", size, mid_writes, 2, rng)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             directory / "top.qcow2")
    scattered_writes(directory / "top.qcow2", size, top_writes, 3, rng)
    qemu_img("convert", "-O", "raw", directory / "top.qcow2", directory / "ref.raw")

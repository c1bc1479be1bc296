"""``corefmt io``: qemu-io's command syntax, so one test script drives both.

Supported: read, write (-P, -z, -u, -q, -v), zero, discard, flush, map,
alloc, length, info, truncate. Messages and exit status follow qemu-io:
a command that fails prints "<cmd> failed: <reason>" and the run exits 1.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from typing import TextIO

from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError, RangeError, ReadOnlyError
from corefmt.sizes import io_size, parse_size

DEFAULT_PATTERN = 0xCD
HEXDUMP_WIDTH = 16


class CommandError(Exception):
    """A command that failed; the message is printed, the run goes on."""


class _Args:
    """Tiny getopt for qemu-io's flag syntax (-P 0xab, -q, ...)."""

    def __init__(self, words: list[str], with_value: str, flags: str):
        self.options: dict[str, str | bool] = {}
        self.positional: list[str] = []
        index = 0
        while index < len(words):
            word = words[index]
            if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
                for position, letter in enumerate(word[1:], start=1):
                    if letter in with_value:
                        value = word[position + 1:]
                        if not value:
                            index += 1
                            if index >= len(words):
                                raise CommandError(f"option requires an argument -- '{letter}'")
                            value = words[index]
                        self.options[letter] = value
                        break
                    if letter not in flags:
                        raise CommandError(f"invalid option -- '{letter}'")
                    self.options[letter] = True
            else:
                self.positional.append(word)
            index += 1


def _number(text: str) -> int:
    try:
        return parse_size(text)
    except CorefmtError:
        raise CommandError(
            f"non-numeric argument, or extraneous/unrecognized suffix -- {text}"
        ) from None


def _pattern(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise CommandError(f"non-numeric pattern -- {text}") from None
    return value & 0xFF


def _rate_line(count: int, ops: int, elapsed: float) -> str:
    elapsed = max(elapsed, 1e-9)
    if elapsed >= 3600:
        clock = time.strftime("%H:%M:%S", time.gmtime(elapsed))
    elif elapsed >= 60:
        clock = f"{int(elapsed // 60):02d}:{elapsed % 60:05.2f}"
    else:
        clock = f"{elapsed:05.2f} sec"
    return (f"{io_size(count)}, {ops} ops; {clock} "
            f"({io_size(count / elapsed)}/sec and {ops / elapsed:.4f} ops/sec)")


class IoSession:
    def __init__(self, node: BlockNode, out: TextIO = sys.stdout):
        self.node = node
        self.out = out
        self._verification_failed = False
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "read": self.read, "write": self.write, "zero": self.zero,
            "discard": self.discard, "flush": self.flush, "map": self.map,
            "alloc": self.alloc, "length": self.length, "info": self.info,
            "truncate": self.truncate,
        }

    def run(self, line: str) -> bool:
        """Run one command line; False if it failed."""
        try:
            words = shlex.split(line)
        except ValueError as error:
            self._print(f"Parsing error: {error}")
            return False
        if not words:
            return True
        name, arguments = words[0], words[1:]
        command = self.commands.get(name)
        if command is None:
            self._print(f"command \"{name}\" not found")
            return False
        self._verification_failed = False
        try:
            command(arguments)
        except CommandError as error:
            self._print(f"Parsing error: {error}" if "argument" in str(error) else str(error))
            return False
        except ReadOnlyError:
            self._print(f"{name} failed: Block node is read-only")
            return False
        except RangeError:
            self._print(f"{name} failed: Input/output error")
            return False
        except CorefmtError as error:
            self._print(f"{name} failed: {error}")
            return False
        return not self._verification_failed

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")

    def _range(self, args: _Args, name: str) -> tuple[int, int]:
        if len(args.positional) != 2:
            raise CommandError(f"{name}: expected 'offset length'")
        return _number(args.positional[0]), _number(args.positional[1])

    def _report(self, verb: str, offset: int, length: int, started: float, quiet: bool) -> None:
        if quiet:
            return
        self._print(f"{verb} {length}/{length} bytes at offset {offset}")
        self._print(_rate_line(length, 1, time.perf_counter() - started))

    # -- commands -----------------------------------------------------------------
    def read(self, words: list[str]) -> None:
        args = _Args(words, "Psl", "Cqvab")
        offset, length = self._range(args, "read")
        started = time.perf_counter()
        data = self.node.read(offset, length)
        if "P" in args.options:
            pattern = _pattern(str(args.options["P"]))
            check_start = _number(str(args.options.get("s", "0")))
            check_length = _number(str(args.options.get("l", str(length - check_start))))
            expected = bytes([pattern]) * check_length
            if data[check_start:check_start + check_length] != expected:
                self._print(f"Pattern verification failed at offset {offset + check_start}, "
                            f"{check_length} bytes")
                self._verification_failed = True
        if args.options.get("v"):
            self._hexdump(offset, data)
        self._report("read", offset, length, started, bool(args.options.get("q")))

    def _hexdump(self, offset: int, data: bytes) -> None:
        for start in range(0, len(data), HEXDUMP_WIDTH):
            row = data[start:start + HEXDUMP_WIDTH]
            hexes = " ".join(f"{byte:02x}" for byte in row)
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
            self._print(f"{offset + start:08x}:  {hexes:<47}  {text}")

    def write(self, words: list[str]) -> None:
        args = _Args(words, "Ps", "bcCfnquz")
        offset, length = self._range(args, "write")
        started = time.perf_counter()
        if args.options.get("z"):
            if "P" in args.options:
                raise CommandError("-z and -P cannot be specified at the same time")
            self.node.write_zeroes(offset, length, unmap=bool(args.options.get("u")))
        else:
            pattern = _pattern(str(args.options.get("P", DEFAULT_PATTERN)))
            self.node.write(offset, bytes([pattern]) * length)
        self._report("wrote", offset, length, started, bool(args.options.get("q")))

    def zero(self, words: list[str]) -> None:
        self.write(["-z", *words])

    def discard(self, words: list[str]) -> None:
        args = _Args(words, "", "Cq")
        offset, length = self._range(args, "discard")
        started = time.perf_counter()
        self.node.discard(offset, length)
        self._report("discard", offset, length, started, bool(args.options.get("q")))

    def flush(self, words: list[str]) -> None:
        self.node.flush()

    def truncate(self, words: list[str]) -> None:
        args = _Args(words, "m", "")
        if len(args.positional) != 1:
            raise CommandError("truncate: expected 'offset'")
        self.node.truncate(_number(args.positional[0]))

    def length(self, words: list[str]) -> None:
        self._print(io_size(self.node.virtual_size))

    def info(self, words: list[str]) -> None:
        self._print(f"format name: {self.node.format_name}")
        self._print(f"cluster size: {io_size(self.node._image.cluster_size or 0)}")
        self._print("vm state offset: 0 bytes")

    def _allocated_run(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether [offset, ...) is allocated anywhere in the chain, and how far."""
        first = None
        run = 0
        for extent in self.node.block_status(offset, length):
            allocated = extent.node is not None
            if first is None:
                first = allocated
            elif allocated != first:
                break
            run += extent.length
        return bool(first), run

    def alloc(self, words: list[str]) -> None:
        args = _Args(words, "", "")
        if not args.positional:
            raise CommandError("alloc: expected 'offset [count]'")
        offset = _number(args.positional[0])
        count = _number(args.positional[1]) if len(args.positional) > 1 else 512
        size = self.node.virtual_size
        if offset + count > size:
            raise CommandError(f"Offset {offset} + count {count} beyond end of image")
        allocated = 0
        position = offset
        while position < offset + count:
            is_allocated, run = self._allocated_run(position, offset + count - position)
            if is_allocated:
                allocated += run
            position += run
        self._print(f"{allocated}/{count} bytes allocated at offset {io_size(offset)}")

    def map(self, words: list[str]) -> None:
        size = self.node.virtual_size
        position = 0
        while position < size:
            allocated, run = self._allocated_run(position, size - position)
            state = "   " if allocated else "not"
            self._print(f"{io_size(run)} ({run:#x}) bytes {state} allocated at offset "
                        f"{io_size(position)} ({position:#x})")
            position += run


def run_commands(node: BlockNode, commands: list[str], out: TextIO = sys.stdout) -> int:
    """Run qemu-io commands in order; exit status 1 if any failed."""
    session = IoSession(node, out)
    failed = False
    for command in commands:
        if not session.run(command):
            failed = True
    return 1 if failed else 0

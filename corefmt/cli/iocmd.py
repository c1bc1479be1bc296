"""``corefmt io``: qemu-io's command syntax, so one test script drives both.

Supported: read, write (-P, -z, -u, -s, -q, -v, -C, ...), discard, flush,
map, alloc, length, info, truncate (and their one-letter aliases), plus
``zero`` (corefmt's shorthand for ``write -z``). Parsing, messages, the
stream each message goes to and the exit status follow qemu-io 7.2: the
command line is split on spaces (no quoting), options are read with GNU
getopt rules, numbers with qemu_strtosz rules, and a failed command makes
the run exit 1 while the following commands still run.
"""

from __future__ import annotations

import errno
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import attrs

from corefmt.block.node import BlockNode
from corefmt.errors import (
    CorefmtError,
    InvalidRequest,
    NotSupported,
    RangeError,
    ReadOnlyError,
    error_reason,
)
from corefmt.flags import RequestFlags

PROGRAM = "corefmt"
DEFAULT_PATTERN = 0xCD
HEXDUMP_WIDTH = 16
SECTOR_SIZE = 512
#: qemu's BDRV_REQUEST_MAX_BYTES: the longest single request qemu-io issues.
REQUEST_MAX_BYTES = 2147483136
INT64_MAX = 2**63 - 1
_U64 = 2**64
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
ZERO_CHUNK = 1024 * 1024


class CommandFailed(Exception):
    """A command failed; ``message`` (if any) goes to stdout, as qemu-io prints it."""

    def __init__(self, message: str | None = None):
        super().__init__(message or "")
        self.message = message


class CommandStderr(Exception):
    """A command failed with a message qemu-io writes to stderr (with its
    program-name prefix unless ``prefix`` is False)."""

    def __init__(self, message: str, prefix: bool = True):
        super().__init__(message)
        self.prefix = prefix


class UsageFailure(Exception):
    """getopt refused an option: its message to stderr, then the usage line."""


# Backwards-compatible name: a failure whose message is printed to stdout.
CommandError = CommandFailed


# -- qemu's number parsing ---------------------------------------------------------
_SPACES = " \t\n\v\f\r"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_SUFFIXES = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_FRACTION_RE = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")


def _skip_space_and_sign(text: str, position: int) -> tuple[int, bool]:
    """What C's strtol family skips first: white space, then one sign."""
    while position < len(text) and text[position] in _SPACES:
        position += 1
    negative = position < len(text) and text[position] == "-"
    if position < len(text) and text[position] in "+-":
        position += 1
    return position, negative


def _strtoull(text: str, start: int, base: int) -> tuple[int, int, bool]:
    """C strtoull: (value, end index, overflowed); end == start when nothing parsed."""
    position, negative = _skip_space_and_sign(text, start)
    if (base == 16 and text[position:position + 2] in ("0x", "0X")
            and position + 2 < len(text) and text[position + 2] in _HEX_DIGITS):
        position += 2
    digits = _HEX_DIGITS if base == 16 else "0123456789"
    first = position
    while position < len(text) and text[position] in digits:
        position += 1
    if position == first:
        return 0, start, False
    value = int(text[first:position], base)
    if value >= _U64:
        return _U64 - 1, position, True
    if negative:
        value = (-value) % _U64
    return value, position, False


def _strtosz(text: str) -> int:
    """qemu_strtosz (cutils.c, qemu 7.2) for a whole string; errno-style result.

    Returns the value, or -EINVAL / -ERANGE.
    """
    value, end, overflow = _strtoull(text, 0, 10)
    if end == 0 and not overflow:
        return -errno.EINVAL
    if overflow:
        return -errno.EINVAL if end < len(text) else -errno.ERANGE
    if "-" in text[:end]:
        return -errno.EINVAL
    fraction_bits = 0
    is_hex = False
    next_char = text[end:end + 1]
    if value == 0 and next_char in ("x", "X"):
        value, end, overflow = _strtoull(text, 0, 16)
        if overflow:
            return -errno.EINVAL if end < len(text) else -errno.ERANGE
        if text[end:end + 1] == ".":
            return -errno.EINVAL
        is_hex = True
    elif next_char == ".":
        match = _FRACTION_RE.match(text, end)
        if match is None:
            end += 1  # strtod found nothing: step over the '.', as qemu does
        elif match.group(2):
            return -errno.EINVAL  # an exponent makes the whole input invalid
        else:
            fraction = float(match.group(0))
            fraction_bits = int(fraction * 2.0**64)
            end = match.end()
    suffix = text[end:end + 1].upper()
    if suffix and suffix in _SUFFIXES:
        if is_hex:
            sys.stderr.write(f"{PROGRAM}: warning: Using a multiplier suffix on hex numbers "
                             f"is deprecated: {text}\n")
        end += 1
        shift = _SUFFIXES[suffix]
    else:
        shift = 0
    if shift == 0:
        if fraction_bits:
            return -errno.EINVAL
    else:
        scaled = fraction_bits << shift
        value = (value << shift) + (scaled >> 64) + ((scaled & (_U64 - 1)) >> 63)
        if value >= _U64:
            return -errno.EINVAL if end < len(text) else -errno.ERANGE
    if end < len(text):
        return -errno.EINVAL
    return value


def cvtnum(text: str | None) -> int:
    """qemu-io's cvtnum: a byte count, or -EINVAL / -ERANGE."""
    if text is None:
        return -errno.EINVAL
    value = _strtosz(text)
    if value > INT64_MAX:
        return -errno.ERANGE
    return value


def parse_options(name: str, words: list[str], optstring: str, positional: list[str],
                  convert: Mapping[str, Callable[[str], Any]] | None = None) -> dict[str, Any]:
    """getopt's options as a dict (flags map to True; a repeated option's last
    value wins). Values are converted as they come, so a bad value fails
    before a later bad option, as in qemu-io's getopt loops."""
    found: dict[str, Any] = {}
    for letter, value in getopt(name, words, optstring, positional):
        if value is None:
            found[letter] = True
        elif convert and letter in convert:
            found[letter] = convert[letter](value)
        else:
            found[letter] = value
    return found


def _request_range(positional: list[str]) -> tuple[int, int]:
    """'offset count' of read-like commands, with qemu-io's checks and messages."""
    if len(positional) != 2:
        raise UsageFailure("")
    offset = _number(positional[0])
    count = _number(positional[1])
    if count > REQUEST_MAX_BYTES:
        raise CommandFailed(f"length cannot exceed {REQUEST_MAX_BYTES}, given {positional[1]}")
    return offset, count


def _number(text: str | None, shown: str | None = None) -> int:
    """cvtnum that fails the command with qemu-io's parsing message."""
    value = cvtnum(text)
    if value >= 0:
        return value
    shown = text if shown is None else shown
    if value == -errno.ERANGE:
        raise CommandFailed(f"Parsing error: argument too large -- {shown}")
    raise CommandFailed(
        f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {shown}"
    )


def _strtol(text: str) -> tuple[int, int]:
    """C strtol with base 0: (value, end index); end 0 when nothing parsed."""
    position, negative = _skip_space_and_sign(text, 0)
    rest = text[position:]
    if rest[:2] in ("0x", "0X") and len(rest) > 2 and rest[2] in _HEX_DIGITS:
        base, position, digits = 16, position + 2, _HEX_DIGITS
    elif rest[:1] == "0":
        base, digits = 8, "01234567"
    else:
        base, digits = 10, "0123456789"
    first = position
    while position < len(text) and text[position] in digits:
        position += 1
    if position == first:
        return 0, 0
    value = int(text[first:position], base)
    value = -value if negative else value
    return max(-(2**63), min(value, 2**63 - 1)), position


def parse_pattern(text: str) -> int:
    """qemu-io's parse_pattern: one byte, written in C (strtol base 0) syntax."""
    value, end = _strtol(text)
    if value < 0 or value > 0xFF or end != len(text):
        raise CommandFailed(f"{text} is not a valid pattern byte")
    return value


# -- qemu-io's printing -----------------------------------------------------------
_UNITS = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB"))


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: '64 KiB', '1.500 KiB', '512 bytes'."""
    unit = next(((shift, name) for shift, name in _UNITS if value >= 1 << shift), None)
    if unit is None:
        suffix, text = " bytes", f"{value:f}"
    else:
        suffix, text = unit[1], f"{value / (1 << unit[0]):.3f}"
    trim = text.find(".000")
    return text[:trim] + suffix if trim >= 0 else text + suffix


def timestr(elapsed: float, verbose: bool = False) -> str:
    """qemu-io's timestr: '00.01 sec', or 'H:MM:SS.ss' (always with -C)."""
    seconds = int(elapsed)
    fraction = elapsed - seconds
    if verbose or seconds:
        return (f"{seconds // 3600}:{seconds % 3600 // 60:02d}:"
                f"{seconds % 60 + fraction:05.2f}")
    return f"{fraction:05.2f} sec"


def _per_second(value: float, elapsed: float) -> float:
    return value / elapsed if elapsed > 0 else math.inf


def report_lines(op: str, offset: int, count: int, total: int, ops: int, elapsed: float,
                 machine: bool) -> list[str]:
    """qemu-io's print_report."""
    if machine:
        return [f"{total},{ops},{timestr(elapsed, verbose=True)},"
                f"{_per_second(total, elapsed):.3f},{_per_second(ops, elapsed):.3f}"]
    return [f"{op} {total}/{count} bytes at offset {offset}",
            f"{cvtstr(total)}, {ops} ops; {timestr(elapsed)} "
            f"({cvtstr(_per_second(total, elapsed))}/sec and "
            f"{_per_second(ops, elapsed):.4f} ops/sec)"]


def hexdump_lines(offset: int, data: bytes) -> Iterator[str]:
    """qemu-io's dump_buffer: no padding on a short last row, isalnum() shown."""
    for start in range(0, len(data), HEXDUMP_WIDTH):
        row = data[start:start + HEXDUMP_WIDTH]
        hexes = "".join(f"{byte:02x} " for byte in row)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in row)
        yield f"{offset + start:08x}:  {hexes} {text}"


# -- getopt -----------------------------------------------------------------------
def getopt(name: str, words: list[str], optstring: str,
           positional: list[str]) -> Iterator[tuple[str, str | None]]:
    """GNU getopt(3) with argument permutation, one option at a time.

    Non-option words are appended to ``positional``; an unknown option or a
    missing argument raises UsageFailure with glibc's message.
    """
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            positional.extend(words[index:])
            return
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        position = 1
        while position < len(word):
            letter = word[position]
            spec = optstring.find(letter)
            if spec < 0 or letter == ":":
                raise UsageFailure(f"{name}: invalid option -- '{letter}'")
            if optstring[spec + 1:spec + 2] == ":":
                value = word[position + 1:]
                if not value:
                    if index >= len(words):
                        raise UsageFailure(f"{name}: option requires an argument -- '{letter}'")
                    value = words[index]
                    index += 1
                yield letter, value
                break
            yield letter, None
            position += 1


@attrs.frozen
class Command:
    name: str
    altname: str | None
    function: Callable[[IoSession, str, list[str]], None]
    argmin: int = 0
    argmax: int = 0
    args: str = ""
    oneline: str = ""
    #: Needs a writable image (qemu-io's BLK_PERM_WRITE), checked before parsing.
    writes: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}"


def _error_reason(error: CorefmtError) -> str:
    """The strerror()-style reason qemu-io prints after '<cmd> failed: '."""
    if isinstance(error, RangeError):
        return os.strerror(errno.EIO)
    if isinstance(error, ReadOnlyError):
        return "Block node is read-only"
    if isinstance(error, InvalidRequest):
        return os.strerror(errno.EINVAL)
    return error_reason(error)


class IoSession:
    def __init__(self, node: BlockNode, out: TextIO = sys.stdout, err: TextIO | None = None):
        self.node = node
        self.out = out
        self.err = err if err is not None else sys.stderr
        self.commands: dict[str, Command] = {}
        for command in COMMANDS:
            self.commands[command.name] = command
            if command.altname:
                self.commands.setdefault(command.altname, command)

    # -- dispatch -----------------------------------------------------------------
    def run(self, line: str) -> bool:
        """Run one command line; False if it failed."""
        words = [word for word in line.split(" ") if word]
        if not words:
            return True
        name, arguments = words[0], words[1:]
        command = self.commands.get(name)
        if command is None:
            self._stderr(f"command \"{name}\" not found")
            return False
        count = len(arguments)
        if count < command.argmin or (command.argmax != -1 and count > command.argmax):
            self._stderr(_bad_count(count, name, command))
            return False
        if command.writes and self.node.read_only:
            self._stderr(f"{PROGRAM}: Block node is read-only")
            return False
        try:
            command.function(self, name, arguments)
        except UsageFailure as error:
            if str(error):
                self._stderr(str(error))
            self._print(command.usage)
            return False
        except CommandFailed as error:
            if error.message is not None:
                self._print(error.message)
            return False
        except CommandStderr as error:
            self._stderr(f"{PROGRAM}: {error}" if error.prefix else str(error))
            return False
        return True

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")

    def _stderr(self, text: str) -> None:
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    def _report(self, op: str, offset: int, count: int, started: float,
                machine: bool) -> None:
        for line in report_lines(op, offset, count, count, 1, time.perf_counter() - started,
                                 machine):
            self._print(line)

    # -- commands -----------------------------------------------------------------
    def read(self, name: str, words: list[str]) -> None:
        positional: list[str] = []
        options = parse_options(name, words, "bCl:pP:qs:v", positional,
                                {"l": _number, "P": parse_pattern, "s": _number})
        vmstate, machine = "b" in options, "C" in options
        quiet, verbose = "q" in options, "v" in options
        pattern: int | None = options.get("P")
        pattern_count: int | None = options.get("l")
        pattern_offset: int = options.get("s", 0)
        offset_given = "s" in options
        offset, count = _request_range(positional)
        if pattern is None and (pattern_count is not None or offset_given):
            raise UsageFailure("")
        if pattern_count is None:
            pattern_count = count - pattern_offset
        if pattern_count < 0 or pattern_count + pattern_offset > count:
            raise CommandFailed("pattern verification range exceeds end of read data")
        if vmstate:
            _check_sector_aligned(offset, count)
        started = time.perf_counter()
        if vmstate:
            raise CommandFailed(f"read failed: {os.strerror(errno.ENOTSUP)}")
        try:
            data = self.node.read(offset, count)
        except CorefmtError as error:
            raise CommandFailed(f"read failed: {_error_reason(error)}") from None
        elapsed_end = time.perf_counter()
        failed = False
        if pattern is not None:
            expected = bytes([pattern]) * pattern_count
            if data[pattern_offset:pattern_offset + pattern_count] != expected:
                self._print(f"Pattern verification failed at offset {offset + pattern_offset}, "
                            f"{pattern_count} bytes")
                failed = True
        if not quiet:
            if verbose:
                for row in hexdump_lines(offset, data):
                    self._print(row)
            for line in report_lines("read", offset, count, count, 1, elapsed_end - started,
                                     machine):
                self._print(line)
        if failed:
            raise CommandFailed()

    def write(self, name: str, words: list[str]) -> None:
        positional: list[str] = []
        options = parse_options(name, words, "bcCfnpP:qs:uz", positional,
                                {"P": parse_pattern})
        vmstate, compressed, machine = "b" in options, "c" in options, "C" in options
        fua, no_fallback, quiet = "f" in options, "n" in options, "q" in options
        unmap, zero = "u" in options, "z" in options
        pattern: int | None = options.get("P")
        source: str | None = options.get("s")
        if len(positional) != 2:
            raise UsageFailure("")
        if vmstate and zero:
            raise CommandFailed("-b and -z cannot be specified at the same time")
        if fua and (vmstate or compressed):
            raise CommandFailed("-f and -b or -c cannot be specified at the same time")
        if no_fallback and not zero:
            raise CommandFailed("-n requires -z to be specified")
        if unmap and not zero:
            raise CommandFailed("-u requires -z to be specified")
        if zero + (pattern is not None) + (source is not None) > 1:
            raise CommandFailed("Only one of -z, -P, and -s can be specified at the same time")
        offset = _number(positional[0])
        count = _number(positional[1])
        if count > REQUEST_MAX_BYTES and not no_fallback:
            raise CommandFailed(f"length cannot exceed {REQUEST_MAX_BYTES} without -n, "
                                f"given {positional[1]}")
        if vmstate or compressed:
            _check_sector_aligned(offset, count)
        data = b""
        if not zero:
            if source is not None:
                data = _pattern_file(source, count)
            else:
                data = bytes([DEFAULT_PATTERN if pattern is None else pattern]) * count
        started = time.perf_counter()
        if vmstate:
            raise CommandFailed(f"write failed: {os.strerror(errno.ENOTSUP)}")
        flags = RequestFlags.NONE  # qemu-io: -f is FUA, -n no fallback, -c compressed
        if fua:
            flags |= RequestFlags.FUA
        if no_fallback:
            flags |= RequestFlags.NO_FALLBACK
        if compressed:
            flags |= RequestFlags.COMPRESSED
        try:
            if zero:
                self.node.write_zeroes(offset, count, unmap=unmap, flags=flags)
            else:
                self.node.write(offset, data, flags)
        except NotSupported:
            raise CommandFailed(f"write failed: {os.strerror(errno.ENOTSUP)}") from None
        except CorefmtError as error:
            raise CommandFailed(f"write failed: {_error_reason(error)}") from None
        if not quiet:
            self._report("wrote", offset, count, started, machine)

    def zero(self, name: str, words: list[str]) -> None:
        """corefmt's shorthand for ``write -z`` (qemu-io has no such command)."""
        self.write("write", ["-z", *words])

    def discard(self, name: str, words: list[str]) -> None:
        positional: list[str] = []
        options = parse_options(name, words, "Cq", positional)
        machine, quiet = "C" in options, "q" in options
        offset, count = _request_range(positional)
        started = time.perf_counter()
        try:
            self.node.discard(offset, count)
        except CorefmtError as error:
            raise CommandFailed(f"discard failed: {_error_reason(error)}") from None
        if not quiet:
            self._report("discard", offset, count, started, machine)

    def flush(self, name: str, words: list[str]) -> None:
        try:
            self.node.flush()
        except CorefmtError as error:
            raise CommandStderr(f"flush failed: {_error_reason(error)}") from None

    def truncate(self, name: str, words: list[str]) -> None:
        positional: list[str] = []
        mode = "off"
        for letter, value in getopt(name, words, "m:", positional):
            if letter == "m":
                if value not in PREALLOC_MODES:
                    raise CommandStderr(f"Invalid preallocation mode '{value}'")
                mode = value
        # qemu-io parses argv[optind] but names argv[1] in its message.
        size = _number(positional[0] if positional else None, shown=words[0])
        old_size = self.node.virtual_size
        if mode != "off" and size < old_size:
            raise CommandStderr("Cannot use preallocation for shrinking files")
        if mode == "metadata":
            raise CommandStderr(f"Unsupported preallocation mode: {mode}")
        try:
            self.node.truncate(size)
            if size > old_size and mode == "falloc":
                # Allocated blocks that read as zeros (fallocate, as qemu's file driver).
                self.node.write_zeroes(old_size, size - old_size, unmap=False)
            elif size > old_size and mode == "full":
                zeros = bytes(min(size - old_size, ZERO_CHUNK))
                for start in range(old_size, size, ZERO_CHUNK):
                    self.node.write(start, zeros[:min(ZERO_CHUNK, size - start)])
        except CorefmtError as error:
            raise CommandStderr(str(error)) from None

    def length(self, name: str, words: list[str]) -> None:
        self._print(cvtstr(self.node.virtual_size))

    def info(self, name: str, words: list[str]) -> None:
        image = self.node.layer()._image  # type: ignore[attr-defined]
        self._print(f"format name: {self.node.format_name}")
        self._print(f"cluster size: {cvtstr(image.cluster_size or 0)}")
        self._print(f"vm state offset: {cvtstr(0)}")
        specific = image.info()
        if specific:
            self._print("Format specific information:")
            for key, value in specific.items():
                if isinstance(value, bool):
                    value = "true" if value else "false"
                self._print(f"    {key}: {value}")

    def _allocated_run(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether [offset, ...) is allocated in the top image (qemu's
        bdrv_is_allocated, not _above), and how far that state runs."""
        first: bool | None = None
        run = 0
        for extent in self.node.block_status(offset, length):
            allocated = extent.node is self.node
            if first is None:
                first = allocated
            elif allocated != first:
                break
            run += extent.length
        return bool(first), run

    def alloc(self, name: str, words: list[str]) -> None:
        offset = _number(words[0])
        count = _number(words[1]) if len(words) > 1 else SECTOR_SIZE
        # qemu stops at the end of the image and reports only what it looked at.
        count = max(0, min(offset + count, self.node.virtual_size) - offset)
        allocated = 0
        position = offset
        try:
            while position < offset + count:
                is_allocated, run = self._allocated_run(position, offset + count - position)
                if is_allocated:
                    allocated += run
                position += run
        except CorefmtError as error:
            raise CommandFailed(f"is_allocated failed: {_error_reason(error)}") from None
        self._print(f"{allocated}/{count} bytes allocated at offset {cvtstr(offset)}")

    def map(self, name: str, words: list[str]) -> None:
        size = self.node.virtual_size
        position = 0
        try:
            while position < size:
                allocated, run = self._allocated_run(position, size - position)
                state = "    allocated" if allocated else "not allocated"
                self._print(f"{cvtstr(run)} ({run:#x}) bytes {state} at offset "
                            f"{cvtstr(position)} ({position:#x})")
                position += run
        except CorefmtError as error:
            raise CommandFailed(
                f"Failed to get allocation status: {_error_reason(error)}"
            ) from None


def _bad_count(count: int, name: str, command: Command) -> str:
    if command.argmax == -1:
        return (f"bad argument count {count} to {name}, "
                f"expected at least {command.argmin} arguments")
    if command.argmin == command.argmax:
        return f"bad argument count {count} to {name}, expected {command.argmin} arguments"
    return (f"bad argument count {count} to {name}, "
            f"expected between {command.argmin} and {command.argmax} arguments")


def _check_sector_aligned(offset: int, count: int) -> None:
    if offset % SECTOR_SIZE:
        raise CommandFailed(f"{offset} is not a sector-aligned value for 'offset'")
    if count % SECTOR_SIZE:
        raise CommandFailed(f"{count} is not a sector-aligned value for 'count'")


def _pattern_file(path: str, count: int) -> bytes:
    """write -s: the file's first ``count`` bytes, repeated to fill ``count``."""
    try:
        with open(path, "rb") as source:
            head = source.read(count)
    except OSError as error:
        raise CommandStderr(f"{path}: {error.strerror}", prefix=False) from None
    if not head:
        raise CommandStderr(f"{path}: file is empty", prefix=False)
    return (head * (count // len(head) + 1))[:count]


COMMANDS = (
    Command("alloc", "a", IoSession.alloc, 1, 2, "offset [count]",
            "checks if offset is allocated in the file"),
    Command("discard", "d", IoSession.discard, 2, -1, "[-Cq] off len",
            "discards a number of bytes at a specified offset", writes=True),
    Command("flush", "f", IoSession.flush, oneline="flush all in-core file state to disk"),
    Command("info", "i", IoSession.info, oneline="prints information about the current file"),
    Command("length", "l", IoSession.length, oneline="gets the length of the current file"),
    Command("map", None, IoSession.map, oneline="prints the allocated areas of a file"),
    Command("read", "r", IoSession.read, 2, -1,
            "[-abCqv] [-P pattern [-s off] [-l len]] off len",
            "reads a number of bytes at a specified offset"),
    Command("truncate", "t", IoSession.truncate, 1, 3, "[-m prealloc_mode] off",
            "truncates the current file at the given offset", writes=True),
    Command("write", "w", IoSession.write, 2, -1,
            "[-bcCfnquz] [-P pattern | -s source_file] off len",
            "writes a number of bytes at a specified offset", writes=True),
    Command("zero", None, IoSession.zero, 2, -1, "[-Cqu] off len",
            "writes zeroes (corefmt's shorthand for write -z)", writes=True),
)


def run_commands(node: BlockNode, commands: list[str], out: TextIO = sys.stdout,
                 err: TextIO | None = None) -> int:
    """Run qemu-io commands in order; exit status 1 if any failed."""
    session = IoSession(node, out, err)
    failed = False
    for command in commands:
        if not session.run(command):
            failed = True
    out.flush()
    return 1 if failed else 0

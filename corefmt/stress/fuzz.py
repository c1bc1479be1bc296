"""Image fuzzing for any installed format driver.

Untrusted images are the design's rule (every size, offset and count read
from disk is checked; memory and time are bounded by limits, not by header
values), so each driver's open/read/status/check/write paths are fed
mutated copies of valid images. The only acceptable outcomes are correct
data or a CorefmtError with a message: any other exception, a hang or an
unbounded allocation is a failure, reported with a replay spec that
rebuilds the exact bytes.

It works for every format without knowing it: seed images are made through
``corefmt.create``/``corefmt.open`` on memory storage; mutations are biased
towards the first KiB, the first 4 KiB and "metadata" (non-zero words that
are not the data the seeds wrote). A driver may help with an optional
``fuzz_regions(image: bytes) -> iterable of (offset, length)`` method naming
its metadata, and with ``fuzz_guest_view(image: bytes) -> bytes | None``
saying exactly what a guest must read from any image (raw's is built in).

``hypothesis`` generates the cases (``pip install 'corefmt[stress]'``); a
replay needs only the spec. Entry points: ``fuzz_format`` and
``replay_case``; the CLI verb is ``corefmt fuzz``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import signal
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, Protocol

import attrs

from corefmt import plugins
from corefmt.block.align import align_down, align_up
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.capabilities import CheckFix, call_check
from corefmt.driver import CheckResult, FormatDriver, supports
from corefmt.errors import CorefmtError
from corefmt.ops.create import create
from corefmt.registry import PROBE_HEAD_SIZE, Registry
from corefmt.storage.memory import PREFIX as MEMORY_PREFIX
from corefmt.storage.memory import MemoryStorageDriver
from corefmt.stress.defaults import DEFAULT_EXAMPLES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT

KiB = 1024
MiB = 1024 * KiB
SECTOR_SIZE = 512

#: Virtual sizes of the seed images: small, so a case takes milliseconds.
DATA_IMAGE_SIZE = 1 * MiB
EMPTY_IMAGE_SIZE = 192 * KiB
#: Fixed, so that a replay spec rebuilds exactly the same seed bytes.
PAYLOAD_SEED = 0x5EED
#: Where the data seeds write (guest offset, length): aligned, unaligned-size,
#: mid-image and last-block writes, so data lands in several clusters.
PAYLOAD_LAYOUT = ((0, 4 * KiB), (64 * KiB + 512, 3 * SECTOR_SIZE),
                  (DATA_IMAGE_SIZE // 2 - 4 * KiB, 8 * KiB), (DATA_IMAGE_SIZE - 4 * KiB, 4 * KiB))
#: The overlay of the backed seed writes only part of what the base holds.
OVERLAY_LAYOUT = ((4 * KiB, 4 * KiB), (DATA_IMAGE_SIZE // 2, 2 * KiB))
#: Granularity at which written data is located in the image file.
PAYLOAD_PIECE = SECTOR_SIZE

#: Mutation bias: the first sector (headers), the first 4 KiB, metadata words,
#: and written data (where the expected guest view stays known).
HEADER_REGION = 512
HEAD_REGION = 4 * KiB
METADATA_WORD = 8
MAX_METADATA_OFFSETS = 4096
#: How many mutations a case applies; repeats are weights (one change at a
#: time gets furthest past a driver's first checks).
MUTATION_COUNTS = (1, 1, 1, 2, 2, 3, 4)
MAX_EXTENSION = 64 * KiB
OVERWRITE_WIDTHS = (1, 2, 4, 8)
#: Region names drawn per mutation; repeats are weights.
OFFSET_REGIONS = ("header", "header", "header", "head", "head",
                  "metadata", "metadata", "metadata", "data", "anywhere")
MUTATION_KINDS = ("overwrite", "overwrite", "overwrite", "overwrite",
                  "flip", "flip", "copy", "truncate", "extend")

#: Reads cover the whole image up to this virtual size; beyond it, samples.
READ_BUDGET = 64 * MiB
READ_CHUNK = 1 * MiB
SAMPLED_WINDOWS = 8
SAMPLE_LENGTH = 64 * KiB
#: The read-write pass writes these (offset, length) and reads them back;
#: negative offsets count from the end of the image.
WRITE_PROBES = ((100, 1536), (-4 * KiB, 700))

#: An outer alarm that came due during a case fires this soon after it.
MIN_REARM_SECONDS = 0.001
#: Address space a case may add before allocations fail: this many times the
#: memory limit, at least the minimum. It keeps a bad header from taking the
#: machine down (and from spending seconds filling pages) before tracemalloc
#: can tell; allocations under it are measured exactly.
ADDRESS_SPACE_FACTOR = 2
MIN_ADDRESS_SPACE_HEADROOM = 256 * MiB
#: Failures shrunk after a run, and replays spent on each.
MAX_SHRUNK_FAILURES = 10
SHRINK_BUDGET = 40
TRACEBACK_FRAMES = 4

#: Optional driver helpers (see the module docstring).
HINTS_METHOD = "fuzz_regions"
GUEST_VIEW_METHOD = "fuzz_guest_view"

#: Failure kinds.
KIND_EXCEPTION = "exception"
KIND_MESSAGE = "empty message"
KIND_HANG = "hang"
KIND_MEMORY = "memory"
KIND_WRONG_DATA = "wrong data"
KIND_BAD_RESULT = "bad result"


class FuzzSetupError(CorefmtError):
    """Fuzzing could not start: no hypothesis, or the driver fails on valid images."""


class SpecError(CorefmtError):
    """A replay spec that does not parse."""


def _require_hypothesis() -> ModuleType:
    try:
        import hypothesis
    except ImportError:
        raise FuzzSetupError(
            "image fuzzing needs the 'hypothesis' package: pip install 'corefmt[stress]'"
        ) from None
    return hypothesis


# -- mutations -------------------------------------------------------------------------
class Mutation(Protocol):
    def apply(self, image: bytearray) -> None: ...
    def touched(self) -> tuple[int, int] | None:
        """The bytes changed (offset, length), or None if the file's length changes."""
    def spec(self) -> str: ...


@attrs.frozen
class BitFlip:
    offset: int
    bit: int

    def apply(self, image: bytearray) -> None:
        if self.offset < len(image):
            image[self.offset] ^= 1 << self.bit

    def touched(self) -> tuple[int, int] | None:
        return self.offset, 1

    def spec(self) -> str:
        return f"flip@{self.offset:#x}/{self.bit}"


@attrs.frozen
class Overwrite:
    """An integer field overwritten (clipped at the end of the file)."""

    offset: int
    width: int
    value: int
    big_endian: bool = True

    def apply(self, image: bytearray) -> None:
        data = self.value.to_bytes(self.width, "big" if self.big_endian else "little")
        end = min(self.offset + self.width, len(image))
        if self.offset < end:
            image[self.offset:end] = data[:end - self.offset]

    def touched(self) -> tuple[int, int] | None:
        return self.offset, self.width

    def spec(self) -> str:
        order = "" if self.width == 1 else ("be" if self.big_endian else "le")
        return f"u{8 * self.width}{order}@{self.offset:#x}={self.value:#x}"


@attrs.frozen
class CopyBytes:
    """A word copied elsewhere: duplicate pointers, swapped fields."""

    source: int
    target: int
    width: int

    def apply(self, image: bytearray) -> None:
        data = bytes(image[self.source:self.source + self.width])
        end = min(self.target + len(data), len(image))
        if self.target < end:
            image[self.target:end] = data[:end - self.target]

    def touched(self) -> tuple[int, int] | None:
        return self.target, self.width

    def spec(self) -> str:
        return f"copy@{self.source:#x}>{self.target:#x}/{self.width}"


@attrs.frozen
class Truncate:
    length: int

    def apply(self, image: bytearray) -> None:
        del image[self.length:]

    def touched(self) -> tuple[int, int] | None:
        return None

    def spec(self) -> str:
        return f"truncate={self.length:#x}"


@attrs.frozen
class Extend:
    length: int
    fill: int = 0

    def apply(self, image: bytearray) -> None:
        image.extend(bytes([self.fill]) * self.length)

    def touched(self) -> tuple[int, int] | None:
        return None

    def spec(self) -> str:
        return f"extend={self.length:#x}/{self.fill:#x}"


_NUMBER = r"(0x[0-9a-fA-F]+|\d+)"
_SPEC_PATTERNS: tuple[tuple[re.Pattern[str], Callable[..., Mutation]], ...] = (
    (re.compile(rf"flip@{_NUMBER}/([0-7])"), lambda o, b: BitFlip(_int(o), int(b))),
    (re.compile(rf"u8@{_NUMBER}={_NUMBER}"), lambda o, v: Overwrite(_int(o), 1, _int(v))),
    (re.compile(rf"u(16|32|64)(be|le)@{_NUMBER}={_NUMBER}"),
     lambda bits, order, o, v: Overwrite(_int(o), int(bits) // 8, _int(v), order == "be")),
    (re.compile(rf"copy@{_NUMBER}>{_NUMBER}/([1-8])"),
     lambda s, t, w: CopyBytes(_int(s), _int(t), int(w))),
    (re.compile(rf"truncate={_NUMBER}"), lambda n: Truncate(_int(n))),
    (re.compile(rf"extend={_NUMBER}/{_NUMBER}"), lambda n, f: Extend(_int(n), _int(f) & 0xFF)),
)


def _int(text: str) -> int:
    return int(text, 0)


def parse_mutation(text: str) -> Mutation:
    for pattern, build in _SPEC_PATTERNS:
        match = pattern.fullmatch(text.strip())
        if match:
            mutation = build(*match.groups())
            if isinstance(mutation, Overwrite) and mutation.value >> (8 * mutation.width):
                break
            return mutation
    raise SpecError(f"bad mutation '{text}' in replay spec")


@attrs.frozen
class Case:
    """One fuzz input: a seed image and the mutations applied to it, in order."""

    seed_image: str
    mutations: tuple[Mutation, ...]

    def spec(self) -> str:
        return f"{self.seed_image}:" + ";".join(m.spec() for m in self.mutations)

    @classmethod
    def parse(cls, spec: str) -> Case:
        name, colon, rest = spec.strip().partition(":")
        if not colon or not name:
            raise SpecError(f"bad replay spec '{spec}': expected SEED_IMAGE:MUTATION;...")
        return cls(name, tuple(parse_mutation(part) for part in rest.split(";") if part.strip()))

    def apply(self, image: bytes) -> bytes:
        work = bytearray(image)
        for mutation in self.mutations:
            mutation.apply(work)
        return bytes(work)


# -- seed images ---------------------------------------------------------------------------
@attrs.define
class SeedImage:
    """A valid image (its file's bytes) and what a guest reads from it."""

    name: str
    data: bytes
    guest: bytes
    #: (host offset, guest offset) of every written piece found once in the file.
    pieces: list[tuple[int, int]]
    #: 8-aligned offsets of non-zero words that are not written data.
    metadata_offsets: list[int]
    virtual_size: int


def _payloads(layout: Iterable[tuple[int, int]], rng: random.Random) -> list[tuple[int, bytes]]:
    return [(offset, rng.randbytes(length)) for offset, length in layout]


def _locate_pieces(image: bytes, payloads: Iterable[tuple[int, bytes]],
                   guest: bytes) -> list[tuple[int, int]]:
    """Where written data sits in the file, when that is unambiguous."""
    pieces: list[tuple[int, int]] = []
    for guest_offset, data in payloads:
        for start in range(0, len(data) - PAYLOAD_PIECE + 1, PAYLOAD_PIECE):
            piece = data[start:start + PAYLOAD_PIECE]
            where = guest_offset + start
            if guest[where:where + PAYLOAD_PIECE] != piece:
                continue  # overwritten by a later layer
            host = image.find(piece)
            if host >= 0 and image.find(piece, host + 1) < 0:
                pieces.append((host, where))
    return pieces


def _metadata_offsets(image: bytes, pieces: list[tuple[int, int]],
                      hints: Iterable[tuple[int, int]]) -> list[int]:
    data_mask = bytearray(len(image) // METADATA_WORD + 1)
    for host, _ in pieces:
        for word in range(host // METADATA_WORD, (host + PAYLOAD_PIECE) // METADATA_WORD):
            data_mask[word] = 1
    zero = bytes(METADATA_WORD)
    offsets = {offset for offset in range(0, len(image) - METADATA_WORD + 1, METADATA_WORD)
               if not data_mask[offset // METADATA_WORD]
               and image[offset:offset + METADATA_WORD] != zero}
    for offset, length in hints:
        start = max(0, align_down(offset, METADATA_WORD))
        offsets.update(range(start, min(offset + length, len(image)), METADATA_WORD))
    ordered = sorted(offsets)
    if len(ordered) > MAX_METADATA_OFFSETS:
        step = len(ordered) / MAX_METADATA_OFFSETS
        ordered = [ordered[int(i * step)] for i in range(MAX_METADATA_OFFSETS)]
    return ordered


def raw_guest_view(image: bytes) -> bytes:
    """raw: the guest sees the file, its tail rounded up to whole sectors."""
    return image + bytes(align_up(len(image), SECTOR_SIZE) - len(image))


#: Exact guest views of formats whose plugins do not ship ``fuzz_guest_view``.
KNOWN_GUEST_VIEWS: dict[str, Callable[[bytes], bytes | None]] = {"raw": raw_guest_view}


def _guest_view_function(driver: FormatDriver) -> Callable[[bytes], bytes | None] | None:
    method = getattr(driver, GUEST_VIEW_METHOD, None)
    return method if callable(method) else KNOWN_GUEST_VIEWS.get(driver.name)


# -- results -------------------------------------------------------------------------------
@attrs.define
class FuzzFailure:
    """One distinct way a driver failed; ``spec`` rebuilds the failing bytes."""

    kind: str
    phase: str
    message: str
    spec: str
    seed: int
    case_index: int
    detail: str = ""
    where: str = ""
    occurrences: int = 1
    image: bytes = attrs.field(default=b"", repr=False)

    @property
    def signature(self) -> tuple[str, str]:
        return self.kind, self.where

    def replay_command(self, format: str, options: str = "") -> str:
        words = ["corefmt", "fuzz", "--format", format]
        if options:
            words += ["-o", options]
        return shlex.join([*words, "--replay", self.spec])

    def describe(self, format: str, options: str = "") -> str:
        lines = [f"FAIL {self.kind} in {self.phase}: {self.message}",
                 f"  case {self.case_index} of seed {self.seed}"
                 + (f", seen in {self.occurrences} cases" if self.occurrences > 1 else ""),
                 f"  replay: {self.replay_command(format, options)}"]
        lines += [f"  {line}" for line in self.detail.splitlines()]
        return "\n".join(lines)


@attrs.define
class FuzzReport:
    format: str
    seed: int
    examples: int
    cases: int = 0
    opened: int = 0
    refused: int = 0
    failed_cases: int = 0
    failures: list[FuzzFailure] = attrs.field(factory=list)
    elapsed: float = 0.0
    #: The ``-o`` create options the seed images were made with.
    options: str = ""
    #: Largest traced allocation of one case (bytes).
    peak_memory: int = 0
    #: A hang in a worker thread stops the run: the thread cannot be killed.
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        return (f"cases {self.cases}, opened {self.opened}, refused {self.refused}, "
                f"failures {self.failed_cases}")

    def add(self, failure: FuzzFailure) -> None:
        for known in self.failures:
            if known.signature == failure.signature:
                known.occurrences += 1
                return
        self.failures.append(failure)


@attrs.frozen
class FuzzLimits:
    """What one case may take before it counts as a failure."""

    timeout: float = DEFAULT_TIMEOUT
    memory: int = DEFAULT_MEMORY_LIMIT
    read_budget: int = READ_BUDGET
    #: None: derived from ``memory``; 0 turns the address-space guard off.
    address_space_headroom: int | None = None

    @property
    def headroom(self) -> int:
        if self.address_space_headroom is not None:
            return self.address_space_headroom
        return max(ADDRESS_SPACE_FACTOR * self.memory, MIN_ADDRESS_SPACE_HEADROOM)


@attrs.define
class CaseOutcome:
    opened: bool = False
    refused: bool = False
    phase: str = "start"
    peak: int = 0
    timed_out: bool = False
    failures: list[FuzzFailure] = attrs.field(factory=list)


class _CaseTimeout(BaseException):
    """Raised by the alarm in the case's thread; BaseException so drivers'
    ``except Exception`` cannot swallow it."""


# -- guards --------------------------------------------------------------------------------
def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _address_space_guard(headroom: int) -> Iterator[None]:
    """Cap the address space so a huge allocation fails with MemoryError
    instead of swapping or getting the process killed."""
    try:
        import resource
    except ImportError:
        yield
        return
    current = _address_space()
    if not headroom or current is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _can_use_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds``; a timer the caller had set is re-armed after."""
    def expire(signum: int, frame: Any) -> None:
        raise _CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            remaining = outer - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, MIN_REARM_SECONDS))


def _innermost(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    last = frames[-1]
    return f"{type(error).__name__} at {os.path.basename(last.filename)}:{last.lineno}"


def _short_traceback(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)[-TRACEBACK_FRAMES:]
    return "".join(traceback.format_list(frames)).rstrip()


# -- the harness ---------------------------------------------------------------------------
class _Harness:
    """Seed images on memory storage and the run of one case against them."""

    def __init__(self, format: str, registry: Registry, limits: FuzzLimits, seed: int,
                 options: str = ""):
        self.format = format
        self.options = options
        self.registry = registry
        self.limits = limits
        self.seed = seed
        self.driver = registry.format(format)
        memory = registry.storage_for(MEMORY_PREFIX)
        if not isinstance(memory, MemoryStorageDriver):
            raise FuzzSetupError("fuzzing needs the 'memory' storage driver")
        self.memory = memory
        self.prefix = f"{MEMORY_PREFIX}corefmt-fuzz-{format}"
        self.guest_view = _guest_view_function(self.driver)
        self.seeds: dict[str, SeedImage] = {}
        self._paths: list[str] = []
        self._counter = 0

    # -- seeds ------------------------------------------------------------------
    def __enter__(self) -> _Harness:
        try:
            self._build_seeds()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        for path in self._paths:
            self.memory.forget(path)

    def _path(self, name: str) -> str:
        path = f"{self.prefix}-{name}"
        self._paths.append(path)
        return path

    def _build_seeds(self) -> None:
        rng = random.Random(PAYLOAD_SEED)
        self._seed("empty", EMPTY_IMAGE_SIZE, [])
        data = _payloads(PAYLOAD_LAYOUT, rng)
        self._seed("data", DATA_IMAGE_SIZE, data)
        if self.driver.supports_backing:
            base_path = self._path("base")
            base_payload = _payloads(PAYLOAD_LAYOUT, rng)
            self._write_image(base_path, DATA_IMAGE_SIZE, base_payload)
            base_guest = self._expected_guest(DATA_IMAGE_SIZE, base_payload)
            self._seed("backed", DATA_IMAGE_SIZE, _payloads(OVERLAY_LAYOUT, rng),
                       backing=base_path, below=base_guest, below_payload=base_payload)

    def _write_image(self, path: str, size: int, payload: list[tuple[int, bytes]],
                     backing: str | None = None) -> None:
        try:
            create(path, self.format, size, options=self.options, backing=backing,
                   backing_format=self.format if backing else None, registry=self.registry)
            with open_chain(path, self.format, registry=self.registry) as node:
                for offset, data in payload:
                    node.write(offset, data)
                node.flush()
        except Exception as error:
            raise FuzzSetupError(
                f"{self.format}: building a valid seed image failed: "
                f"{type(error).__name__}: {error}") from error

    @staticmethod
    def _expected_guest(size: int, payload: list[tuple[int, bytes]],
                        below: bytes | None = None) -> bytes:
        guest = bytearray(below if below is not None else bytes(size))
        for offset, data in payload:
            guest[offset:offset + len(data)] = data
        return bytes(guest)

    def _seed(self, name: str, size: int, payload: list[tuple[int, bytes]], *,
              backing: str | None = None, below: bytes | None = None,
              below_payload: list[tuple[int, bytes]] | None = None) -> None:
        path = self._path(name)
        self._write_image(path, size, payload, backing)
        guest = self._expected_guest(size, payload, below)
        with open_chain(path, self.format, read_only=True, registry=self.registry) as node:
            seen = node.read(0, node.virtual_size)
        if seen[:size] != guest or any(seen[size:]):
            raise FuzzSetupError(f"{self.format}: the valid seed image '{name}' does not read "
                                 "back what was written; fix that before fuzzing")
        storage = self.memory.open(path, read_only=True)
        image = storage.read(0, storage.size())
        storage.close()
        pieces = _locate_pieces(image, [*payload, *(below_payload or [])], seen)
        hints_method = getattr(self.driver, HINTS_METHOD, None)
        hints = list(hints_method(image)) if callable(hints_method) else []
        self.seeds[name] = SeedImage(name, image, seen, pieces,
                                     _metadata_offsets(image, pieces, hints), len(seen))

    # -- one case ---------------------------------------------------------------
    def mutate(self, case: Case) -> bytes:
        try:
            seed = self.seeds[case.seed_image]
        except KeyError:
            known = ", ".join(sorted(self.seeds))
            raise SpecError(f"no seed image '{case.seed_image}' for format {self.format} "
                            f"(seed images: {known})") from None
        return case.apply(seed.data)

    def expected_guest(self, case: Case, image: bytes) -> bytes | None:
        """What a guest must read, where the mutations make that knowable."""
        if self.guest_view is not None:
            return self.guest_view(image)
        seed = self.seeds[case.seed_image]
        patched = bytearray(seed.guest)
        for mutation in case.mutations:
            touched = mutation.touched()
            if touched is None:
                return None
            start, length = touched
            if not any(host <= start and start + length <= host + PAYLOAD_PIECE
                       for host, _ in seed.pieces):
                return None  # metadata or free space: the outcome is open
        for host, where in seed.pieces:
            patched[where:where + PAYLOAD_PIECE] = image[host:host + PAYLOAD_PIECE]
        return bytes(patched)

    def run(self, case: Case, index: int) -> CaseOutcome:
        image = self.mutate(case)
        self._counter += 1
        path = f"{self.prefix}-case-{self._counter}"
        storage = self.memory.create(path)
        storage.write(0, image)
        storage.close()
        outcome = CaseOutcome()
        try:
            self._guarded(case, index, image, path, outcome)
        finally:
            self.memory.forget(path)
        return outcome

    def _guarded(self, case: Case, index: int, image: bytes, path: str,
                 outcome: CaseOutcome) -> None:
        """Run a case under the time and memory limits."""
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        try:
            with _address_space_guard(self.limits.headroom):
                if _can_use_alarm():
                    try:
                        with _alarm(self.limits.timeout):
                            _CaseRun(self, case, index, image, path, outcome).run()
                    except _CaseTimeout:
                        self._hang(case, index, image, outcome)
                else:
                    self._in_thread(case, index, image, path, outcome)
        finally:
            if not tracing:
                tracemalloc.stop()

    def _in_thread(self, case: Case, index: int, image: bytes, path: str,
                   outcome: CaseOutcome) -> None:
        errors: list[BaseException] = []

        def body() -> None:
            try:
                _CaseRun(self, case, index, image, path, outcome).run()
            except BaseException as error:  # handed to the caller's thread
                errors.append(error)

        worker = threading.Thread(target=body, name=f"corefmt-fuzz-{index}", daemon=True)
        worker.start()
        worker.join(self.limits.timeout)
        if worker.is_alive():
            self._hang(case, index, image, outcome)
            raise _RunAborted
        if errors:
            raise errors[0]

    def _hang(self, case: Case, index: int, image: bytes, outcome: CaseOutcome) -> None:
        outcome.failures.append(FuzzFailure(
            KIND_HANG, outcome.phase,
            f"no result within {self.limits.timeout:g} s", case.spec(), self.seed, index,
            where=outcome.phase, image=image))


class _RunAborted(Exception):
    """A case's worker thread is still running: later cases cannot be trusted."""


class _CaseRun:
    """The open/read/status/check/write passes over one mutated image."""

    def __init__(self, harness: _Harness, case: Case, index: int, image: bytes, path: str,
                 outcome: CaseOutcome):
        self.harness = harness
        self.case = case
        self.index = index
        self.image = image
        self.path = path
        self.outcome = outcome
        self.limits = harness.limits

    def fail(self, kind: str, message: str, detail: str = "", where: str = "") -> None:
        self.outcome.failures.append(FuzzFailure(
            kind, self.outcome.phase, message, self.case.spec(), self.harness.seed, self.index,
            detail=detail, where=where or self.outcome.phase, image=self.image))

    def step(self, phase: str, action: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one driver call: (True, result), or (False, None) after a refusal or failure."""
        if self.outcome.timed_out:
            return False, None  # unwinding after the alarm: touch the driver no more
        self.outcome.phase = phase
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        exhausted = False
        try:
            return True, action()
        except _CaseTimeout:
            self.outcome.timed_out = True
            raise
        except CorefmtError as error:
            if not str(error).strip():
                self.fail(KIND_MESSAGE, f"{type(error).__name__} with message {str(error)!r}",
                          _short_traceback(error), where=_innermost(error))
            return False, None
        except MemoryError as error:
            exhausted = True
            self.fail(KIND_MEMORY, f"MemoryError {error}".strip() + " (allocation refused "
                      f"beyond {self.limits.headroom / MiB:.0f} MiB of address space)",
                      _short_traceback(error), where=_innermost(error))
            return False, None
        except Exception as error:
            self.fail(KIND_EXCEPTION, f"{type(error).__name__}: {error}",
                      _short_traceback(error), where=_innermost(error))
            return False, None
        finally:
            peak = tracemalloc.get_traced_memory()[1] - baseline
            self.outcome.peak = max(self.outcome.peak, peak)
            if peak > self.limits.memory and not exhausted:
                self.fail(KIND_MEMORY, f"allocated {peak / MiB:.0f} MiB "
                          f"(limit {self.limits.memory / MiB:.0f} MiB)")

    # -- passes -------------------------------------------------------------------
    def run(self) -> None:
        self.step("probe", self.probe)
        expected = self.harness.expected_guest(self.case, self.image)
        opened, node = self.step("open read-only", lambda: self.open(read_only=True))
        if opened:
            self.outcome.opened = True
            try:
                self.read_pass(node, expected)
            finally:
                self.step("close", node.close)
        elif not self.outcome.failures:
            self.outcome.refused = True
        opened, node = self.step("open read-write", lambda: self.open(read_only=False))
        if opened:
            try:
                self.write_pass(node)
            finally:
                self.step("close", node.close)

    def probe(self) -> None:
        score = self.harness.driver.probe(self.image[:PROBE_HEAD_SIZE], self.path)
        if not isinstance(score, int):
            self.fail(KIND_BAD_RESULT, f"probe returned {score!r}, not an int")

    def open(self, read_only: bool) -> BlockNode:
        node = open_chain(self.path, self.harness.format, read_only=read_only,
                          registry=self.harness.registry)
        size = node.virtual_size
        if not isinstance(size, int) or size < 0:
            node.close()
            self.fail(KIND_BAD_RESULT, f"virtual size {size!r} is not a size")
            raise _Refused
        return node

    def windows(self, size: int) -> list[tuple[int, int]]:
        """Ranges to read: everything up to the budget, else spread samples."""
        budget = self.limits.read_budget
        if size <= budget:
            return [(start, min(READ_CHUNK, size - start)) for start in range(0, size, READ_CHUNK)]
        starts = {0, align_down(size - SAMPLE_LENGTH, SECTOR_SIZE)}
        starts.update(align_down(size // (SAMPLED_WINDOWS + 1) * k, SECTOR_SIZE)
                      for k in range(1, SAMPLED_WINDOWS + 1))
        return [(start, min(SAMPLE_LENGTH, size - start)) for start in sorted(starts)]

    def read_pass(self, node: BlockNode, expected: bytes | None) -> None:
        size = node.virtual_size
        windows = self.windows(size)
        if expected is not None and len(expected) != size:
            self.outcome.phase = "open read-only"
            self.fail(KIND_WRONG_DATA, f"virtual size is {size}, the data says {len(expected)}")
            expected = None
        if size <= self.limits.read_budget:
            self.step("block_status", lambda: node.block_status(0, size))
        for offset, length in windows:
            self.step("block_status", lambda o=offset, n=length: node.block_status(o, n))
        for offset, length in windows:
            ok, data = self.step("read", lambda o=offset, n=length: node.read(o, n))
            if ok and expected is not None and data != expected[offset:offset + length]:
                bad = next(i for i, (a, b) in enumerate(zip(data, expected[offset:],
                                                            strict=False)) if a != b)
                self.fail(KIND_WRONG_DATA, f"read at {offset + bad:#x} differs from "
                          "what the image holds")
                break
        self.check(node, repair=False)

    def check(self, node: BlockNode, repair: bool) -> None:
        image = node.image
        if image is None or not supports(image, "check"):
            return
        fix = CheckFix.ALL if repair else CheckFix.NONE
        ok, result = self.step("check", lambda: call_check(image, fix))
        if ok and not isinstance(result, CheckResult):
            self.fail(KIND_BAD_RESULT, f"check returned {result!r}, not a CheckResult")

    def write_pass(self, node: BlockNode) -> None:
        self.check(node, repair=True)
        size = node.virtual_size
        rng = random.Random(self.case.spec())
        for offset, length in WRITE_PROBES:
            start = offset if offset >= 0 else size + offset
            if start < 0 or start + length > size:
                continue
            data = rng.randbytes(length)
            written, _ = self.step("write", lambda s=start, d=data: node.write(s, d))
            if not written:
                continue
            ok, seen = self.step("read back", lambda s=start, n=length: node.read(s, n))
            if ok and seen != data:
                self.fail(KIND_WRONG_DATA, f"{length} bytes written at {start:#x} "
                          "read back differently")
        self.step("flush", node.flush)


class _Refused(CorefmtError):
    """The harness refused an open itself (after recording why)."""

    def __init__(self) -> None:
        super().__init__("refused by the fuzzer")


# -- hypothesis strategies -------------------------------------------------------------
def _interesting_values(width: int, seed: SeedImage) -> list[int]:
    bits = 8 * width
    mask = (1 << bits) - 1
    values = {0, 1, 2, 3, 4, 7, 8, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 511, 512, 4095, 4096,
              0xFFFF, 0x10000, mask, mask - 1, mask >> 1, (mask >> 1) + 1,
              (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 48, 1 << 62, 1 << 63}
    values.update(1 << k for k in range(bits))
    for base in (len(seed.data), seed.virtual_size, HEAD_REGION):
        values.update((base - 1, base, base + 1, base + SECTOR_SIZE, base + HEAD_REGION,
                       base * 2, base * 1024))
    return sorted({value & mask for value in values if value >= 0})


def case_strategy(seeds: dict[str, SeedImage]) -> Any:
    """Hypothesis strategy of Cases over the given seed images."""
    st = _require_hypothesis().strategies
    names = sorted(seeds)
    interesting = {(name, width): _interesting_values(width, seeds[name])
                   for name in names for width in OVERWRITE_WIDTHS}

    def offset(draw: Any, seed: SeedImage, length: int) -> int:
        region = draw(st.sampled_from(OFFSET_REGIONS))
        if region == "metadata" and seed.metadata_offsets:
            value = draw(st.sampled_from(seed.metadata_offsets)) + draw(
                st.integers(0, METADATA_WORD - 1))
        elif region == "data" and seed.pieces:
            value = draw(st.sampled_from(seed.pieces))[0] + draw(
                st.integers(0, PAYLOAD_PIECE - 1))
        elif region == "header":
            value = draw(st.integers(0, min(length, HEADER_REGION) - 1))
        elif region == "head":
            value = draw(st.integers(0, min(length, HEAD_REGION) - 1))
        else:
            value = draw(st.integers(0, length - 1))
        return min(value, length - 1)

    def mutation(draw: Any, seed: SeedImage, current: bytes) -> Mutation:
        length = len(current)
        kind = draw(st.sampled_from(MUTATION_KINDS)) if length else "extend"
        if kind == "extend":
            extra = draw(st.one_of(st.sampled_from((1, 511, SECTOR_SIZE, HEAD_REGION,
                                                     MAX_EXTENSION)),
                                   st.integers(1, MAX_EXTENSION)))
            return Extend(extra, draw(st.sampled_from((0, 0xFF, 0x5A))))
        if kind == "truncate":
            cut = draw(st.one_of(
                st.sampled_from((0, 1, 8, 16, 32, 64, HEADER_REGION, HEAD_REGION, length - 1,
                                 length - SECTOR_SIZE, length // 2)),
                st.sampled_from(seed.metadata_offsets or [0]),
                st.integers(0, length - 1)))
            return Truncate(min(max(cut, 0), length))
        if kind == "flip":
            return BitFlip(offset(draw, seed, length), draw(st.integers(0, 7)))
        if kind == "copy":
            width = draw(st.sampled_from(OVERWRITE_WIDTHS))
            return CopyBytes(offset(draw, seed, length), offset(draw, seed, length), width)
        width = draw(st.sampled_from(OVERWRITE_WIDTHS))
        where = offset(draw, seed, length)
        if draw(st.booleans()):
            where = align_down(where, width)
        big_endian = draw(st.booleans())
        mask = (1 << (8 * width)) - 1
        original = int.from_bytes(current[where:where + width].ljust(width, b"\0"),
                                  "big" if big_endian else "little")
        derived = [original + 1, original - 1, original * 2, original // 2,
                   original + SECTOR_SIZE, original + HEAD_REGION, original << 8,
                   original ^ mask]
        value = draw(st.one_of(st.sampled_from(interesting[(seed.name, width)]),
                               st.sampled_from([v & mask for v in derived]),
                               st.integers(0, mask)))
        return Overwrite(where, width, value, big_endian)

    @st.composite
    def cases(draw: Any) -> Case:
        seed = seeds[draw(st.sampled_from(names))]
        current = bytearray(seed.data)
        mutations: list[Mutation] = []
        for _ in range(draw(st.sampled_from(MUTATION_COUNTS))):
            step = mutation(draw, seed, bytes(current))
            step.apply(current)
            mutations.append(step)
        return Case(seed.name, tuple(mutations))

    return cases()


# -- entry points ------------------------------------------------------------------------
def fuzz_format(name: str, examples: int = DEFAULT_EXAMPLES, seed: int = 0, *,
                limits: FuzzLimits | None = None, registry: Registry | None = None,
                shrink: bool = True, options: str = "") -> FuzzReport:
    """Fuzz one installed format with ``examples`` mutated images.

    Deterministic for a given seed (and hypothesis version). Failures are
    deduplicated by kind and place, and (with ``shrink``) reduced to the
    fewest mutations that still fail the same way.
    """
    hypothesis = _require_hypothesis()
    if examples < 0:
        raise FuzzSetupError("the number of examples must not be negative")
    registry = registry or plugins.registry()
    limits = limits or FuzzLimits()
    report = FuzzReport(format=name, seed=seed, examples=examples, options=options)
    started = time.monotonic()
    with _Harness(name, registry, limits, seed, options) as harness:
        def one_case(case: Case) -> None:
            if report.aborted:
                return
            index = report.cases
            report.cases += 1
            try:
                outcome = harness.run(case, index)
            except _RunAborted:
                report.aborted = True
                outcome = CaseOutcome(failures=[FuzzFailure(
                    KIND_HANG, "run", "a case's worker thread is still running; stopped",
                    case.spec(), seed, index, where="run")])
            _record(report, outcome)

        if examples:
            settings = hypothesis.settings(
                max_examples=examples, database=None, deadline=None,
                phases=[hypothesis.Phase.generate], derandomize=False,
                suppress_health_check=list(hypothesis.HealthCheck),
                verbosity=hypothesis.Verbosity.quiet)
            test = hypothesis.given(case_strategy(harness.seeds))(one_case)
            settings(hypothesis.seed(seed)(test))()
        if shrink and not report.aborted:
            for failure in report.failures[:MAX_SHRUNK_FAILURES]:
                _shrink(harness, failure)
    report.elapsed = time.monotonic() - started
    return report


def _record(report: FuzzReport, outcome: CaseOutcome) -> None:
    report.opened += int(outcome.opened)
    report.refused += int(outcome.refused)
    report.peak_memory = max(report.peak_memory, outcome.peak)
    if outcome.failures:
        report.failed_cases += 1
    for failure in outcome.failures:
        report.add(failure)


def _shrink(harness: _Harness, failure: FuzzFailure) -> None:
    """Drop mutations one at a time while the same failure still happens."""
    if failure.kind == KIND_HANG:
        return  # each replay would cost a whole timeout
    case = Case.parse(failure.spec)
    budget = SHRINK_BUDGET
    progress = True
    while progress and len(case.mutations) > 1 and budget > 0:
        progress = False
        for drop in range(len(case.mutations)):
            if budget <= 0:
                break
            budget -= 1
            smaller = Case(case.seed_image, case.mutations[:drop] + case.mutations[drop + 1:])
            try:
                outcome = harness.run(smaller, failure.case_index)
            except _RunAborted:
                return
            same = next((f for f in outcome.failures if f.signature == failure.signature), None)
            if same is not None:
                case = smaller
                failure.spec, failure.image = same.spec, same.image
                failure.message, failure.detail = same.message, same.detail
                progress = True
                break


def replay_case(name: str, spec: str, *, limits: FuzzLimits | None = None,
                registry: Registry | None = None, options: str = "") -> FuzzReport:
    """Run the one case a spec describes (no hypothesis needed)."""
    case = Case.parse(spec)
    registry = registry or plugins.registry()
    report = FuzzReport(format=name, seed=0, examples=1, cases=1, options=options)
    started = time.monotonic()
    with _Harness(name, registry, limits or FuzzLimits(), seed=0, options=options) as harness:
        try:
            outcome = harness.run(case, 0)
        except _RunAborted:
            report.aborted = True
            outcome = CaseOutcome(failures=[FuzzFailure(
                KIND_HANG, "run", "the case's worker thread is still running", spec, 0, 0,
                where="run")])
    _record(report, outcome)
    report.elapsed = time.monotonic() - started
    return report


def mutated_image(name: str, spec: str, *, registry: Registry | None = None,
                  options: str = "") -> bytes:
    """The exact bytes a spec describes (to save a reproducer as a file)."""
    registry = registry or plugins.registry()
    with _Harness(name, registry, FuzzLimits(), seed=0, options=options) as harness:
        return harness.mutate(Case.parse(spec))

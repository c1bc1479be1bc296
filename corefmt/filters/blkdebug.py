"""blkdebug (QEMU's name): fault injection on the storage below a format,
driven by the named events the block layer and the drivers emit.

It wraps the Storage an image lives on, so it sees the driver's metadata
I/O as well as guest data, and the events (``read_aio``, ``write_aio``,
``flush_to_disk`` from the core before every data request; ``l2_update``
and the like from drivers through ``context.emit``).

The rules follow QEMU's blkdebug (qapi BlkdebugInjectErrorOptions,
docs/devel/blkdebug.txt):

- ``inject-error`` rules: an event *activates* its rules (those whose
  ``state`` is 0 or the current state), replacing the rules active so
  far. The next request that matches an active rule fails with its
  ``errno`` (default EIO): it must be of the rule's ``iotype`` (default:
  read, write, write-zeroes, discard, flush) and cover byte
  ``sector * 512`` (``sector`` -1: any request, the only kind a flush
  matches). The first matching rule in the order given wins; a ``once``
  rule is then removed for good, any other stays active, so every later
  matching request fails too. ``immediately`` is accepted for QEMU
  compatibility; requests here fail synchronously either way.
- ``set-state`` rules: at their event, in their ``state`` (0: any), the
  state (initially 1) becomes ``new_state``.
- ``config``: a file of further rules in QEMU's .ini-like format
  (``[inject-error]`` sections of ``key = "value"`` lines), read first.

corefmt extension: rule key ``action`` is ``error`` (default) or
``powercut``. A powercut rule acts at the event itself: a simulated disk
below (``sim:``) loses power through its own mechanism (unflushed writes
are lost as a volatile cache loses them; ``seed`` picks which survive);
over any other storage every later request fails with EIO and nothing
more reaches the file. Size queries still answer: they change nothing.
"""

from __future__ import annotations

import errno
import os
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from corefmt import sync
from corefmt.errors import OptionError, StorageError
from corefmt.filters.base import StorageFilterDriver
from corefmt.options import option, to_bool, to_size
from corefmt.storage.base import Storage
from corefmt.storage.simulated import SimStorage

SECTOR_SIZE = 512
ANY_SECTOR = -1
#: The state every blkdebug node starts in (QEMU's).
INITIAL_STATE = 1
#: A rule's ``state`` 0 matches in every state.
ANY_STATE = 0
ACTION_ERROR, ACTION_POWERCUT = "error", "powercut"
IO_READ, IO_WRITE, IO_WRITE_ZEROES = "read", "write", "write-zeroes"
IO_DISCARD, IO_FLUSH, IO_BLOCK_STATUS = "discard", "flush", "block-status"
IO_TYPES = (IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH, IO_BLOCK_STATUS)
#: What a rule without ``iotype`` fails (QEMU's default mask: not block-status).
DEFAULT_IO_TYPES = frozenset(IO_TYPES) - {IO_BLOCK_STATUS}
KEY_INJECT_ERROR, KEY_SET_STATE = "inject-error", "set-state"
#: qemu_config_parse's line shapes: ``[group]``, ``[group "id"]``, ``key = "value"``.
_CONFIG_GROUP = re.compile(r'\[\s*([^\]\s"]+)\s*(?:"[^"]*"\s*)?\]')
_CONFIG_VALUE = re.compile(r'([^\s=]+)\s*=\s*"([^"]*)"')


# -- rule options ---------------------------------------------------------------
def _number(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise OptionError(f"Parameter '{name}' expects a number")


def _flag(value: Any, name: str) -> bool:
    try:
        return to_bool(value)
    except ValueError:
        raise OptionError(f"Parameter '{name}' expects 'on' or 'off'") from None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise OptionError(f"Parameter '{name}' expects a string")
    return value


@attrs.frozen(eq=False)  # identity: two equal rules are still two rules
class InjectErrorRule:
    event: str
    errno: int = errno.EIO
    sector: int = ANY_SECTOR
    once: bool = False
    immediately: bool = False
    iotype: str | None = None
    state: int = ANY_STATE
    action: str = ACTION_ERROR
    seed: int = 0

    @property
    def io_types(self) -> frozenset[str]:
        return DEFAULT_IO_TYPES if self.iotype is None else frozenset({self.iotype})

    def matches(self, io_type: str, offset: int, length: int) -> bool:
        if io_type not in self.io_types:
            return False
        if self.sector == ANY_SECTOR:
            return True
        return length > 0 and offset <= self.sector * SECTOR_SIZE < offset + length


@attrs.frozen(eq=False)
class SetStateRule:
    event: str
    new_state: int
    state: int = ANY_STATE


def _parse_inject_error(rule: Mapping[str, Any], name: str) -> InjectErrorRule:
    values: dict[str, Any] = {}
    for key, value in rule.items():
        field = key.replace("-", "_")
        where = f"{name}.{key}"
        if field == "event":
            values[field] = _text(value, where)
        elif field in ("errno", "sector", "state", "seed"):
            values[field] = _number(value, where)
        elif field in ("once", "immediately"):
            values[field] = _flag(value, where)
        elif field == "iotype":
            values[field] = _text(value, where)
            if value not in IO_TYPES:
                raise OptionError(f"Parameter '{where}' does not accept value '{value}' "
                                  f"(one of: {', '.join(IO_TYPES)})")
        elif field == "action":
            values[field] = _text(value, where)
            if value not in (ACTION_ERROR, ACTION_POWERCUT):
                raise OptionError(f"Parameter '{where}' does not accept value '{value}' "
                                  f"(one of: {ACTION_ERROR}, {ACTION_POWERCUT})")
        else:
            raise OptionError(f"Invalid parameter '{where}'")
    if not values.get("event"):
        raise OptionError(f"Missing event name for rule {name}")
    if values.get("errno", 0) < 0:
        raise OptionError(f"Parameter '{name}.errno' must not be negative")
    if values.get("sector", ANY_SECTOR) < ANY_SECTOR:
        raise OptionError(f"Parameter '{name}.sector' must be -1 (any) or a sector number")
    return InjectErrorRule(**values)


def _parse_set_state(rule: Mapping[str, Any], name: str) -> SetStateRule:
    values: dict[str, Any] = {}
    for key, value in rule.items():
        field = key.replace("-", "_")
        where = f"{name}.{key}"
        if field == "event":
            values[field] = _text(value, where)
        elif field in ("state", "new_state"):
            values[field] = _number(value, where)
        else:
            raise OptionError(f"Invalid parameter '{where}'")
    if not values.get("event"):
        raise OptionError(f"Missing event name for rule {name}")
    if "new_state" not in values:
        raise OptionError(f"Parameter '{name}.new_state' is missing")
    return SetStateRule(**values)


def _rule_list(value: Any, key: str, kind: type, parse: Any) -> tuple[Any, ...]:
    """Rules from json (a list of dicts), dotted keys (the same, every value a
    string), one dict (a single rule) or rule objects (the Python API)."""
    if value is None:
        return ()
    items: Iterable[Any] = [value] if isinstance(value, Mapping | kind) else value
    if isinstance(value, str) or not isinstance(items, Iterable):
        raise OptionError(f"Parameter '{key}' expects a list of rules")
    rules = []
    for index, item in enumerate(items):
        if isinstance(item, kind):
            rules.append(item)
        elif isinstance(item, Mapping):
            rules.append(parse(item, f"{key}.{index}"))
        else:
            raise OptionError(f"Parameter '{key}.{index}' expects a rule (an object)")
    return tuple(rules)


def inject_error_rules(value: Any) -> tuple[InjectErrorRule, ...]:
    return _rule_list(value, KEY_INJECT_ERROR, InjectErrorRule, _parse_inject_error)


def set_state_rules(value: Any) -> tuple[SetStateRule, ...]:
    return _rule_list(value, KEY_SET_STATE, SetStateRule, _parse_set_state)


def _power_of_two(_instance: object, _attribute: attrs.Attribute, value: int) -> None:
    if value and value & (value - 1):
        raise ValueError("Invalid alignment, align must be integer power of 2")


@attrs.frozen
class BlkdebugOptions:
    inject_error: tuple[InjectErrorRule, ...] = option(
        (), "rules: at 'event', fail matching requests with 'errno' (or cut the power)",
        converter=inject_error_rules)
    set_state: tuple[SetStateRule, ...] = option(
        (), "rules: at 'event' in 'state', switch to 'new_state'", converter=set_state_rules)
    config: str | None = option(None, "file of further rules (QEMU's blkdebug config format)")
    align: int = option(0, "request alignment of the file (0: the file's own)",
                        converter=to_size, validator=_power_of_two)


def parse_config(text: str, path: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """QEMU's blkdebug config text: ([inject-error] sections, [set-state] sections)."""
    groups: dict[str, list[dict[str, str]]] = {KEY_INJECT_ERROR: [], KEY_SET_STATE: []}
    section: dict[str, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group = _CONFIG_GROUP.fullmatch(line)
        value = _CONFIG_VALUE.fullmatch(line)
        if group:
            if group.group(1) not in groups:
                raise OptionError(f"{path}:{number}: There is no option group "
                                  f"'{group.group(1)}'")
            section = {}
            groups[group.group(1)].append(section)
        elif value and section is not None:
            section[value.group(1)] = value.group(2)
        else:
            raise OptionError(f"{path}:{number}: Could not parse blkdebug config file")
    return groups[KEY_INJECT_ERROR], groups[KEY_SET_STATE]


# -- the storage wrapper -----------------------------------------------------------
class BlkdebugStorage(Storage):
    """Passes requests to ``inner`` unless a rule fails them."""

    def __init__(self, inner: Storage, inject_error: Iterable[InjectErrorRule] = (),
                 set_state: Iterable[SetStateRule] = (), align: int = 0):
        super().__init__(inner.path, inner.read_only)
        self.inner = inner
        self.request_alignment = align or inner.request_alignment
        self._lock = sync.Lock()
        self._rules: list[InjectErrorRule] = list(inject_error)
        self._set_state = list(set_state)
        self._active: list[InjectErrorRule] = []
        self.state = INITIAL_STATE
        #: No power (over a storage that cannot lose power itself).
        self.powered_off = False
        self.events: dict[str, int] = {}
        self.errors_injected = 0

    # -- events ---------------------------------------------------------------------
    def debug_event(self, event: str) -> None:
        """Activate the event's rules; set-state and powercut rules act now."""
        cut: InjectErrorRule | None = None
        with self._lock:
            self.events[event] = self.events.get(event, 0) + 1
            state = self.state

            def applies(rule: InjectErrorRule | SetStateRule) -> bool:
                return rule.event == event and rule.state in (ANY_STATE, state)

            firing = [rule for rule in self._rules if applies(rule)]
            errors = [rule for rule in firing if rule.action == ACTION_ERROR]
            if errors:
                self._active = errors
            cut = next((rule for rule in firing if rule.action == ACTION_POWERCUT), None)
            # QEMU walks an event's rules newest first, so the first given wins.
            for rule in reversed(self._set_state):
                if applies(rule):
                    self.state = rule.new_state
        if cut is not None:
            self.cut_power(cut.seed)

    def cut_power(self, seed: int = 0) -> None:
        """The storage below loses power now (see the module docstring)."""
        below = self.inner
        if isinstance(below, SimStorage):
            below.disk.power_cut(random.Random(seed))
        elif isinstance(below, BlkdebugStorage):
            below.cut_power(seed)
        else:
            with self._lock:
                self.powered_off = True

    def _check(self, io_type: str, operation: str, offset: int = 0, length: int = 0) -> None:
        """Fail this request if the power is off or an active rule matches it."""
        with self._lock:
            if self.powered_off:
                code = errno.EIO
            else:
                rule = next((rule for rule in self._active
                             if rule.matches(io_type, offset, length)), None)
                if rule is None or not rule.errno:
                    return
                if rule.once:
                    self._active = [other for other in self._active if other is not rule]
                    self._rules = [other for other in self._rules if other is not rule]
                self.errors_injected += 1
                code = rule.errno
        raise StorageError(self.path, operation, OSError(code, os.strerror(code)))

    # -- requests -------------------------------------------------------------------
    def size(self) -> int:
        return self.inner.size()

    def allocated_size(self) -> int | None:
        return self.inner.allocated_size()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self._check(IO_READ, "read", offset, len(buf))
        self.inner.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        self._check(IO_WRITE, "write", offset, len(data))
        self.inner.write(offset, data)

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        self.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self._check(IO_WRITE_ZEROES, "write_zeroes", offset, length)
        self.inner.write_zeroes(offset, length, unmap=unmap)

    def write_zero_bytes(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check(IO_WRITE_ZEROES, "write_zeroes", offset, length)
        self.inner.write_zero_bytes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check(IO_DISCARD, "discard", offset, length)
        self.inner.discard(offset, length)

    def zero_before_write(self, offset: int, length: int) -> bool:
        self._check_writable()
        self._check(IO_WRITE_ZEROES, "write_zeroes", offset, length)
        return self.inner.zero_before_write(offset, length)

    def flush(self) -> None:
        self._check(IO_FLUSH, "flush")
        self.inner.flush()

    def truncate(self, size: int) -> None:
        self._check_writable()
        self._check("truncate", "truncate")  # no rule matches it; a power cut does
        self.inner.truncate(size)

    def _truncate(self, size: int) -> None:
        self.truncate(size)

    def _grow(self, size: int) -> int:
        self._check("truncate", "truncate")
        return self.inner.grow_to(size)

    def has_zero_init(self) -> bool:
        return self.inner.has_zero_init()  # a device below stays a device

    def preallocate(self, offset: int, length: int) -> bool:
        self._check("preallocate", "preallocate")
        return self.inner.preallocate(offset, length)

    def data_run(self, offset: int, length: int) -> tuple[bool, int]:
        self._check(IO_BLOCK_STATUS, "block status", offset, length)
        return self.inner.data_run(offset, length)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        """What this wrapper does not change (creation hints...) is the inner store's."""
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "events": dict(self.events),
                    "errors-injected": self.errors_injected, "powered-off": self.powered_off}


class BlkdebugDriver(StorageFilterDriver):
    name = "blkdebug"
    open_options = BlkdebugOptions
    child_key = "image"

    def wrap(self, storage: Storage, options: BlkdebugOptions) -> BlkdebugStorage:
        inject_error: list[InjectErrorRule] = []
        set_state: list[SetStateRule] = []
        if options.config is not None:
            try:
                with open(options.config, encoding="utf-8") as file:
                    text = file.read()
            except OSError as error:
                raise OptionError(f"Could not read blkdebug config file: "
                                  f"{error.strerror}") from None
            injected, states = parse_config(text, options.config)
            inject_error += inject_error_rules(injected)
            set_state += set_state_rules(states)
        return BlkdebugStorage(storage, [*inject_error, *options.inject_error],
                               [*set_state, *options.set_state], align=options.align)

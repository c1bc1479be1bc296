"""Measuring what a new image needs (qemu-img measure).

The target format's driver does the arithmetic (``FormatDriver.measure(size,
options, source)``); this module does what qemu-img does around it, in its
order and with its words: the argument checks, the source image, the target
format, and the ``-o`` text parsed as qemu parses it (names and value types
only: bad values are refused by the driver's measure, and only the values
it uses, as qemu's drivers do).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.node import BlockNode
from corefmt.capabilities import MeasureResult
from corefmt.driver import BackingRef, FormatDriver, accepts_keyword
from corefmt.errors import CorefmtError, OptionError
from corefmt.options import KIND_BOOL, KIND_NUMBER, KIND_SIZE, KIND_STRING
from corefmt.registry import Registry

#: Options every format's -o takes (as qemu-img's), and those of formats with backing files.
GENERIC_OPTIONS = {"size": KIND_SIZE}
BACKING_OPTIONS = {"backing_file": KIND_STRING, "backing_fmt": KIND_STRING}
#: qemu's largest image size (int64), and -o sizes' (uint64).
MAX_IMAGE_SIZE = 2**63 - 1
MAX_OPTION_SIZE = 2**64 - 1

SIZE_SUFFIX_HINT = ("Invalid {what} specified. You may use k, M, G, T, P or E suffixes for",
                    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
OPTION_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively.")
#: qapi_bool_parse's words.
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
_SUFFIXES = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}
_DECIMAL = re.compile(r"(\d+)(\.\d*)?")
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+)")


class MeasureError(OptionError):
    """A refusal qemu-img reports as several messages (each printed with the
    program's name; a message may hold hint lines printed without it)."""

    def __init__(self, *reports: str):
        super().__init__("\n".join(reports))
        self.reports = reports


class _Range(Exception):
    """A size above what qemu's parser holds (ERANGE)."""


# -- qemu's number parsers ------------------------------------------------------------
def strtosz(text: str) -> int:
    """qemu_strtosz: a decimal (fraction allowed with a suffix) or hex number
    with an optional B/k/M/G/T/P/E suffix; ValueError if malformed, _Range
    above 2**64 - 1."""
    body = text.lstrip()
    hex_match = _HEX.match(body)
    if hex_match:
        whole, fraction, rest = int(hex_match.group(1), 16), "", body[hex_match.end():]
    else:
        match = _DECIMAL.match(body)
        if not match:
            raise ValueError(text)
        whole, fraction, rest = int(match.group(1)), match.group(2) or "", body[match.end():]
    multiplier = 1
    if rest[:1].lower() in _SUFFIXES and rest:
        multiplier, rest = _SUFFIXES[rest[0].lower()], rest[1:]
    if rest:
        raise ValueError(text)
    fraction_value = float("0" + fraction) if fraction else 0.0
    if fraction_value and multiplier == 1:
        raise ValueError(text)  # a fraction needs a scale
    value = whole * multiplier + int(fraction_value * multiplier)
    if value > MAX_OPTION_SIZE:
        raise _Range(text)
    return value


def image_size(text: str | int, what: str = "image size") -> int:
    """qemu-img's cvtnum: --size N, with its two messages."""
    if isinstance(text, int):
        value = text
    else:
        try:
            value = strtosz(text)
        except _Range:
            value = MAX_IMAGE_SIZE + 1
        except ValueError:
            first, second = SIZE_SUFFIX_HINT
            raise MeasureError(first.format(what=what), second) from None
    if not 0 <= value <= MAX_IMAGE_SIZE:
        raise MeasureError(f"Invalid {what} specified. Must be between 0 and "
                           f"{MAX_IMAGE_SIZE}.")
    return value


def _strtou64(text: str) -> int:
    """qemu_strtou64 with base 0 (decimal, 0x hex, 0 octal; leading blanks)."""
    body = text.lstrip()
    negative = body.startswith("-")
    digits = body[1:] if negative or body.startswith("+") else body
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", digits):
        value = int(digits, 16)
    elif re.fullmatch(r"0[0-7]*", digits):
        value = int(digits, 8)
    elif re.fullmatch(r"[1-9][0-9]*", digits):
        value = int(digits)
    else:
        raise ValueError(text)
    if value > MAX_OPTION_SIZE:
        raise _Range(text)
    return (-value) % 2**64 if negative else value


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check of one -o argument: not empty, no leading comma, no
    unescaped trailing comma."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def split_options(text: str) -> list[tuple[str, str]]:
    """qemu_opts_do_parse's split: ``key=value`` pairs (``,,`` is a comma in a
    value), ``key`` alone meaning ``key=on`` and ``nokey`` ``key=off`` where
    ``key`` is not itself a name."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        end = position
        while end < len(text) and text[end] not in "=,":
            end += 1
        key = text[position:end]
        if end < len(text) and text[end] == "=":
            value_chars = []
            position = end + 1
            while position < len(text):
                if text[position] == ",":
                    if text[position + 1:position + 2] == ",":
                        value_chars.append(",")
                        position += 2
                        continue
                    break
                value_chars.append(text[position])
                position += 1
            pairs.append((key, "".join(value_chars)))
        else:
            pairs.append((key, "\0flag"))
            position = end
        position += 1  # the comma
    return pairs


# -- the target format's options --------------------------------------------------------
def _option_kinds(driver: FormatDriver) -> dict[str, tuple[str, str | None]]:
    """qemu's option names for -O FMT: {name: (kind, field name or None for the
    generic ones)}."""
    kinds: dict[str, tuple[str, str | None]] = {
        name: (kind, None) for name, kind in GENERIC_OPTIONS.items()}
    if driver.supports_backing:
        kinds |= {name: (kind, None) for name, kind in BACKING_OPTIONS.items()}
    if driver.create_options is not None and attrs.has(driver.create_options):
        for field in attrs.fields(driver.create_options):
            name = field.metadata.get("key") or field.name
            kinds[name] = (field.metadata.get("kind", KIND_STRING), field.name)
    return kinds


def _typed(name: str, kind: str, text: str) -> Any:
    """One value as qemu_opts parses its type (bool, number, size; strings as given)."""
    flag = text == "\0flag"
    if kind == KIND_BOOL:
        word = "on" if flag else text
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")
    text = "on" if flag else text
    try:
        if kind == KIND_NUMBER:
            return _strtou64(text)
        if kind == KIND_SIZE:
            return strtosz(text)
    except _Range:
        raise OptionError(f"Value '{text}' is out of range for parameter '{name}'") from None
    except ValueError:
        if kind == KIND_NUMBER:
            raise OptionError(f"Parameter '{name}' expects a number") from None
        raise OptionError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                          + OPTION_SIZE_HINT) from None
    return text


def parse_measure_options(driver: FormatDriver, options: str | Sequence[str] | None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """-o text for -O FMT as qemu-img measure parses it: (generic values by
    name, the format's values by field name); the last of a name wins."""
    text = options if isinstance(options, str) else ",".join(options or ())
    kinds = _option_kinds(driver)
    generic: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in split_options(text) if text else []:
        if value == "\0flag" and key not in kinds and key.startswith("no") and key[2:] in kinds:
            key, value = key[2:], "off"
        try:
            if key not in kinds:
                raise OptionError(f"Invalid parameter '{key}'")
            kind, field = kinds[key]
            typed = _typed(key, kind, value)
        except OptionError as error:
            raise MeasureError(str(error), f"Invalid options for file format '{driver.name}'"
                               ) from None
        if field is None:
            generic[key] = typed
        else:
            values[field] = typed
    return generic, values


def build_measure_options(driver: FormatDriver, values: Mapping[str, Any]) -> Any:
    """The format's create options from parsed values. Only the converters run
    (a value whose type is right but whose word is wrong is the driver's
    measure to refuse, if it uses it: qemu's measure ignores the others); a
    converter's refusal is reported in its own words."""
    cls = driver.create_options
    if cls is None or not attrs.has(cls):
        return None
    for field in attrs.fields(cls):
        if field.name in values and field.converter is not None:
            try:
                field.converter(values[field.name])
            except (OptionError, ValueError, TypeError) as error:
                raise OptionError(str(error)) from None
    with attrs.validators.disabled():
        return cls(**values)


# -- the verb -------------------------------------------------------------------------
def measure(source: str | Mapping[str, Any] | BlockNode | None = None, *,
            size: int | str | None = None, target_format: str = "raw",
            options: str | Sequence[str] | None = None, source_format: str | None = None,
            snapshot: str | None = None, image_opts: bool = False,
            allow_protocols: Sequence[str] = (), force_share: bool = False,
            registry: Registry | None = None) -> MeasureResult:
    """What an image of ``target_format`` needs for ``size`` bytes or for the
    content of ``source`` (a filename, a graph spec or an open node), as
    qemu-img measure: the refusals come in qemu-img's order and words."""
    check_arguments(source is not None, size, image_opts=image_opts,
                    source_format=source_format, snapshot=snapshot)
    if snapshot is not None:  # qemu-img: a bad -l is refused before anything opens
        from corefmt.ops.snapshot import parse_snapshot_option

        parse_snapshot_option(snapshot)
    byte_size = image_size(size) if size is not None else None
    registry = registry or plugins.registry()
    if isinstance(source, BlockNode):
        return _measure(source, byte_size, target_format, options, snapshot, registry)
    if source is None:
        return _measure(None, byte_size, target_format, options, snapshot, registry)
    from corefmt.block.chain import open_chain

    with open_chain(source, source_format, read_only=True, registry=registry,
                    allow_protocols=list(allow_protocols), force_share=force_share) as node:
        return _measure(node, byte_size, target_format, options, snapshot, registry)


def check_arguments(has_source: bool, size: int | str | None, *, image_opts: bool = False,
                    source_format: str | None = None, snapshot: str | None = None) -> None:
    """qemu-img measure's refusals of the argument mix, in its order."""
    if not has_source and (image_opts or source_format or snapshot):
        raise OptionError("--image-opts, -f, and -l require a filename argument.")
    if has_source and size is not None:
        raise OptionError("--size N cannot be used together with a filename.")
    if not has_source and size is None:
        raise OptionError("Either --size N or one filename must be specified.")


def _measure(node: BlockNode | None, size: int | None, target_format: str,
             options: str | Sequence[str] | None, snapshot: str | None,
             registry: Registry) -> MeasureResult:
    if node is not None and snapshot is not None:
        _load_snapshot(node, snapshot)
    driver = registry.formats.get(target_format)
    if driver is None:
        raise OptionError(f"Unknown file format '{target_format}'")
    generic, values = parse_measure_options(driver, options)
    if size is not None:
        generic["size"] = size  # --size wins over -o size
    method = getattr(driver, "measure", None)
    if method is None:
        raise OptionError(f"Block driver '{driver.name}' does not support size measurement")
    parsed = build_measure_options(driver, values)
    keywords: dict[str, Any] = {}
    if "backing_file" in generic and accepts_keyword(method, "backing"):
        keywords["backing"] = BackingRef(generic["backing_file"], generic.get("backing_fmt"))
    result = method(generic.get("size", 0), parsed, node, **keywords)
    if not isinstance(result, MeasureResult):
        raise CorefmtError(f"{driver.name}: measure returned {result!r}, not a MeasureResult")
    return result


def _load_snapshot(node: BlockNode, name: str) -> None:
    """-l: measure an internal snapshot instead of the current state."""
    from corefmt.ops.snapshot import load_snapshot

    load_snapshot(node, name)


# -- output ---------------------------------------------------------------------------
def format_human(result: MeasureResult) -> str:
    lines = [f"required size: {result.required}",
             f"fully allocated size: {result.fully_allocated}"]
    if result.bitmaps is not None:
        lines.append(f"bitmaps size: {result.bitmaps}")
    return "\n".join(lines)


def format_json(result: MeasureResult) -> str:
    """qemu's BlockMeasureInfo JSON, keys in the order qemu prints them."""
    entries = []
    if result.bitmaps is not None:
        entries.append(("bitmaps", result.bitmaps))
    entries += [("required", result.required), ("fully-allocated", result.fully_allocated)]
    body = ",\n".join(f'    "{key}": {value}' for key, value in entries)
    return "{\n" + body + "\n}"

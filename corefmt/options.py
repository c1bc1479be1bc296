"""Create options: ``-o key=value,...`` text into a driver's attrs class.

Each format declares its options as an attrs class whose fields carry
converters and validators, so bad options fail here, at one boundary, with
a message that names the option and the format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from corefmt.errors import OptionError
from corefmt.sizes import parse_size

_TRUE_WORDS = {"on", "yes", "true", "1"}
_FALSE_WORDS = {"off", "no", "false", "0"}


@attrs.frozen
class NoOptions:
    """For formats that take no create options."""


def parse_option_string(text: str) -> dict[str, str]:
    """'a=1,b=x,,y' -> {'a': '1', 'b': 'x,y'} (',,' escapes a comma, as in qemu)."""
    result: dict[str, str] = {}
    if not text:
        return result
    parts: list[str] = []
    current = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char == "," and text[index + 1:index + 2] == ",":
            current += ","
            index += 2
            continue
        if char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
        index += 1
    parts.append(current)
    for part in parts:
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not key or not sep:
            raise OptionError(f"Invalid option '{part}': expected key=value")
        result[key] = value
    return result


#: The words ``to_bool`` takes.
BOOLEAN_WORDS = _TRUE_WORDS | _FALSE_WORDS


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"'{value}' is not on/off")


def to_size(value: Any) -> int:
    return parse_size(value if isinstance(value, int) else str(value))


def choice(*allowed: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """A validator that accepts only the listed words."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            names = ", ".join(str(word) for word in allowed)
            raise ValueError(f"{attribute.name}: '{value}' is not one of: {names}")

    return check


#: qemu-img's ``-o help`` type words, by converter.
KIND_SIZE, KIND_BOOL, KIND_NUMBER, KIND_STRING = "size", "bool (on/off)", "num", "str"


def option(default: Any, help: str, converter: Callable | None = None,
           validator: Callable | None = None, *, kind: str | None = None,
           protocol: bool = False, key: str | None = None) -> Any:
    """An attrs field that is also a documented option.

    ``kind`` is the type ``-o help`` shows (worked out from the converter
    when not given); ``protocol`` marks an option qemu keeps on the file
    (protocol) level, which ``create -o help`` lists only with a filename.
    ``key`` is the name users type when it is not a Python name (qemu's
    ``encrypt.format``); the field name is accepted too.
    """
    if kind is None:
        kind = {to_size: KIND_SIZE, to_bool: KIND_BOOL, int: KIND_NUMBER}.get(
            converter, KIND_STRING)  # type: ignore[arg-type]
    return attrs.field(default=default, converter=converter, validator=validator,
                       metadata={"help": help, "kind": kind, "protocol": protocol,
                                 "key": key})


def option_key(field: attrs.Attribute) -> str:
    """The name users give an option (``-o``, ``json:``)."""
    return field.metadata.get("key") or field.name


@attrs.frozen
class OptionHelp:
    """One line of ``-o help``."""

    name: str
    help: str
    default: Any
    kind: str = KIND_STRING
    protocol: bool = False

    def line(self) -> str:
        """qemu-img's layout (``"  %-22s - %s"``)."""
        return f"  {f'{self.name}=<{self.kind}>':<22} - {self.help}"


def option_help(cls: type) -> list[tuple[str, str, Any]]:
    """(name, help, default) for every option of a driver's options class."""
    return [(option_key(f), f.metadata.get("help", ""), f.default) for f in attrs.fields(cls)]


def option_help_entries(cls: type | None) -> list[OptionHelp]:
    """Every option of an options class with its ``-o help`` type."""
    if cls is None:
        return []
    return [OptionHelp(option_key(f), f.metadata.get("help", ""), f.default,
                       f.metadata.get("kind", KIND_STRING), f.metadata.get("protocol", False))
            for f in attrs.fields(cls)]


def build_options(cls: type, values: Mapping[str, Any], format_name: str,
                  kind: str = "format") -> Any:
    """Instantiate ``cls`` from user-given values, with errors that say which
    option was wrong (``kind`` names what the options belong to: a format or
    a filter)."""
    fields = attrs.fields(cls)
    known = {f.name: f.name for f in fields} | {option_key(f): f.name for f in fields}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = known.get(key) or known.get(key.replace("-", "_"))
        if name is None:
            choices = ", ".join(sorted(option_key(f) for f in fields)) or "none"
            raise OptionError(
                f"Invalid parameter '{key}' for {kind} {format_name} (supported: {choices})"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, OptionError) as error:
        bad = _guess_option(error, kwargs) or _failing_converter(cls, kwargs)
        prefix = f"Invalid value for option '{bad}'" if bad else "Invalid options"
        raise OptionError(f"{prefix} of {kind} {format_name}: {error}") from None


def _failing_converter(cls: type, kwargs: Mapping[str, Any]) -> str | None:
    """The option whose converter refuses its value (converters raise
    OptionError without knowing the option's name)."""
    fields = {f.name: f for f in attrs.fields(cls)}
    for name, value in kwargs.items():
        converter = fields[name].converter
        if converter is None:
            continue
        try:
            converter(value)
        except (OptionError, ValueError, TypeError):
            return name
    return None


def _guess_option(error: Exception, kwargs: Iterable[str]) -> str | None:
    text = str(error)
    for name in kwargs:
        if f"'{name}'" in text or text.startswith(name):
            return name
    return None

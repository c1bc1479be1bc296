"""Node graphs written as QEMU writes them.

Three spellings give one nested dict (a *spec*): ``json:{...}`` pseudo
filenames, ``--image-opts`` key=value text (``driver=qcow2,file.filename=a``)
and plain dicts from the API. Dotted keys and nested objects are the same
thing (``{"file.filename": "a"}`` == ``{"file": {"filename": "a"}}``);
numbered keys make lists (``inject-error.0.event``), as in QEMU's
qdict_crumple.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from corefmt.errors import OptionError
from corefmt.options import parse_option_string

JSON_PREFIX = "json:"
#: A JSON spec nested deeper than this is refused (a graph is a few levels).
MAX_SPEC_DEPTH = 64


def is_json_filename(name: str) -> bool:
    return name.startswith(JSON_PREFIX)


def parse_json_filename(name: str) -> dict[str, Any]:
    """``json:{...}`` into a nested spec."""
    try:
        value = json.loads(name[len(JSON_PREFIX):])
    except (ValueError, RecursionError) as error:
        raise OptionError(f"Could not parse the JSON options: {error}") from None
    if not isinstance(value, dict):
        raise OptionError("Could not parse the JSON options: expected a JSON object")
    return crumple(flatten(value))


def parse_image_opts(text: str) -> dict[str, Any]:
    """``--image-opts`` text into a nested spec (every value a string)."""
    return crumple(parse_option_string(text))


def flatten(spec: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested objects and lists into dotted keys."""
    if depth > MAX_SPEC_DEPTH:
        raise OptionError("Could not parse the JSON options: nested too deeply")
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}.", depth + 1))
        elif isinstance(value, list):
            flat.update(flatten({str(i): item for i, item in enumerate(value)},
                                f"{name}.", depth + 1))
        else:
            if name in flat:
                raise OptionError(f"Option '{name}' is given twice")
            flat[name] = value
    return flat


def crumple(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys into nested dicts; dicts whose keys are 0..n-1 into lists."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if any(not part for part in parts):
            raise OptionError(f"Invalid option name '{key}'")
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise OptionError(f"Option '{'.'.join(parts[:depth + 1])}' is both a value "
                                  "and an object")
            node = child
        if parts[-1] in node:
            raise OptionError(f"Option '{key}' is given twice or is both a value and an object")
        node[parts[-1]] = value
    return _lists(root)


def _lists(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {key: _lists(item) for key, item in value.items()}
    if converted and all(key.isdigit() for key in converted):
        indexes = sorted(int(key) for key in converted)
        if indexes == list(range(len(indexes))):
            return [converted[str(index)] for index in indexes]
    return converted


def describe(spec: Mapping[str, Any]) -> str:
    """A spec as the ``json:`` filename qemu would show for it."""
    return JSON_PREFIX + json.dumps(spec, separators=(", ", ": "))

"""Changing an existing image's format options in place (qemu-img amend).

The image is opened read-write (its backing chain read-only), the ``-o``
text is parsed as qemu_opts_do_parse parses it against the format's amend
options (plus qemu's ``size``, ``backing_file`` and ``backing_fmt``), and
the image's ``amend`` does the work. Refusals come in qemu-img 7.2's order
and words.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.credentials import without_credentials
from corefmt.driver import FormatDriver, accepts_keyword
from corefmt.errors import CorefmtError, OptionError
from corefmt.ops.convert_settings import CACHE_MODES
from corefmt.ops.measure import _typed, split_options
from corefmt.options import KIND_SIZE, KIND_STRING, OptionHelp, option_help_entries
from corefmt.registry import Registry

#: qemu's amend options every format with amend has (qcow2's QCOW_COMMON_OPTIONS).
GENERIC_SIZE_KEY = "size"
GENERIC_BACKING_KEYS = ("backing_file", "backing_fmt")
CREATION_ONLY_HINT = "This option is only supported for image creation"
HELP_WORDS = ("help", "?")

#: Progress in percent (qemu-img -p).
PercentFn = Callable[[float], None]


class AmendError(CorefmtError):
    """qemu-img amend refused (exit status 1)."""


def wants_help(text: str) -> bool:
    """qemu's has_help_option: a ``help`` or ``?`` key in the list."""
    return any(key in HELP_WORDS for key, _value in split_options(text))


def _amend_driver(format: str, registry: Registry) -> FormatDriver:
    driver = registry.formats.get(format)
    if driver is None:
        raise AmendError(f"Unknown file format '{format}'")
    if driver.amend_options is None:
        raise AmendError(f"Format driver '{format}' does not support option amendment")
    return driver


def _generic_entries(driver: FormatDriver) -> list[OptionHelp]:
    entries = [OptionHelp(GENERIC_SIZE_KEY, "Virtual disk size", None, KIND_SIZE)]
    if driver.supports_backing:
        entries += [OptionHelp("backing_file", "File name of a base image", None, KIND_STRING),
                    OptionHelp("backing_fmt", "Image format of the base image", None,
                               KIND_STRING)]
    return entries


def amend_option_help(format: str, registry: Registry | None = None) -> str:
    """``qemu-img amend -f FMT -o help``."""
    driver = _amend_driver(format, registry or plugins.registry())
    entries = option_help_entries(driver.amend_options) + _generic_entries(driver)
    lines = [f"Amend options for '{driver.name}':"]
    lines += [entry.line() for entry in sorted(entries, key=lambda entry: entry.name)]
    return "\n".join(lines)


def _kinds(entries: Sequence[OptionHelp]) -> dict[str, str]:
    return {entry.name: entry.kind for entry in entries}


def _parse(text: str, kinds: Mapping[str, str]) -> list[tuple[str, Any]]:
    """qemu_opts_do_parse: each key known, each value of its type, in order."""
    parsed: list[tuple[str, Any]] = []
    for key, value in split_options(text):
        if value == "\0flag" and key not in kinds and key.startswith("no") and key[2:] in kinds:
            key, value = key[2:], "off"
        if key not in kinds:
            raise OptionError(f"Invalid parameter '{key}'")
        parsed.append((key, _typed(key, kinds[key], value)))
    return parsed


def parse_amend_options(driver: FormatDriver, text: str) -> tuple[dict[str, Any], Any]:
    """(qemu's generic values by name, the format's amend options) from -o
    text; the last of a name wins. An option only ``create`` takes is
    refused with qemu-img's hint."""
    entries = option_help_entries(driver.amend_options)
    fields = {entry.name: field.name
              for entry, field in zip(entries, attrs.fields(driver.amend_options), strict=True)}
    try:
        parsed = _parse(text, _kinds(entries + _generic_entries(driver)))
    except OptionError as error:
        create_entries = [entry for entry in option_help_entries(driver.create_options)
                          if not entry.protocol] + _generic_entries(driver)
        try:
            _parse(text, _kinds(create_entries))
        except OptionError:
            raise AmendError(str(error)) from None
        raise AmendError(f"{error}\n{CREATION_ONLY_HINT}") from None
    generic: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in parsed:
        if key in fields:
            values[fields[key]] = value
        else:
            generic[key] = value
    try:
        options = driver.amend_options(**values)
    except (OptionError, ValueError, TypeError) as error:
        raise AmendError(str(error)) from None
    return generic, options


def _recorded_backing(image: Any) -> tuple[str | None, str | None]:
    reference = getattr(image, "backing", None)
    return (reference.path, reference.format) if reference is not None else (None, None)


def amend_node(node: BlockNode, text: str, progress: PercentFn | None = None) -> None:
    """Amend an image opened read-write with ``-o`` text."""
    layer = node.layer()
    image = layer.image
    driver = getattr(layer, "driver", None)
    if image is None or driver is None or driver.amend_options is None \
            or not hasattr(image, "amend"):
        raise AmendError(f"Format driver '{node.format_name}' does not support option "
                         "amendment")
    generic, options = parse_amend_options(driver, text)
    size = generic.get(GENERIC_SIZE_KEY)
    backing = None
    if any(key in generic for key in GENERIC_BACKING_KEYS):
        name = generic.get("backing_file")
        backing = (without_credentials(name) if name else name, generic.get("backing_fmt"))

    def report(done: int, total: int) -> None:
        if progress is not None and total:
            progress(100.0 * done / total)

    keywords: dict[str, Any] = {}
    if accepts_keyword(image.amend, "size"):
        keywords["size"] = size
        size = None
    if accepts_keyword(image.amend, "backing"):
        keywords["backing"] = backing
    elif backing is not None and backing != _recorded_backing(image):
        raise AmendError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    if progress is not None:
        progress(0.0)  # in case the driver reports nothing
    try:
        image.amend(options, report, **keywords)
        if size:  # a driver that leaves resizing to the core
            node.truncate(size)
    finally:
        if progress is not None:
            progress(100.0)


def amend(image: str | Mapping[str, Any], format: str | None, text: str, *,
          cache: str = "writeback", progress: PercentFn | None = None,
          allow_protocols: Collection[str] = (), registry: Registry | None = None) -> str | None:
    """qemu-img amend on an image: opens it read-write, amends, closes. With
    ``help`` in the options, returns the option help of the image's format
    instead (``amend_option_help`` answers without an image)."""
    if cache not in CACHE_MODES:
        raise AmendError(f"Invalid cache option: {cache}")
    direct, _durable = CACHE_MODES[cache]
    registry = registry or plugins.registry()
    # Renaming the backing image must work when the old one is gone (a moved
    # base): the chain below is then not opened.
    renaming = set(GENERIC_BACKING_KEYS).union(
        *(driver.amend_backing_options for driver in registry.formats.values()))
    keep_chain = not any(key in renaming for key, _value in split_options(text))
    with open_chain(image, format, read_only=False, direct=direct, registry=registry,
                    allow_protocols=allow_protocols, backing=keep_chain) as node:
        if wants_help(text):
            return amend_option_help(node.format_name, registry)
        amend_node(node, text, progress)
    return None

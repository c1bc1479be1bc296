"""Creating an image of any installed format."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.driver import BackingRef
from corefmt.errors import BackingChainError, CorefmtError, OptionError
from corefmt.options import build_options, parse_option_string
from corefmt.registry import Registry
from corefmt.sizes import parse_size

#: Options every format accepts in ``-o`` (as qemu-img does).
GENERIC_SIZE_KEY = "size"
GENERIC_BACKING_KEYS = ("backing_file", "backing_fmt")


def create(path: str, format: str = "raw", size: int | str | None = None, *,
           options: Mapping[str, Any] | str | None = None, backing: str | None = None,
           backing_format: str | None = None, registry: Registry | None = None) -> None:
    """Create an image; everything is validated before any file is touched."""
    registry = registry or plugins.registry()
    driver = registry.format(format)
    values = dict(parse_option_string(options) if isinstance(options, str) else (options or {}))
    if GENERIC_SIZE_KEY in values:
        size = values.pop(GENERIC_SIZE_KEY)
    backing = values.pop("backing_file", None) or backing
    backing_format = values.pop("backing_fmt", None) or backing_format
    parsed = build_options(driver.create_options, values, driver.name)

    reference = None
    if backing:
        if not driver.supports_backing:
            raise OptionError(f"Format {driver.name} does not support backing files")
        if not backing_format:
            raise OptionError(
                "Backing file specified without backing format (use -F FORMAT: "
                "a probed format is not recorded, probing raw images is unsafe)"
            )
        registry.format(backing_format)
        reference = BackingRef(backing, backing_format)
        if size is None:
            size = _backing_size(path, reference, registry)
        else:
            _backing_size(path, reference, registry)  # it must open, whatever size we take
    if size is None:
        raise OptionError("Image creation needs a size parameter")
    byte_size = parse_size(size, "image size")

    storage_driver = registry.storage_for(path)
    existed = storage_driver.exists(path)
    storage = storage_driver.create(path)
    try:
        driver.create(storage, byte_size, parsed, reference)
        storage.flush()
    except BaseException:
        storage.close()
        if not existed:
            _remove(path)
        raise
    storage.close()


def check_create_options(format: str, options: list[str] | str | None,
                         registry: Registry | None = None) -> str:
    """Validate ``-o`` text for a format now (before any work) and return it
    as one string, the form a replay command repeats."""
    text = ",".join(options) if isinstance(options, list) else (options or "")
    driver = (registry or plugins.registry()).format(format)
    values = parse_option_string(text)
    for generic in (GENERIC_SIZE_KEY, *GENERIC_BACKING_KEYS):
        values.pop(generic, None)
    build_options(driver.create_options, values, driver.name)
    return text


def _backing_size(path: str, reference: BackingRef, registry: Registry) -> int:
    """Open the would-be backing chain (relative to the new image) for its size."""
    target = registry.storage_for(reference.path).resolve(reference.path, path)
    try:
        with open_chain(target, reference.format, read_only=True, registry=registry) as base:
            return base.virtual_size
    except BackingChainError:
        raise
    except CorefmtError as error:
        raise BackingChainError(f"Could not open backing file '{target}': {error}") from error


def _remove(path: str) -> None:
    """Delete a file this call created and could not finish."""
    if ":" not in path.split("/")[0]:
        with contextlib.suppress(OSError):
            os.unlink(path)

"""Creating an image of any installed format."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.align import align_up
from corefmt.block.chain import open_chain, printable, version_of
from corefmt.block.node import BlockNode
from corefmt.credentials import without_credentials
from corefmt.driver import BackingRef, CreateContext, FormatDriver, accepts_keyword
from corefmt.errors import BackingChainError, CorefmtError, OptionError
from corefmt.options import OptionHelp, build_options, option_help_entries, parse_option_string
from corefmt.registry import Registry
from corefmt.sizes import parse_size
from corefmt.storage import locking
from corefmt.storage.base import Storage

#: New images are whole sectors: a size is rounded up to this, as qemu's
#: drivers round it (the Formatting line still shows the size given).
SECTOR_SIZE = 512
#: Options every format accepts in ``-o`` (as qemu-img does).
GENERIC_SIZE_KEY = "size"
GENERIC_BACKING_KEYS = ("backing_file", "backing_fmt")


def create(path: str, format: str = "raw", size: int | str | None = None, *,
           options: Mapping[str, Any] | str | None = None, backing: str | None = None,
           backing_format: str | None = None, registry: Registry | None = None,
           unsafe: bool = False, flush: bool = True) -> None:
    """Create an image; everything is validated before any file is touched.

    ``unsafe`` (qemu-img create -u) records a backing file without opening
    it: the size must then be given. ``flush`` False leaves the new image
    unflushed (convert -t unsafe, as qemu-img).
    """
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
        if not backing_format and driver.records_backing_format:
            raise OptionError(
                "Backing file specified without backing format (use -F FORMAT: "
                "a probed format is not recorded, probing raw images is unsafe)"
            )
        if backing_format:
            registry.format(backing_format)
        # credentials on the command line are for this run, never the header
        reference = BackingRef(without_credentials(backing), backing_format)
    if unsafe and reference is not None and size is None:
        raise OptionError("Image creation needs a size parameter (-u does not open the "
                          "backing file)")
    base = _open_backing(path, backing, reference, registry) \
        if reference and backing and not unsafe else None
    if base is not None and reference is not None:
        # a remote base's version: later opens refuse it once it is replaced
        reference = attrs.evolve(reference, identity=version_of(base))
    try:
        if size is None and base is not None:
            size = base.virtual_size
        if size is None:
            raise OptionError("Image creation needs a size parameter")
        byte_size = align_up(parse_size(size, "image size"), SECTOR_SIZE)
        _create_image(driver, path, byte_size, parsed, reference, base, registry, flush)
    finally:
        if base is not None:
            base.close()


class _Children:
    """Children a driver creates (``CreateContext.create_child``): closed after
    create, removed again if create fails."""

    def __init__(self, image_path: str, registry: Registry):
        self.image_path = image_path
        self.registry = registry
        self.opened: list[Storage | BlockNode] = []
        self.new_paths: list[str] = []

    def create_child(self, role: str, path: str, format: str | None = None,
                     size: int | None = None, options: Mapping[str, Any] | None = None
                     ) -> Storage | BlockNode:
        target = self.registry.resolve(path, self.image_path)
        storage_driver = self.registry.storage_for(target)
        if not storage_driver.exists(target):
            self.new_paths.append(target)
        if format is None:
            with locking.creating(target, storage_driver):
                child: Storage | BlockNode = storage_driver.create(target)
        else:
            if size is None:
                raise OptionError(f"{role} '{target}' of format {format} needs a size")
            create(target, format, size, options=options, registry=self.registry)
            child = open_chain(target, format, registry=self.registry)
        self.opened.append(child)
        return child

    def close(self, *, failed: bool) -> None:
        for child in reversed(self.opened):
            with contextlib.suppress(CorefmtError, OSError):
                if not failed:
                    child.flush()
            child.close()
        if failed:
            for target in self.new_paths:
                _remove(target)


def _create_image(driver: FormatDriver, path: str, size: int, options: Any,
                  reference: BackingRef | None, base: BlockNode | None,
                  registry: Registry, flush: bool = True) -> None:
    storage_driver = registry.storage_for(path)
    # A symlink's target is what create makes: remove that, never the link,
    # if create fails (a dangling link does not "exist").
    made = os.path.realpath(path) if os.path.islink(path) else path
    existed = storage_driver.exists(path)
    # An image another process uses is refused before create truncates it.
    with locking.creating(path, storage_driver):
        storage = storage_driver.create(path)
        children = _Children(path, registry)
        try:
            if accepts_keyword(driver.create, "context"):
                context = CreateContext(path=path, backing=base,
                                        create_child=children.create_child)
                driver.create(storage, size, options, reference, context=context)
            else:
                driver.create(storage, size, options, reference)
            if flush:
                storage.flush()
        except BaseException:
            storage.close()
            children.close(failed=True)
            if not existed:
                _remove(made)
            raise
        storage.close()
        children.close(failed=False)


def create_option_help(format: str, with_protocol: bool,
                       registry: Registry | None = None) -> str:
    """``create -f FMT -o help`` as qemu-img prints it: with a filename every
    option (the format's and the file's); without, the format's own and a
    note that the protocol level has more."""
    driver = (registry or plugins.registry()).format(format)
    entries = option_help_entries(driver.create_options)
    entries.append(OptionHelp(GENERIC_SIZE_KEY, "Virtual disk size", None, "size"))
    if driver.supports_backing:
        entries.append(OptionHelp("backing_file", "File name of a base image", None, "str"))
        if driver.records_backing_format:
            entries.append(OptionHelp("backing_fmt", "Image format of the base image",
                                      None, "str"))
    if with_protocol:
        lines = ["Supported options:"]
    else:
        entries = [entry for entry in entries if not entry.protocol]
        lines = [f"Supported {driver.name} options:"]
    lines += [entry.line() for entry in sorted(entries, key=lambda entry: entry.name)]
    if not with_protocol:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines)


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


def _open_backing(path: str, given: str, reference: BackingRef, registry: Registry
                  ) -> BlockNode:
    """Open the would-be backing chain (relative to the new image), read-only,
    by the name as ``given`` (with any credentials the user gave)."""
    target = registry.resolve(given, path)
    try:
        return open_chain(target, reference.format, read_only=True, registry=registry)
    except BackingChainError:
        raise
    except CorefmtError as error:
        raise BackingChainError(f"Could not open backing file '{printable(target)}': "
                                f"{error}") from error


def _remove(path: str) -> None:
    """Delete a file this call created and could not finish."""
    if ":" not in path.split("/")[0]:
        with contextlib.suppress(OSError):
            os.unlink(path)

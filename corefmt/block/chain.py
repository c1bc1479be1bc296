"""Opening a node graph: an image with its children and backing chain.

What to open is a *spec* (``corefmt.block.imagespec``): a plain filename
plus format, a ``json:{...}`` name, ``--image-opts`` text or a dict, with
QEMU's keys (``driver``, ``file``, ``backing``, ``data-file``, filters as
drivers with a child). A backing the spec does not give is the one the
image records: its path resolves relative to the overlay, a recorded
format is used as it is (never probed away), only an unrecorded one is
probed. Loops and over-deep chains are refused; a missing backing file is
reported by name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs

from corefmt import plugins
from corefmt.block.filter_node import FilterNode
from corefmt.block.image_node import ImageNode, Reopener
from corefmt.block.imagespec import is_json_filename, parse_json_filename
from corefmt.block.node import ROLE_BACKING, BlockNode
from corefmt.capabilities import HeaderFull
from corefmt.credentials import Logins, without_credentials
from corefmt.driver import (
    BackingRef,
    FormatDriver,
    ImageContext,
    accepts_keyword,
    declares_keyword,
    supports,
)
from corefmt.errors import BackingChainError, CorefmtError, NotSupported, OptionError
from corefmt.filters.base import LAYER_STORAGE, FilterContext
from corefmt.options import BOOLEAN_WORDS, build_options, to_bool
from corefmt.registry import PROBE_HEAD_SIZE, Registry
from corefmt.storage import locking
from corefmt.storage.base import Storage, ignore_flushes

#: qemu has no fixed limit; this keeps recursion-free code and memory bounded.
MAX_CHAIN_DEPTH = 1000
#: qemu's protocol driver names that mean a local file here.
FILE_PROTOCOLS = ("file", "host_device", "host_cdrom")
#: Keys every node takes (qemu's generic block options).
KEY_DRIVER, KEY_NODE_NAME, KEY_READ_ONLY, KEY_CACHE = "driver", "node-name", "read-only", "cache"
KEY_FILE, KEY_FILENAME, KEY_BACKING, KEY_DATA_FILE = "file", "filename", "backing", "data-file"
#: Accepted for scripts written for qemu; they change nothing here (read-only
#: opening is decided by the verb; force-share counts on file nodes only).
KEY_FORCE_SHARE, KEY_LOCKING = "force-share", "locking"
KEYS_WITHOUT_EFFECT = ("force-share", "auto-read-only", "discard", "detect-zeroes")

_RECORDED = object()  # "backing" not given: open what the image records


def probe_format(storage: Storage, registry: Registry) -> FormatDriver:
    """The format of an image opened without one. A format QEMU knows that no
    installed plugin reads is refused, never read as raw (corefmt.known_formats)."""
    from corefmt import known_formats  # could move to the module imports

    head = storage.read(0, min(PROBE_HEAD_SIZE, max(storage.size(), 0)))
    return known_formats.probed_driver(head, storage.path, registry,
                                       known_formats.dmg_trailer(storage))


def printable(path: str) -> str:
    """A path read from an image, safe to put in a one-line message: control
    and other non-printable characters are shown as escapes, a URL's
    credentials left out."""
    path = without_credentials(path)
    if path.isprintable():
        return path
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in path)


def _identity(path: str) -> str:
    """What makes two references the same image (for loop detection)."""
    return os.path.realpath(path) if os.path.exists(path) else path


def to_spec(image: str | Mapping[str, Any], format: str | None = None,
            options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Any way of naming an image as a spec dict."""
    if isinstance(image, Mapping):
        spec = dict(image)
    elif is_json_filename(image):
        spec = parse_json_filename(image)
    else:
        spec = {KEY_FILE: {KEY_FILENAME: image}}
    if format is not None:
        if spec.get(KEY_DRIVER, format) != format:
            raise OptionError(f"format '{format}' conflicts with driver "
                              f"'{spec[KEY_DRIVER]}' of the image options")
        spec[KEY_DRIVER] = format
    for key, value in (options or {}).items():
        spec.setdefault(key, value)
    return spec


def build_open_options(driver: Any, values: Mapping[str, Any], kind: str) -> Any:
    """A driver's open options from spec keys; unknown keys as qemu names them."""
    cls = getattr(driver, "open_options", None)
    known = {field.name for field in attrs.fields(cls)} if cls is not None else set()
    for key in values:
        if key.replace("-", "_") not in known:
            raise OptionError(f"Block {kind} '{driver.name}' does not support the option "
                              f"'{key}'")
    return build_options(cls, values, driver.name, kind)


def _flag(value: Any, name: str) -> bool:
    try:
        return to_bool(value)
    except ValueError:
        raise OptionError(f"Parameter '{name}' expects 'on' or 'off'") from None


class GraphBuilder:
    """Opens one graph; on failure closes everything it opened."""

    def __init__(self, registry: Registry, *, direct: bool = False,
                 max_depth: int = MAX_CHAIN_DEPTH,
                 allow_protocols: Collection[str] = (), force_share: bool = False,
                 for_check: bool = False, record_base_version: bool = False):
        self.registry = registry
        #: Let overlays that record no version of their remote base record
        #: the one met now (see _record_first_version): for opens that use
        #: the image as a disk, not for verbs that may still refuse to act.
        self.record_base_version = record_base_version
        self._first_versions: list[tuple[ImageNode, BackingRef, BlockNode]] = []
        #: Logins typed in this open's URLs, for stores that take them.
        self.logins = Logins()
        self.direct = direct
        self.max_depth = max_depth
        self.allow_protocols = frozenset(allow_protocols)
        self.no_flush = False
        self.force_share = force_share
        self.for_check = for_check
        self.hooks = plugins.plugin_manager().hook
        self.opened: list[BlockNode] = []
        #: Image nodes whose spec gave no backing: their recorded one is opened.
        self.wanting_backing: list[ImageNode] = []

    def build(self, spec: Mapping[str, Any], *, read_only: bool, backing: bool = True
              ) -> BlockNode:
        try:
            top = self.open(spec, read_only=read_only)
            if backing:
                for node in list(self.wanting_backing):
                    self._open_recorded_chain(node, top)
            # Once the whole graph opened, and before a filter starts work on it.
            for node, reference, below in self._first_versions:
                _record_first_version(node, reference, below)
            for node in self.opened:  # filters that predate the hook lack it
                started = getattr(getattr(node, "filter", None), "graph_complete", None)
                if isinstance(node, FilterNode) and callable(started):
                    started()
        except BaseException:
            self.close_all()
            raise
        return top

    def close_all(self) -> None:
        for node in reversed(self.opened):
            with contextlib.suppress(Exception):  # the original error is the one to report
                node._close_one()

    # -- one node ---------------------------------------------------------------
    def open(self, spec: Mapping[str, Any], *, read_only: bool) -> BlockNode:
        name = spec.get(KEY_DRIVER)
        if name is None or name in self.registry.formats:
            return self._open_image(spec, read_only=read_only)
        if name in self.registry.filters:
            driver = self.registry.filters[name]
            if driver.layer == LAYER_STORAGE:  # qemu: the protocol layer, format probed on top
                return self._open_image({KEY_FILE: spec}, read_only=read_only)
            return self._open_filter(driver, spec, read_only=read_only)
        if name in FILE_PROTOCOLS or name in self.registry.storages:
            # A protocol node alone shows its bytes: raw over it.
            return self._open_image({KEY_DRIVER: "raw", KEY_FILE: spec}, read_only=read_only)
        self.registry.format(name)  # raises: names the installed formats
        raise AssertionError(name)

    def _generic(self, spec: dict[str, Any], read_only: bool) -> tuple[str | None, bool]:
        """Take the keys every node has out of ``spec``."""
        spec.pop(KEY_DRIVER, None)
        node_name = spec.pop(KEY_NODE_NAME, None)
        if KEY_READ_ONLY in spec:
            read_only = _flag(spec.pop(KEY_READ_ONLY), KEY_READ_ONLY) or read_only
        cache = spec.pop(KEY_CACHE, None)
        if isinstance(cache, Mapping):
            unknown = set(cache) - {"direct", "no-flush"}
            if unknown:
                raise OptionError(f"Invalid parameter 'cache.{sorted(unknown)[0]}'")
            if "direct" in cache:
                self.direct = _flag(cache["direct"], "cache.direct") or self.direct
            if "no-flush" in cache:  # qemu's cache=unsafe: flushes do nothing
                self.no_flush = _flag(cache["no-flush"], "cache.no-flush") or self.no_flush
        for key in KEYS_WITHOUT_EFFECT:
            spec.pop(key, None)
        return node_name, read_only

    def _open_image(self, given: Mapping[str, Any], *, read_only: bool,
                    follow_backing: bool = True,
                    check_storage: Callable[[Storage], None] | None = None,
                    confined: bool = False) -> ImageNode:
        spec = dict(given)
        driver_name = spec.get(KEY_DRIVER)
        node_name, read_only = self._generic(spec, read_only)
        no_flush = self.no_flush  # this node's: a later node's must not reach its reopen
        file_spec = spec.pop(KEY_FILE, None)
        if file_spec is None and KEY_FILENAME in spec:
            file_spec = {KEY_FILENAME: spec.pop(KEY_FILENAME)}
        if file_spec is None:
            raise OptionError(f"no file given for the {driver_name or 'image'} node "
                              "(use file.filename=...)")
        backing_spec = spec.pop(KEY_BACKING, _RECORDED)
        data_file_spec = spec.pop(KEY_DATA_FILE, None)
        storage, filename = self.open_storage(file_spec, read_only=read_only,
                                              confined=confined, no_flush=no_flush)
        try:
            if check_storage is not None:  # before a byte of it is read as an image
                check_storage(storage)
            driver = (self.registry.format(driver_name) if driver_name
                      else probe_format(storage, self.registry))
            if backing_spec not in (_RECORDED, None) and not driver.supports_backing:
                raise OptionError(f"Block format '{driver.name}' does not support the "
                                  f"option '{KEY_BACKING}'")
            options = build_open_options(driver, spec, "format")
            locking.lock_image(storage, driver, options, read_only)
            node = ImageNode(storage=storage, driver=driver,
                             filename=without_credentials(filename),
                             read_only=read_only, hooks=self.hooks, node_name=node_name)
            node.no_flush = no_flush
        except BaseException:
            storage.close()
            raise
        self.opened.append(node)
        overrides = {} if data_file_spec is None else {"data_file": data_file_spec}

        probed = driver_name is None

        def context_in(mode: bool) -> ImageContext:
            return ImageContext(
                path=filename, read_only=mode, read_below=node.read_below, options=options,
                probed=probed,
                open_child=lambda role, path, format=None, **kw: self.open_child(
                    node, role, path, format=format, override=overrides.get(role), **kw),
                emit=node.emit, for_check=self.for_check)

        node.attach(driver.open(storage, context_in(read_only)))
        node._reopener = Reopener(
            storage=lambda mode: self.open_storage(file_spec, read_only=mode,
                                                   confined=confined, no_flush=no_flush)[0],
            context=context_in)
        if backing_spec is _RECORDED:
            if follow_backing:
                self.wanting_backing.append(node)
        elif backing_spec not in (None, ""):
            below_spec = (to_spec(backing_spec) if isinstance(backing_spec, str)
                          else dict(backing_spec))
            node.set_backing(self.open(below_spec, read_only=True))
        return node

    def _open_filter(self, driver: Any, given: Mapping[str, Any], *,
                     read_only: bool) -> FilterNode:
        spec = dict(given)
        node_name, read_only = self._generic(spec, read_only)
        children: dict[str, Any] = {}
        for key in (driver.child_key, *driver.extra_children):
            if key not in spec:
                raise OptionError(f"the {driver.name} filter needs a '{key}' child")
            value = spec.pop(key)
            children[key] = to_spec(value) if isinstance(value, str) else dict(value)
        options = build_open_options(driver, spec, "filter")
        child = self.open(children.pop(driver.child_key), read_only=read_only)
        extras = {key: self.open(value, read_only=read_only) for key, value in children.items()}
        node = FilterNode(driver=driver, child=child, read_only=read_only, hooks=self.hooks,
                          node_name=node_name)
        self.opened.append(node)
        for key, extra in extras.items():
            node.add_child(key, extra)
        node.attach(driver.open(child, options, FilterContext(read_only=read_only,
                                                              children=extras)))
        return node

    # -- storage ------------------------------------------------------------------
    def open_storage(self, given: str | Mapping[str, Any], *, read_only: bool,
                     confined: bool = False, no_flush: bool | None = None
                     ) -> tuple[Storage, str]:
        """A ``file`` child: a filename, a protocol dict, or storage filters over one."""
        spec = {KEY_FILENAME: given} if isinstance(given, str) else dict(given)
        name = spec.pop(KEY_DRIVER, None)
        spec.pop(KEY_NODE_NAME, None)
        asked = _flag(spec.get(KEY_FORCE_SHARE, False), KEY_FORCE_SHARE)
        if asked and not read_only:
            raise OptionError("force-share=on can only be used with read-only images")
        force_share = (asked or self.force_share) and read_only  # writers always lock
        for key in KEYS_WITHOUT_EFFECT:
            spec.pop(key, None)
        if name is not None and name in self.registry.filters:
            driver = self.registry.filters[name]
            if driver.layer != LAYER_STORAGE:
                raise OptionError(f"'{name}' filters nodes, not files: put it above the "
                                  "format node")
            inner = spec.pop(driver.child_key, None)
            if inner is None:
                raise OptionError(f"the {name} filter needs an '{driver.child_key}' child")
            options = build_open_options(driver, spec, "filter")
            storage, filename = self.open_storage(inner, read_only=read_only,
                                                  confined=confined, no_flush=no_flush)
            try:
                wrapped = driver.wrap(storage, options)
                locking.track(wrapped, force_share=force_share, inner=storage)
                return wrapped, filename
            except BaseException:
                storage.close()
                raise
        lock_mode = spec.pop(KEY_LOCKING, None)
        if lock_mode not in (None, "auto", "on", "off", True, False):
            raise OptionError("Parameter 'locking' expects 'auto', 'on' or 'off'")
        filename = spec.pop(KEY_FILENAME, None)
        if not isinstance(filename, str) or not filename:
            raise OptionError("The 'file' block driver requires a file name")
        if spec:
            protocol = name or "file"
            raise OptionError(f"Block protocol '{protocol}' doesn't support the option "
                              f"'{sorted(spec)[0]}'")
        storage_driver = (self.registry.storages[name]
                          if name in self.registry.storages and name != "file"
                          else self.registry.storage_for(filename))
        extra: dict[str, Any] = ({"force_share": True} if self.force_share and
                                 accepts_keyword(storage_driver.open, "force_share") else {})
        if declares_keyword(storage_driver.open, "logins"):  # shared within this open only
            extra["logins"] = self.logins
        if confined and declares_keyword(storage_driver.open, "confined"):
            extra["confined"] = True
        storage = storage_driver.open(filename, read_only=read_only, direct=self.direct, **extra)
        if (self.no_flush if no_flush is None else no_flush) and not read_only:
            ignore_flushes(storage)
        if lock_mode not in ("off", False):  # the format node takes the locks it needs
            locking.track(storage, force_share=force_share)
        return storage, filename

    def open_child(self, node: ImageNode, role: str, path: str, *, format: str | None = None,
                   override: Any = None, read_only: bool | None = None) -> Any:
        """A driver's extra child (``data_file``): the user's spec for it if one
        was given, else ``path`` resolved against the image's directory."""
        read_only = node.read_only if read_only is None else read_only
        if override is None:
            self.check_name_from_image(path, node, role.replace("_", " ") + " name")
            target = self.registry.resolve(path, node.filename)
            if not self._exists(target):
                raise CorefmtError(f"Could not open {role} '{printable(target)}' of "
                                   f"'{node.filename}': No such file or directory")
            override = {KEY_FILE: {KEY_FILENAME: target}}
            if format is not None:
                override[KEY_DRIVER] = format
        elif isinstance(override, str):
            override = {KEY_FILE: {KEY_FILENAME: override}}
        if format is None and KEY_DRIVER not in override:
            file_spec = override.get(KEY_FILE, override)
            child: Any = self.open_storage(file_spec, read_only=read_only)[0]
        else:
            child = self.open(override, read_only=read_only)
        node.add_child(role, child)
        return child

    def _confined(self, name: str) -> bool:
        """A name read from an image whose protocol the user did not allow
        may reach only the store it names (check_name_from_image let it
        through as a sibling): its server may not redirect it elsewhere."""
        return self.registry.storage_for(name).name not in self.allow_protocols

    def _exists(self, target: str) -> bool:
        """Whether the store has ``target``, asked with this open's logins
        where the storage driver takes them."""
        driver = self.registry.storage_for(target)
        if declares_keyword(driver.exists, "logins"):
            return bool(driver.exists(target, logins=self.logins))
        return bool(driver.exists(target))

    # -- the recorded chain ---------------------------------------------------------
    def _open_recorded_chain(self, start: ImageNode, top: BlockNode) -> None:
        seen = {_identity(layer.filename) for layer in top.chain()}
        node: ImageNode = start
        depth = len(start.chain()) - 1
        while node.backing is None and node._image.backing is not None:
            reference = node._image.backing
            depth += 1
            if depth > self.max_depth:
                raise BackingChainError(
                    f"{top.filename}: backing chain is deeper than {self.max_depth} images")
            below = self._open_backing(node, reference, seen)
            node.set_backing(below)
            if self.record_base_version:
                self._first_versions.append((node, reference, below))
            node = below

    def check_name_from_image(self, name: str, holder: BlockNode, what: str) -> None:
        """A name read from an image is untrusted: it may name a local file, or
        a sibling on the store the image itself is on (the same bucket, the
        same server); any other protocol, place or a ``json:`` graph only if
        the user allowed the protocol (``--allow-protocol``)."""
        if is_json_filename(name):
            protocol = "json"
        else:
            driver = self.registry.storage_for(name)
            if driver.name == "file" or (driver is self.registry.storage_for(holder.filename)
                                         and _is_sibling(driver, name, holder.filename)):
                return
            protocol = driver.name
        if protocol not in self.allow_protocols:
            raise BackingChainError(
                f"{holder.filename}: {what} '{printable(name)}' selects the '{protocol}' "
                f"protocol; names inside images may only name local files (allow it with "
                f"--allow-protocol {protocol})")

    def _open_backing(self, node: ImageNode, reference: BackingRef, seen: set[str]
                      ) -> ImageNode:
        self.check_name_from_image(reference.path, node, "backing file name")
        if is_json_filename(reference.path):
            below = self.open(to_spec(reference.path, reference.format), read_only=True)
            try:
                _refuse_another_version(reference, getattr(below.layer(), "storage", None),
                                        below.filename, node)
            except BackingChainError:
                below.close()
                raise
            return below  # type: ignore[return-value]
        target = self.registry.resolve(reference.path, node.filename)
        if _identity(target) in seen:
            raise BackingChainError(
                f"{node.filename}: backing file '{printable(reference.path)}' "
                "makes a loop in the chain")
        if not self._exists(target):
            raise BackingChainError(
                f"Could not open backing file '{printable(target)}' of '{node.filename}': "
                "No such file or directory")
        spec: dict[str, Any] = {KEY_FILE: {KEY_FILENAME: target}}
        if reference.format:
            spec[KEY_DRIVER] = reference.format
        def same_version(storage: Storage) -> None:
            # A base replaced by another format must be told by its version,
            # not by the format error its new bytes would give.
            _refuse_another_version(reference, storage, without_credentials(target), node)

        try:
            below = self._open_image(spec, read_only=True, follow_backing=False,
                                     check_storage=same_version,
                                     confined=self._confined(target))
        except BackingChainError:
            raise
        except CorefmtError as error:
            raise BackingChainError(
                f"Could not open backing file '{printable(target)}' of '{node.filename}': "
                f"{error}") from error
        seen.add(_identity(target))
        return below


def _refuse_another_version(reference: BackingRef, storage: Storage | None, shown: str,
                            node: BlockNode) -> None:
    """A backing whose store is no longer the version the image recorded is
    refused, before anything is read from it."""
    if reference.identity is None:
        return
    changed_since = getattr(storage, "changed_since", None)
    change = changed_since(reference.identity) if callable(changed_since) else None
    if change is not None:
        raise BackingChainError(
            f"Could not open backing file '{shown}' of '{node.filename}': "
            f"it changed since the image was made over it ({change}); refusing to "
            "mix its versions")


def _record_first_version(node: ImageNode, reference: BackingRef, below: BlockNode) -> None:
    """An overlay that records no version of its remote base (made by
    qemu-img, by ``create -u``, or rebased with -u while the server was
    away) records the one it meets when an open that uses it as a disk
    asks (``record_base_version``): from then on a replaced base is refused
    (trust on first use). A read-only open writes nothing, and a header with
    no room left keeps none."""
    if node.read_only or reference.identity is not None:
        return
    token = version_of(below)
    image = node.image
    if token is None or image is None or not supports(image, "set_backing"):
        return
    with contextlib.suppress(HeaderFull, NotSupported):
        image.set_backing(BackingRef(reference.path, reference.format, token))


def _is_sibling(driver: Any, name: str, holder: str) -> bool:
    """Whether ``name`` stays beside ``holder`` on its store (the driver's
    optional ``is_sibling``; without it, anything on the same driver)."""
    check = getattr(driver, "is_sibling", None)
    return bool(check(name, holder)) if callable(check) else True


def version_of(node: BlockNode) -> str | None:
    """The version (``Storage.version_token``) of the store under ``node``'s
    top layer, for a backing reference to record; None for local files."""
    token = getattr(getattr(node.layer(), "storage", None), "version_token", None)
    return token() if callable(token) else None


def open_graph(image: str | Mapping[str, Any], format: str | None = None, *,
               read_only: bool = False, backing: bool = True,
               copy_on_read: bool | str = False, prefetch: bool = False,
               direct: bool = False, options: Mapping[str, Any] | None = None,
               registry: Registry | None = None,
               max_depth: int = MAX_CHAIN_DEPTH, allow_protocols: Collection[str] = (),
               force_share: bool = False, for_check: bool = False,
               record_base_version: bool = False) -> BlockNode:
    """Open an image (filename, ``json:`` name or spec dict) with its graph.

    ``copy_on_read`` puts a copy-on-read filter on top (True: in the mode the
    image asks for, FVD's asynchronous fills, else sync; or a mode name);
    ``prefetch`` a prefetch filter above it (background prefetch).
    ``allow_protocols`` lists storage protocols (and ``json``) that names
    read from images may select; ``force_share`` opens without taking the
    image's locks (qemu-img -U), for read-only use. ``record_base_version``:
    an overlay opened read-write that records no version of its remote base
    records the one it meets (trust on first use), once the graph is open.
    """
    registry = registry or plugins.registry()
    spec = to_spec(image, format, options)
    if isinstance(copy_on_read, str) and copy_on_read.strip().lower() in BOOLEAN_WORDS:
        copy_on_read = to_bool(copy_on_read)
    if copy_on_read:
        spec = {KEY_DRIVER: "copy-on-read", KEY_FILE: spec}
        if isinstance(copy_on_read, str):
            spec["mode"] = copy_on_read
    if prefetch:
        spec = {KEY_DRIVER: "prefetch", KEY_FILE: spec}
    if force_share and not read_only:
        raise OptionError("force-share=on can only be used with read-only images")
    builder = GraphBuilder(registry, direct=direct, max_depth=max_depth,
                           allow_protocols=allow_protocols, force_share=force_share,
                           for_check=for_check, record_base_version=record_base_version)
    return builder.build(spec, read_only=read_only, backing=backing)


def open_node(path: str, format: str | None = None, *, read_only: bool = False,
              direct: bool = False, registry: Registry | None = None) -> BlockNode:
    """Open one image without its backing chain."""
    return open_graph(path, format, read_only=read_only, backing=False, direct=direct,
                      registry=registry)


def open_chain(path: str | Mapping[str, Any], format: str | None = None, *,
               read_only: bool = False, backing: bool = True,
               copy_on_read: bool | str = False, prefetch: bool = False,
               direct: bool = False, registry: Registry | None = None,
               max_depth: int = MAX_CHAIN_DEPTH,
               options: Mapping[str, Any] | None = None,
               allow_protocols: Collection[str] = (), force_share: bool = False,
               for_check: bool = False, record_base_version: bool = False) -> BlockNode:
    """Open ``path`` and (unless ``backing`` is False) every image below it
    (``for_check``: for ``check``, see ``ImageContext.for_check``;
    ``record_base_version``: see ``open_graph``)."""
    return open_graph(path, format, read_only=read_only, backing=backing,
                      copy_on_read=copy_on_read, prefetch=prefetch, direct=direct,
                      options=options, registry=registry, max_depth=max_depth,
                      allow_protocols=allow_protocols, force_share=force_share,
                      for_check=for_check, record_base_version=record_base_version)


__all__ = ["ROLE_BACKING", "GraphBuilder", "open_chain", "open_graph", "open_node",
           "printable", "probe_format", "to_spec"]

"""create's ``Formatting '...', fmt=...`` line, field for field as qemu-img.

Scripts parse this line, so it is qemu-img 7.2's (qemu_opts_print over the
format's create options and then the file protocol's): the options in
qemu's list order, each given one with its value, an option not given only
where qemu has a default for it; sizes and numbers as plain integers,
strings with commas doubled, booleans as typed. ``size`` is the size asked
for (the image is that, rounded up to 512). Formats qemu does not know
(FVD) print their given options in the driver's order, then the size and
the backing file.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from corefmt.driver import FormatDriver
from corefmt.ops.measure import strtosz
from corefmt.options import KIND_NUMBER, KIND_SIZE, KIND_STRING, option_key

#: qemu's file protocol options (file-posix raw_create_opts), after the format's.
FILE_OPTIONS: tuple[tuple[str, str | None], ...] = (
    ("size", None), ("nocow", None), ("preallocation", None), ("extent_size_hint", None))
#: Each format's options in qemu's order, with the default qemu prints
#: when the option is not given (None: printed only when given).
QEMU_OPTIONS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "raw": (("size", None),),
    "qcow2": (
        ("encryption", None), ("encrypt.format", None), ("encrypt.key-secret", None),
        ("encrypt.cipher-alg", None), ("encrypt.cipher-mode", None),
        ("encrypt.ivgen-alg", None), ("encrypt.ivgen-hash-alg", None),
        ("encrypt.hash-alg", None), ("encrypt.iter-time", None),
        ("cluster_size", "65536"), ("extended_l2", "off"), ("preallocation", None),
        ("compression_type", "zlib"), ("size", None), ("compat", None),
        ("backing_file", None), ("backing_fmt", None), ("data_file", None),
        ("data_file_raw", None), ("lazy_refcounts", "off"), ("refcount_bits", "16")),
}
#: The generic options' kinds (the format's come from its options class).
GENERIC_KINDS = {"size": KIND_SIZE}


def _kinds(driver: FormatDriver) -> dict[str, str]:
    kinds = dict(GENERIC_KINDS)
    options = driver.create_options
    if options is not None and attrs.has(options):
        for field in attrs.fields(options):
            kinds[option_key(field)] = field.metadata.get("kind") or KIND_STRING
    return kinds


def _keys(driver: FormatDriver) -> dict[str, str]:
    """Field names users may type for a key (``encrypt_format``) -> the key."""
    options = driver.create_options
    if options is None or not attrs.has(options):
        return {}
    return {field.name: option_key(field) for field in attrs.fields(options)}


def _shown(kind: str, text: str) -> str:
    """A given value as qemu_opts_print shows it."""
    if kind == KIND_STRING:
        return text.replace(",", ",,")
    try:
        if kind == KIND_SIZE:
            return str(strtosz(text))
        if kind == KIND_NUMBER:
            return str(int(text, 0))
    except ValueError:
        pass
    return text


def formatting_line(filename: str, driver: FormatDriver, size: int,
                    options: Mapping[str, str], backing: str | None = None,
                    backing_format: str | None = None) -> str:
    """The line qemu-img create prints before it creates the image."""
    keys = _keys(driver)
    given = {keys.get(key, key): str(value) for key, value in options.items()}
    given["size"] = str(size)
    if backing:
        given["backing_file"] = backing
    if backing_format:
        given["backing_fmt"] = backing_format
    kinds = _kinds(driver)
    order = QEMU_OPTIONS.get(driver.name)
    if order is None:
        fields = [key for key in keys.values() if key in given]
        order = tuple((key, None) for key in (*fields, "size", "backing_file", "backing_fmt"))
    else:
        order += FILE_OPTIONS
    words, seen = [], set()
    for key, default in order:
        if key in seen:
            continue
        seen.add(key)
        if key in given:
            words.append(f"{key}={_shown(kinds.get(key, KIND_STRING), given[key])}")
        elif default is not None:
            words.append(f"{key}={default}")
    return f"Formatting '{filename}', fmt={driver.name} " + " ".join(words)

"""qcow2's create, open and amend options, with qemu-img 7.2's names, help
texts and refusals (``qemu-img create -f qcow2 -o help``)."""

from __future__ import annotations

from typing import Any

import attrs

from corefmt import OptionError, option, to_bool, to_size
from corefmt.options import choice
from corefmt_qcow2.layout import (
    COMPAT_VERSIONS,
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_REFCOUNT_BITS,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_SIZE,
    VERSION_2,
)

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPRESSION_TYPES = ("zlib", "zstd")
V3_REQUIRED = "compatibility level 1.1 and above (use version=v3 or greater)"
DEFAULT_EXTENT_SIZE_HINT = 1024 * 1024


def _cluster_size(value: Any) -> int:
    size = to_size(value)
    if size & (size - 1) or not 1 << MIN_CLUSTER_BITS <= size <= 1 << MAX_CLUSTER_BITS:
        raise OptionError("Cluster size must be a power of two between 512 and 2048k")
    return size


def _refcount_bits(value: Any) -> int:
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"Parameter 'refcount_bits' expects a number, not '{value}'") from None
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise OptionError("Refcount width must be a power of two and may not exceed 64 bits")
    return bits


def _compat(value: Any) -> str:
    text = str(value)
    if text not in COMPAT_VERSIONS:
        raise OptionError(f"Parameter 'version' does not accept value '{text}'")
    return text


def _refuse_encryption(_instance: object, attribute: attrs.Attribute, value: Any) -> None:
    if value not in (None, "", False):
        raise OptionError("encrypted qcow2 images are not supported by corefmt "
                          f"({attribute.metadata.get('key') or attribute.name}={value})")


def _encrypt(key: str, help: str, kind: str = "str") -> Any:
    return option(None, help, validator=_refuse_encryption, kind=kind, key=key)


@attrs.frozen
class Qcow2CreateOptions:
    cluster_size: int = option(DEFAULT_CLUSTER_SIZE, "qcow2 cluster size",
                               converter=_cluster_size, kind="size")
    compat: str = option("1.1", "Compatibility level (v2 [0.10] or v3 [1.1])",
                         converter=_compat)
    compression_type: str = option(
        "zlib", "Compression method used for image cluster compression",
        validator=choice(*COMPRESSION_TYPES))
    data_file: str | None = option(None, "File name of an external data file")
    data_file_raw: bool = option(False, "The external data file must stay valid as a raw image",
                                 converter=to_bool)
    encrypt_cipher_alg: str | None = _encrypt("encrypt.cipher-alg",
                                              "Name of encryption cipher algorithm")
    encrypt_cipher_mode: str | None = _encrypt("encrypt.cipher-mode",
                                               "Name of encryption cipher mode")
    encrypt_format: str | None = _encrypt("encrypt.format", "Encrypt the image, format "
                                          "choices: 'aes', 'luks'")
    encrypt_hash_alg: str | None = _encrypt("encrypt.hash-alg", "Name of encryption hash "
                                            "algorithm")
    encrypt_iter_time: str | None = _encrypt("encrypt.iter-time", "Time to spend in PBKDF in "
                                             "milliseconds", kind="num")
    encrypt_ivgen_alg: str | None = _encrypt("encrypt.ivgen-alg", "Name of IV generator "
                                             "algorithm")
    encrypt_ivgen_hash_alg: str | None = _encrypt("encrypt.ivgen-hash-alg", "Name of IV "
                                                  "generator hash algorithm")
    encrypt_key_secret: str | None = _encrypt("encrypt.key-secret", "ID of secret providing "
                                              "qcow AES key or LUKS passphrase")
    encryption: bool = option(False, "Encrypt the image with format 'aes'. (Deprecated in "
                              "favor of encrypt.format=aes)", converter=to_bool,
                              validator=_refuse_encryption)
    extended_l2: bool = option(False, "Extended L2 tables", converter=to_bool)
    lazy_refcounts: bool = option(False, "Postpone refcount updates", converter=to_bool)
    preallocation: str = option(
        "off", "Preallocation mode (allowed values: off, metadata, falloc, full)",
        validator=choice(*PREALLOCATION_MODES))
    refcount_bits: int = option(DEFAULT_REFCOUNT_BITS, "Width of a reference count entry in "
                                "bits", converter=_refcount_bits, kind="num")
    nocow: bool = option(False, "Turn off copy-on-write (valid only on btrfs)",
                         converter=to_bool, protocol=True)
    extent_size_hint: int = option(
        DEFAULT_EXTENT_SIZE_HINT, "Extent size hint for the image file, 0 to disable",
        converter=to_size, protocol=True)

    @property
    def version(self) -> int:
        return COMPAT_VERSIONS[self.compat]

    def validate(self) -> None:
        """The combinations qemu-img 7.2 refuses, with its messages."""
        if self.version == VERSION_2:
            if self.refcount_bits != DEFAULT_REFCOUNT_BITS:
                raise OptionError("Different refcount widths than 16 bits require "
                                  "compatibility level 1.1 or above (use version=v3 or "
                                  "greater)")
            if self.extended_l2:
                raise OptionError("Extended L2 entries are only supported with " + V3_REQUIRED)
            if self.data_file:
                raise OptionError("External data files are only supported with " + V3_REQUIRED)
            if self.lazy_refcounts:
                raise OptionError("Lazy refcounts only supported with " + V3_REQUIRED)
            if self.compression_type != "zlib":
                raise OptionError("Non-zlib compression type is only supported with "
                                  + V3_REQUIRED)
        if self.extended_l2 and self.cluster_size < MIN_EXTL2_CLUSTER_SIZE:
            raise OptionError("Extended L2 entries are only supported with cluster sizes of "
                              f"at least {MIN_EXTL2_CLUSTER_SIZE} bytes")
        if self.data_file_raw and not self.data_file:
            raise OptionError("data-file-raw requires data-file")


def _cache_size(value: Any) -> int | None:
    return None if value is None else to_size(value)


@attrs.frozen
class Qcow2OpenOptions:
    """qemu's qcow2 runtime options that mean something here."""

    l2_cache_size: int | None = option(None, "Maximum L2 table cache size",
                                       converter=_cache_size, kind="size", key="l2-cache-size")
    refcount_cache_size: int | None = option(None, "Maximum refcount block cache size",
                                             converter=_cache_size, kind="size",
                                             key="refcount-cache-size")
    cache_size: int | None = option(None, "Maximum combined metadata (L2 table and refcount "
                                    "block) cache size", converter=_cache_size, kind="size",
                                    key="cache-size")
    lazy_refcounts: bool | None = option(
        None, "Postpone refcount updates", key="lazy-refcounts",
        converter=lambda value: None if value is None else to_bool(value), kind="bool (on/off)")
    data_file: str | None = option(None, "Name of the external data file (overrides the "
                                   "image's)", key="data-file")


def _amend_compat(value: Any) -> str | None:
    if value is not None and str(value) not in COMPAT_VERSIONS:
        raise OptionError(f"Unknown compatibility level {value}")
    return None if value is None else str(value)


def _amend_encrypt(key: str, help: str, kind: str = "str") -> Any:
    """qemu's LUKS amend options: corefmt opens no encrypted image, so any
    value is refused as qemu refuses it for an unencrypted one."""
    def refuse(value: Any) -> None:
        if value is not None:  # a converter: checked in field order, before compat's
            raise OptionError("Can't amend encryption options - encryption not present")
    return option(None, help, converter=refuse, kind=kind, key=key)


@attrs.frozen
class Qcow2AmendOptions:
    # qemu checks these first (its option list starts with them).
    encrypt_state: str | None = _amend_encrypt(
        "encrypt.state", "Select new state of affected keyslots (active/inactive)")
    encrypt_keyslot: str | None = _amend_encrypt(
        "encrypt.keyslot", "Select a single keyslot to modify explicitly", "num")
    encrypt_old_secret: str | None = _amend_encrypt(
        "encrypt.old-secret", "Select all keyslots that match this password")
    encrypt_new_secret: str | None = _amend_encrypt(
        "encrypt.new-secret", "New secret to set in the matching keyslots. Empty string to "
        "erase")
    encrypt_iter_time: str | None = _amend_encrypt(
        "encrypt.iter-time", "Time to spend in PBKDF in milliseconds", "num")
    compat: str | None = option(None, "Compatibility level (v2 [0.10] or v3 [1.1])",
                                converter=_amend_compat)
    data_file: str | None = option(None, "File name of an external data file")
    data_file_raw: bool | None = option(
        None, "The external data file must stay valid as a raw image",
        converter=lambda value: None if value is None else to_bool(value), kind="bool (on/off)")
    lazy_refcounts: bool | None = option(
        None, "Postpone refcount updates",
        converter=lambda value: None if value is None else to_bool(value), kind="bool (on/off)")
    refcount_bits: int | None = option(
        None, "Width of a reference count entry in bits",
        converter=lambda value: None if value is None else _refcount_bits(value), kind="num")

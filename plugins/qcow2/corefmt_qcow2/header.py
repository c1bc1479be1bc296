"""Reading a qcow2 header: every field checked before it is used.

The refusals use qemu-img 7.2's wording where it has one, so a script that
greps for qemu's message finds corefmt's too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt.errors import ImageError
from corefmt_qcow2.layout import (
    COMPRESSION_TYPE_OFFSET,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CRYPT_NONE,
    EXT_BACKING_FORMAT,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    EXTENSION_ALIGNMENT,
    EXTENSION_HEADER,
    FEATURE_TYPE_INCOMPAT,
    INCOMPAT_COMPRESSION,
    INCOMPAT_KNOWN,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_SIZE,
    V2_HEADER,
    V2_HEADER_LENGTH,
    V2_REFCOUNT_ORDER,
    V3_FIELDS,
    V3_MIN_HEADER_LENGTH,
    VERSION_2,
    VERSION_3,
    Extension,
    Header,
    div_round_up,
    feature_name,
)

if TYPE_CHECKING:
    from corefmt.storage.base import Storage

#: Bytes read first, to learn the cluster size: the header and its
#: extensions lie in cluster 0, read whole only when it is larger. (Reading
#: the most cluster 0 can be, 2 MiB, read all of every small overlay: a
#: chain of 500 of them read 150 MiB to open.)
HEADER_PROBE_READ = 4096


def read_header_cluster(storage: Storage, file_size: int) -> bytes:
    """Cluster 0 of the file (the header and its extensions), or as much of
    it as there is; a header too short or with an impossible cluster size
    comes back as read, for unpack_header to refuse."""
    raw = storage.read(0, min(file_size, HEADER_PROBE_READ))
    if len(raw) < V2_HEADER_LENGTH:
        return raw
    cluster_bits = V2_HEADER.unpack_from(raw)[4]
    if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        wanted = min(file_size, 1 << cluster_bits)
        if wanted > len(raw):
            raw = storage.read(0, wanted)
    return raw


def unpack_header(raw: bytes, path: str | None, file_size: int) -> Header:
    """The header in ``raw`` (the start of the file), or ImageError."""
    if len(raw) < V2_HEADER_LENGTH:
        raise ImageError(path, "qcow2 header", 0, "Image is not in qcow2 format")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method,
     l1_size, l1_offset, reftable_offset, reftable_clusters, nb_snapshots,
     snapshots_offset) = V2_HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ImageError(path, "qcow2 header", 0, "Image is not in qcow2 format")
    if version not in (VERSION_2, VERSION_3):
        raise ImageError(path, "qcow2 header", 4, f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(path, "qcow2 header", 20, f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    header = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                    l1_table_offset=l1_offset, refcount_table_offset=reftable_offset,
                    refcount_table_clusters=reftable_clusters,
                    backing_file_offset=backing_offset, backing_file_size=backing_size,
                    crypt_method=crypt_method, nb_snapshots=nb_snapshots,
                    snapshots_offset=snapshots_offset)
    if version == VERSION_2:
        header.header_length = V2_HEADER_LENGTH
        header.refcount_order = V2_REFCOUNT_ORDER
    else:
        if len(raw) < V3_MIN_HEADER_LENGTH:
            raise ImageError(path, "qcow2 header", V2_HEADER_LENGTH, "header is truncated")
        (header.incompatible_features, header.compatible_features,
         header.autoclear_features, header.refcount_order,
         header.header_length) = V3_FIELDS.unpack_from(raw, V2_HEADER_LENGTH)
        if header.header_length < V3_MIN_HEADER_LENGTH or header.header_length % 8:
            raise ImageError(path, "qcow2 header", 100,
                             f"qcow2 header too short ({header.header_length} bytes)")
        if header.header_length > cluster_size or header.header_length > len(raw):
            raise ImageError(path, "qcow2 header", 100, "qcow2 header exceeds cluster size")
        header.extra_header = bytes(raw[V3_MIN_HEADER_LENGTH:header.header_length])
        if header.header_length > COMPRESSION_TYPE_OFFSET:
            header.compression_type = raw[COMPRESSION_TYPE_OFFSET]
    _check_fields(header, path, file_size)
    _read_extensions(header, raw, path)
    _check_features(header, path)
    if backing_offset:
        if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > min(
                cluster_size, len(raw)):
            raise ImageError(path, "backing file name", backing_offset,
                             "Backing file name too long")
        try:
            header.backing_file = bytes(
                raw[backing_offset:backing_offset + backing_size]).decode()
        except UnicodeDecodeError:
            raise ImageError(path, "backing file name", backing_offset,
                             "backing file name is not UTF-8") from None
    return header


def _check_fields(header: Header, path: str | None, file_size: int) -> None:
    cluster_size = header.cluster_size
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise ImageError(path, "qcow2 header", 96, "Reference count entry width too large; "
                         "may not exceed 64 bits")
    if header.crypt_method != CRYPT_NONE:
        kind = {1: "AES", 2: "LUKS"}.get(header.crypt_method, str(header.crypt_method))
        raise ImageError(path, "qcow2 header", 32,
                         f"encrypted images ({kind}) are not supported by corefmt")
    if header.size > (1 << 63) - cluster_size:
        raise ImageError(path, "qcow2 header", 24, "Image is too big")
    l1_needed = div_round_up(header.size, cluster_size * header.l2_entries)
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(path, "L1 table", header.l1_table_offset, "Active L1 table too large")
    if header.l1_size < l1_needed:
        raise ImageError(path, "L1 table", header.l1_table_offset,
                         f"L1 table is too small ({header.l1_size} entries for "
                         f"virtual size {header.size})")
    _check_table(path, "L1 table", header.l1_table_offset, header.l1_size * 8,
                 cluster_size, file_size, "Invalid L1 table offset")
    if header.refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise ImageError(path, "refcount table", header.refcount_table_offset,
                         "Reference count table too large")
    if header.refcount_table_clusters == 0:
        raise ImageError(path, "refcount table", header.refcount_table_offset,
                         "Image does not contain a reference count table")
    _check_table(path, "refcount table", header.refcount_table_offset,
                 header.refcount_table_clusters * cluster_size, cluster_size, file_size,
                 "Invalid reference count table offset")
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(path, "snapshot table", header.snapshots_offset, "Too many snapshots")
    if header.nb_snapshots:
        _check_table(path, "snapshot table", header.snapshots_offset, 1, cluster_size,
                     file_size, "Invalid snapshot table offset")
    if header.extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise ImageError(path, "qcow2 header", 72, "Extended L2 entries are only supported "
                         f"with cluster sizes of at least {MIN_EXTL2_CLUSTER_SIZE} bytes")


def _check_table(path: str | None, what: str, offset: int, length: int, cluster_size: int,
                 file_size: int, message: str) -> None:
    if offset % cluster_size or (offset == 0 and length):
        raise ImageError(path, what, offset, message)
    if offset + length > file_size:
        raise ImageError(path, what, offset, f"{message} (past the end of the file, "
                         f"{file_size} bytes)")


def _read_extensions(header: Header, raw: bytes, path: str | None) -> None:
    offset = header.header_length
    end = min(len(raw), header.cluster_size)
    if header.backing_file_offset:
        end = min(end, header.backing_file_offset)
    while offset < end:  # as qemu: no room for an end marker is no extensions
        if offset + EXTENSION_HEADER.size > end:
            raise ImageError(path, "header extension", offset, "Header extension too large")
        kind, length = EXTENSION_HEADER.unpack_from(raw, offset)
        offset += EXTENSION_HEADER.size
        if kind == EXT_END:
            return
        if offset + length > end:
            raise ImageError(path, "header extension", offset - EXTENSION_HEADER.size,
                             f"ext ({kind:#x}): Invalid extension length")
        header.extensions.append(Extension(kind, bytes(raw[offset:offset + length])))
        offset += length + (-length % EXTENSION_ALIGNMENT)
        if kind == EXT_CRYPTO:
            raise ImageError(path, "header extension", offset,
                             "encrypted images (LUKS) are not supported by corefmt")
        if kind in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
            try:
                header.extensions[-1].data.decode()
            except UnicodeDecodeError:
                raise ImageError(path, "header extension", offset,
                                 "name is not UTF-8") from None


def _check_features(header: Header, path: str | None) -> None:
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        # As qemu's report_unsupported_feature: named bits by name, the
        # unnamed rest as one mask.
        table = header.extension(EXT_FEATURE_TABLE)
        names, unnamed = [], 0
        for bit in range(64):
            if unknown >> bit & 1:
                name = feature_name(FEATURE_TYPE_INCOMPAT, bit, table.data if table else None)
                if name is None:
                    unnamed |= 1 << bit
                else:
                    names.append(name)
        if unnamed:
            names.append(f"Unknown incompatible feature: {unnamed:x}")
        raise ImageError(path, "qcow2 header", 72,
                         f"Unsupported qcow2 feature(s): {', '.join(names)}")
    if header.incompatible_features & INCOMPAT_COMPRESSION:
        if header.header_length <= COMPRESSION_TYPE_OFFSET:
            raise ImageError(path, "qcow2 header", 72, "compression type bit set but the "
                             "header has no compression type field")
        if header.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise ImageError(path, "qcow2 header", COMPRESSION_TYPE_OFFSET,
                             f"unknown compression type {header.compression_type}")
    elif header.compression_type != COMPRESSION_ZLIB:
        raise ImageError(path, "qcow2 header", COMPRESSION_TYPE_OFFSET,
                         "compression_type field is not zlib but the compression type "
                         "feature bit is not set")

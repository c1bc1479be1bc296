"""qcow2's on-disk structures, as docs/interop/qcow2.txt lays them out.

Everything is big endian. The header (72 bytes in version 2, ``header_length``
bytes in version 3) is followed by header extensions (type, length, data
padded to 8 bytes, ending with type 0); the backing file name lies after
them, in the first cluster.
"""

from __future__ import annotations

import struct

import attrs

from corefmt.driver import recorded_version, version_record

MAGIC = b"QFI\xfb"
VERSION_2, VERSION_3 = 2, 3
#: compat=0.10 is version 2, compat=1.1 version 3 (qemu's create option).
COMPAT_VERSIONS = {"0.10": VERSION_2, "v2": VERSION_2, "1.1": VERSION_3, "v3": VERSION_3}

V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
V3_FIELDS = struct.Struct(">QQQII")
V2_HEADER_LENGTH = V2_HEADER.size  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER.size + V3_FIELDS.size  # 104
#: qemu 7.2 writes the compression type byte and 7 bytes of padding.
V3_HEADER_LENGTH = 112
COMPRESSION_TYPE_OFFSET = 104

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
DEFAULT_CLUSTER_SIZE = 65536
#: refcount_order: refcount_bits = 1 << refcount_order, 0..6.
MAX_REFCOUNT_ORDER = 6
DEFAULT_REFCOUNT_BITS = 16
V2_REFCOUNT_ORDER = 4

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
#: Autoclear bits this driver keeps valid when it writes (bitmaps: corefmt_qcow2.bitmaps).
AUTOCLEAR_UNDERSTOOD = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
#: corefmt's own extension (the spec lets readers ignore unknown ones, and
#: qemu keeps them when it rewrites the header): the backing name it was
#: written for, a NUL, and the remote backing's version (``BackingRef.identity``).
#: A record whose name is not the current backing name is stale and ignored.
EXT_BACKING_IDENTITY = 0x43464249  # "CFBI"
EXTENSION_HEADER = struct.Struct(">II")
EXTENSION_ALIGNMENT = 8

#: The feature name table qemu writes: (type, bit, name), 48 bytes each.
FEATURE_TYPE_INCOMPAT, FEATURE_TYPE_COMPAT, FEATURE_TYPE_AUTOCLEAR = 0, 1, 2
FEATURE_ENTRY = struct.Struct(">BB46s")
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPAT, 2, "external data file"),
    (FEATURE_TYPE_INCOMPAT, 3, "compression type"),
    (FEATURE_TYPE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)

# Table entries.
ENTRY = struct.Struct(">Q")
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
#: Bits 9-55: the host offset of a table or a standard cluster.
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_STANDARD_RESERVED = 0x3F000000000001FE
REFCOUNT_TABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: An extended L2 entry's second word: allocation bits 0-31, zero bits 32-63.
SUBCLUSTERS = 32
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
SUBCLUSTER_ZERO_SHIFT = 32
#: Compressed sectors are 512 bytes whatever the cluster size.
COMPRESSED_SECTOR = 512
#: An extended L2 needs clusters of at least this size (qemu's rule).
MIN_EXTL2_CLUSTER_SIZE = 16384

#: A snapshot table entry's fixed part (qcow2.txt "Snapshot table") and
#: the extra data version 3 requires (VM state size, virtual disk size).
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA = struct.Struct(">QQ")
#: The bitmaps extension's data and a bitmap directory entry's fixed part.
BITMAPS_EXTENSION = struct.Struct(">IIQQ")
BITMAP_DIRECTORY_ENTRY = struct.Struct(">QIIBBHI")
#: Snapshot table and bitmap directory entries are padded to this.
TABLE_ENTRY_ALIGNMENT = 8

# Limits from qemu's block/qcow2.h: metadata a header may ask for.
#: Largest L1 table (32 MiB) and refcount table (8 MiB) qemu opens.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
#: qemu refuses virtual sizes above 32 EiB... in practice above 2^63 - 512.
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536


@attrs.define
class Extension:
    """One header extension, kept as its bytes (unknown ones are rewritten
    unchanged)."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        padding = -len(self.data) % EXTENSION_ALIGNMENT
        return EXTENSION_HEADER.pack(self.type, len(self.data)) + self.data + bytes(padding)


@attrs.define
class Header:
    """The qcow2 header with its extensions and backing name."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = CRYPT_NONE
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = V2_REFCOUNT_ORDER
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: The header bytes past what this driver knows (version 3 only).
    extra_header: bytes = b""
    extensions: list[Extension] = attrs.field(factory=list)
    backing_file: str | None = None

    # -- derived geometry -------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 2 * ENTRY.size if self.extended_l2 else ENTRY.size

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def extension(self, kind: int) -> Extension | None:
        for extension in self.extensions:
            if extension.type == kind:
                return extension
        return None

    def set_extension(self, kind: int, data: bytes | None) -> None:
        """Replace (or with None remove) the extension of one type."""
        kept = [extension for extension in self.extensions if extension.type != kind]
        if data is not None:
            kept.append(Extension(kind, data))
        self.extensions = sorted(kept, key=_extension_order)

    @property
    def backing_format(self) -> str | None:
        extension = self.extension(EXT_BACKING_FORMAT)
        return extension.data.decode("utf-8", "replace") if extension else None

    @property
    def backing_identity(self) -> str | None:
        """The recorded version of the backing, if recorded for its current name."""
        extension = self.extension(EXT_BACKING_IDENTITY)
        if extension is None or self.backing_file is None:
            return None
        return recorded_version(extension.data, self.backing_file)

    def set_backing_identity(self, identity: str | None) -> None:
        """Record ``identity`` for the current backing name (None: no record)."""
        self.set_extension(EXT_BACKING_IDENTITY,
                           version_record(self.backing_file or "", identity))

    @property
    def data_file(self) -> str | None:
        extension = self.extension(EXT_DATA_FILE)
        return extension.data.decode("utf-8", "replace") if extension else None

    # -- bytes ------------------------------------------------------------------------
    def pack(self, cluster_size: int | None = None) -> bytes:
        """Header, extensions and backing name: the start of cluster 0.

        The backing name goes right after the extensions (as qemu puts it);
        ``backing_file_offset`` and ``backing_file_size`` are set here.
        """
        packed = self._pack(self.extensions)
        # As qemu, the feature name table is left out where it does not fit;
        # so is corefmt's backing version record (the image works without it).
        for optional in ((EXT_FEATURE_TABLE,), (EXT_FEATURE_TABLE, EXT_BACKING_IDENTITY)):
            if cluster_size is None or len(packed) <= cluster_size:
                break
            packed = self._pack([extension for extension in self.extensions
                                 if extension.type not in optional])
        if cluster_size is not None and len(packed) > cluster_size:
            raise ValueError("header, extensions and backing name do not fit in one cluster")
        return packed

    def _pack(self, extensions: list[Extension]) -> bytes:
        if self.version == VERSION_2:
            fixed_length = V2_HEADER_LENGTH
        else:
            fixed_length = max(self.header_length, V3_MIN_HEADER_LENGTH)
        body = b"".join(extension.pack() for extension in extensions)
        body += EXTENSION_HEADER.pack(EXT_END, 0)
        name = (self.backing_file or "").encode()
        self.backing_file_offset = fixed_length + len(body) if name else 0
        self.backing_file_size = len(name)
        head = V2_HEADER.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset)
        if self.version >= VERSION_3:
            head += V3_FIELDS.pack(self.incompatible_features, self.compatible_features,
                                   self.autoclear_features, self.refcount_order, fixed_length)
            if fixed_length > V3_MIN_HEADER_LENGTH:
                tail = bytearray(fixed_length - V3_MIN_HEADER_LENGTH)
                tail[:len(self.extra_header)] = self.extra_header[:len(tail)]
                tail[0] = self.compression_type
                head += bytes(tail)
        return head + body + name


def _extension_order(extension: Extension) -> int:
    """qemu's order: backing format, data file, feature table, bitmaps, the rest."""
    order = (EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE, EXT_BITMAPS)
    return order.index(extension.type) if extension.type in order else len(order)


def feature_table() -> bytes:
    return b"".join(FEATURE_ENTRY.pack(kind, bit, name.encode())
                    for kind, bit, name in FEATURE_NAMES)


def feature_name(kind: int, bit: int, table: bytes | None) -> str | None:
    """The name an image's own feature table gives a bit, else qemu's (None:
    nobody named it)."""
    if table:
        for start in range(0, len(table) - FEATURE_ENTRY.size + 1, FEATURE_ENTRY.size):
            entry_kind, entry_bit, raw = FEATURE_ENTRY.unpack_from(table, start)
            if (entry_kind, entry_bit) == (kind, bit):
                return raw.rstrip(b"\0").decode("utf-8", "replace")
    for entry_kind, entry_bit, name in FEATURE_NAMES:
        if (entry_kind, entry_bit) == (kind, bit):
            return name
    return None


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def div_round_up(value: int, divisor: int) -> int:
    return -(-value // divisor)

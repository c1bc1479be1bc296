"""The qcow2 format driver: probing, creating (the layout qemu-img 7.2 makes)
and opening."""

from __future__ import annotations

from typing import Any

from corefmt import (
    PROBE_CERTAIN,
    PROBE_NO,
    BackingRef,
    CreateContext,
    FormatDriver,
    ImageContext,
    MeasureResult,
    OptionError,
    Storage,
)
from corefmt_qcow2.image import Qcow2Image
from corefmt_qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    ENTRY,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MAGIC,
    VERSION_2,
    VERSION_3,
    Header,
    feature_table,
)
from corefmt_qcow2.options import Qcow2AmendOptions, Qcow2CreateOptions, Qcow2OpenOptions
from corefmt_qcow2.preallocate import preallocate
from corefmt_qcow2.refcount import set_refcount
from corefmt_qcow2.resize import L1TooLarge

#: A new image: header, refcount table and one refcount block, as qemu lays it out.
HEADER_CLUSTER, REFTABLE_CLUSTER, REFBLOCK_CLUSTER = 0, 1, 2
#: qemu-img 7.2 writes the feature name table only into clusters bigger than this.
FEATURE_TABLE_MIN_CLUSTER = 4096


class Qcow2Driver(FormatDriver):
    name = "qcow2"
    create_options = Qcow2CreateOptions
    open_options = Qcow2OpenOptions
    amend_options = Qcow2AmendOptions
    supports_backing = True
    supports_compression = True
    stress_option_sets = (
        "",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=512,refcount_bits=64",
        "compat=0.10",
        "cluster_size=65536,extended_l2=on",
        "lazy_refcounts=on",
    )

    def probe(self, head: bytes, path: str | None) -> int:
        if head[:4] == MAGIC and int.from_bytes(head[4:8], "big") >= VERSION_2:
            return PROBE_CERTAIN
        return PROBE_NO

    def create(self, storage: Storage, size: int, options: Qcow2CreateOptions,
               backing: BackingRef | None, *, context: CreateContext | None = None) -> None:
        options.validate()
        if backing is not None and options.data_file_raw:
            raise OptionError("Backing file and data-file-raw cannot be used at the same time")
        if backing is not None and options.preallocation != "off" and not options.extended_l2:
            raise OptionError("Backing file and preallocation can only be used at the same "
                              "time if extended_l2 is on")
        cs = options.cluster_size
        header = new_header(options, backing)
        data: Storage | None = None
        if options.data_file:
            if context is None:
                raise OptionError("qcow2: an external data file needs a create context")
            data = context.create_child("data_file", options.data_file)
            data.truncate(size)
        # The magic goes on disk last: an interrupted create leaves no qcow2
        # that opens with the wrong size.
        final, storage = storage, _MagicLast(storage)
        storage.truncate(0)
        storage.write(HEADER_CLUSTER * cs, header.pack(cs))
        table = bytearray(cs)
        ENTRY.pack_into(table, 0, REFBLOCK_CLUSTER * cs)
        block = bytearray(cs)
        for cluster in (HEADER_CLUSTER, REFTABLE_CLUSTER, REFBLOCK_CLUSTER):
            set_refcount(block, cluster, options.refcount_bits, 1)
        storage.write(REFTABLE_CLUSTER * cs, table)
        storage.write(REFBLOCK_CLUSTER * cs, block)

        def child(role: str, path: str, format: str | None = None, **_: Any) -> Storage:
            assert data is not None
            return _Passthrough(data)

        image = Qcow2Image(storage, ImageContext(
            path=context.path if context else None, read_only=False,
            read_below=lambda _offset, length: bytes(length), open_child=child))
        try:
            image.truncate(size)
        except L1TooLarge:  # qemu-img turns the -EFBIG into this
            raise OptionError("The image size is too large for file format 'qcow2' "
                              "(try using a larger cluster size)") from None
        if options.preallocation != "off":
            preallocate(image, options.preallocation)
        image.flush()
        final.write(0, MAGIC)

    def open(self, storage: Storage, context: ImageContext) -> Qcow2Image:
        return Qcow2Image(storage, context)

    def measure(self, size: int, options: Qcow2CreateOptions, source: Any,
                backing: BackingRef | None = None) -> MeasureResult:
        """qemu-img measure -O qcow2 (``backing``: the -o backing_file)."""
        from corefmt_qcow2.measure import measure  # only measure needs it (and convert's walk)

        return measure(size, options, source, backing)


def new_header(options: Qcow2CreateOptions, backing: BackingRef | None) -> Header:
    """The header qemu-img 7.2 writes for these options (size 0, no L1: the
    image is then grown to its size)."""
    version = options.version
    header = Header(version=version, cluster_bits=options.cluster_size.bit_length() - 1,
                    size=0, l1_size=0, l1_table_offset=0,
                    refcount_table_offset=REFTABLE_CLUSTER * options.cluster_size,
                    refcount_table_clusters=1,
                    refcount_order=options.refcount_bits.bit_length() - 1)
    if version >= VERSION_3:
        if options.lazy_refcounts:
            header.compatible_features |= COMPAT_LAZY_REFCOUNTS
        if options.extended_l2:
            header.incompatible_features |= INCOMPAT_EXTL2
        if options.data_file:
            header.incompatible_features |= INCOMPAT_DATA_FILE
            header.set_extension(EXT_DATA_FILE, options.data_file.encode())
            if options.data_file_raw:
                header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
        compression = COMPRESSION_NAMES[options.compression_type]
        if compression != COMPRESSION_ZLIB:
            header.incompatible_features |= INCOMPAT_COMPRESSION
            header.compression_type = compression
        if options.cluster_size > FEATURE_TABLE_MIN_CLUSTER:
            header.set_extension(EXT_FEATURE_TABLE, feature_table())
    if backing is not None:
        header.backing_file = backing.path
        if backing.format:
            header.set_extension(EXT_BACKING_FORMAT, backing.format.encode())
        header.set_backing_identity(backing.identity)
    return header


class _Passthrough(Storage):
    """A storage that hands everything to the one it wraps and leaves it open
    (create's caller closes the files it made)."""

    def __init__(self, inner: Storage):
        super().__init__(inner.path, inner.read_only)
        self.inner = inner
        self.request_alignment = inner.request_alignment

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self.inner.readinto(offset, buf)

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        self.inner.write(offset, data)

    def _truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def flush(self) -> None:
        self.inner.flush()

    def preallocate(self, offset: int, length: int) -> bool:
        return self.inner.preallocate(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.inner.write_zeroes(offset, length, unmap)

    def close(self) -> None:
        """Left open for create's caller."""


class _MagicLast(_Passthrough):
    """The new image file while create builds it: writes of the magic are
    held back (zeros go to disk), reads see it. Create writes it at the end."""

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self.inner.readinto(offset, buf)
        if offset < len(MAGIC):
            end = min(len(MAGIC), offset + len(buf))
            buf[:end - offset] = MAGIC[offset:end]

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < len(MAGIC):
            data = bytearray(data)
            end = min(len(MAGIC), offset + len(data))
            data[:end - offset] = bytes(end - offset)
        self.inner.write(offset, data)

"""Compressed clusters' bytes: qemu's zlib and zstd streams, both ways.

qemu stores one cluster as raw deflate with a 4 KiB window (zlib) or as one
zstd frame, and records only how many 512-byte sectors the stream spans, so
a reader cannot know where the stream ends exactly: it decompresses until a
cluster's worth came out and ignores the slack after the stream. A cluster
whose stream would not be shorter than the cluster is stored uncompressed.

Both libraries release the GIL while they work, so callers compress on as
many threads as they like; each thread keeps its own compressor objects
(neither library's are safe to share).
"""

from __future__ import annotations

import threading
import zlib

from corefmt_qcow2.layout import COMPRESSION_ZSTD

#: zlib's raw deflate with a 4 KiB window: what qemu writes and reads.
ZLIB_WINDOW_BITS = -12
#: qemu's deflateInit2 arguments: the default level (6) and memLevel 9.
ZLIB_LEVEL = zlib.Z_DEFAULT_COMPRESSION
ZLIB_MEM_LEVEL = 9
#: qemu creates its zstd context with the library's default level.
ZSTD_LEVEL = 3

_local = threading.local()


def _zstd_compressor():  # zstandard is imported lazily: no annotation
    compressor = getattr(_local, "zstd", None)
    if compressor is None:
        import zstandard

        compressor = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor


def compress(data: bytes | bytearray | memoryview, compression_type: int) -> bytes | None:
    """One cluster's stream, or None when it would not be shorter than the
    cluster (qemu then writes the cluster uncompressed: a compressed cluster
    must fit in ``cluster_size - 1`` bytes)."""
    if compression_type == COMPRESSION_ZSTD:
        stream = _zstd_compressor().compress(data)
    else:
        deflate = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, ZLIB_WINDOW_BITS, ZLIB_MEM_LEVEL)
        stream = deflate.compress(data) + deflate.flush()
    return stream if len(stream) < len(data) else None


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes | None:
    """A compressed cluster's content, or None if it does not decompress to
    exactly one cluster (the stored length is rounded up to sectors, so
    trailing bytes after the stream are expected)."""
    if compression_type == COMPRESSION_ZSTD:
        import zstandard

        out = bytearray()
        try:  # a stream reader: a hostile frame cannot make more than a cluster
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
            while len(out) < cluster_size:
                chunk = reader.read(cluster_size - len(out))
                if not chunk:
                    break
                out += chunk
        except zstandard.ZstdError:
            return None
    else:
        try:
            out = zlib.decompressobj(ZLIB_WINDOW_BITS).decompress(data, cluster_size)
        except zlib.error:
            return None
    if len(out) < cluster_size:
        return None
    return bytes(out[:cluster_size])

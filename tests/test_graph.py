"""The node graph: one read path through lower layers, filters on edges,
request flags, driver limits, NotSupported fallbacks, contexts, specs."""

from __future__ import annotations

import json
import sys
import threading

import attrs
import pytest

import corefmt
from corefmt import hookimpl, plugins
from corefmt.block.chain import open_chain
from corefmt.block.image_node import ImageNode
from corefmt.block.imagespec import parse_image_opts, parse_json_filename
from corefmt.driver import PROBE_NO, FormatDriver, Image
from corefmt.errors import NotSupported, OptionError
from corefmt.extents import Extent
from corefmt.filters.base import Filter, FilterDriver
from corefmt.flags import RequestFlags
from corefmt.limits import Limits
from corefmt.ops import info as info_op
from corefmt.ops import map as map_op
from corefmt.storage.memory import MemoryStorageDriver
from tests.conftest import fill

KiB = 1024
MiB = 1024 * KiB


# -- a deep chain through the one read path ------------------------------------------
def _deep_chain(tmp_path, layers: int, block: int = 4096) -> tuple[str, list[bytes]]:
    """raw base + ``layers`` blockmap overlays; layer i holds block i."""
    size = (layers + 1) * block
    base = str(tmp_path / "l0.raw")
    corefmt.create(base, "raw", size)
    payloads = [fill(block, 1000)]
    with corefmt.open(base, "raw") as disk:
        disk.write(0, payloads[0])
    below, below_format = "l0.raw", "raw"
    for index in range(1, layers + 1):
        path = str(tmp_path / f"l{index}.bm")
        corefmt.create(path, "blockmap", size, backing=below, backing_format=below_format,
                       unsafe=True)
        payloads.append(fill(block, 1000 + index))
        with open_chain(path, "blockmap", backing=False) as disk:
            disk.write(index * block, payloads[index])
        below, below_format = f"l{index}.bm", "blockmap"
    return str(tmp_path / f"l{layers}.bm"), payloads


def test_a_500_deep_chain_reads_every_layer_without_recursion(blockmap, tmp_path):
    top, payloads = _deep_chain(tmp_path, 499)
    limit = sys.getrecursionlimit()
    with corefmt.open(top, read_only=True) as disk:
        assert len(disk.chain()) == 500
        sys.setrecursionlimit(120)  # far below the chain's depth: no per-layer recursion
        try:
            data = disk.read(0, len(payloads) * 4096)
            status = disk.block_status(0, disk.virtual_size)
        finally:
            sys.setrecursionlimit(limit)
    assert data == b"".join(payloads)
    assert [extent.depth for extent in status] == list(range(499, -1, -1))


class _ReadCounter:
    """Counts reads each node's request path sees."""

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}

    @hookimpl
    def corefmt_observe_request(self, node, operation, offset, length):
        if operation == "read":
            name = node.filename.rsplit("/", 1)[-1]
            self.reads[name] = self.reads.get(name, 0) + 1


@pytest.fixture
def read_counter(blockmap):
    counter = _ReadCounter()
    plugins.register_plugin(counter)
    yield counter
    plugins.unregister_plugin(counter)


def test_a_lower_layer_is_read_through_its_own_request_path(read_counter, tmp_path):
    top, payloads = _deep_chain(tmp_path, 2)
    with corefmt.open(top) as disk:
        read_counter.reads.clear()
        assert disk.read(0, 3 * 4096) == b"".join(payloads)
    # the top's read, and one read on each lower layer for the range it holds
    assert read_counter.reads == {"l2.bm": 1, "l1.bm": 1, "l0.raw": 1}


class _CountingFilter(Filter):
    reads: list[tuple[int, int]] = []

    def readinto(self, offset, buf, flags):
        _CountingFilter.reads.append((offset, len(buf)))
        super().readinto(offset, buf, flags)


class _CountingDriver(FilterDriver):
    name = "test-count"

    def open(self, child, options, context):
        return _CountingFilter(child, options, context)


class _CountingPlugin:
    @hookimpl
    def corefmt_register(self, registry):
        registry.add_filter(_CountingDriver())


@pytest.fixture
def counting_filter(blockmap):
    plugin = _CountingPlugin()
    plugins.register_plugin(plugin)
    _CountingFilter.reads = []
    yield _CountingFilter
    plugins.unregister_plugin(plugin)


def test_a_filter_on_the_backing_edge_sees_the_reads_below(counting_filter, tmp_path):
    top, payloads = _deep_chain(tmp_path, 1)
    spec = {"driver": "blockmap", "file": {"filename": top},
            "backing": {"driver": "test-count",
                        "file": {"driver": "raw", "file": {"filename": str(tmp_path / "l0.raw")}}}}
    with corefmt.open(spec) as disk:
        assert [layer.format_name for layer in disk.chain()] == ["blockmap", "raw"]
        assert disk.read(0, 2 * 4096) == b"".join(payloads)
        # block status reports the filter as the node serving the base's range
        assert disk.block_status(0, 4096)[0].node.driver_name == "test-count"
    assert counting_filter.reads == [(0, 4096)]


def test_block_status_passes_through_a_filter_on_top(counting_filter, tmp_path):
    top, _ = _deep_chain(tmp_path, 1)
    with corefmt.open(top) as plain:
        expected = [(e.offset, e.length, e.depth, e.data) for e in plain.block_status(0, 8192)]
    with corefmt.open({"driver": "test-count", "file": top}) as disk:
        got = [(e.offset, e.length, e.depth, e.data) for e in disk.block_status(0, 8192)]
        assert disk.driver_name == "test-count" and disk.format_name == "blockmap"
    assert got == expected


# -- copy-on-read: sync widening, async bounded fills --------------------------------
def _cor_pair(tmp_path, block=65536):
    base_data = fill(4 * block, 7)
    base = str(tmp_path / "base.raw")
    corefmt.create(base, "raw", 4 * block)
    with corefmt.open(base, "raw") as disk:
        disk.write(0, base_data)
    top = str(tmp_path / "top.bm")
    corefmt.create(top, "blockmap", options={"block_size": block}, backing="base.raw",
                   backing_format="raw")
    return top, base_data


def test_copy_on_read_widens_to_the_copy_granularity(blockmap, tmp_path):
    top, base_data = _cor_pair(tmp_path)
    with corefmt.open(top, copy_on_read=True) as disk:
        assert disk.limits.copy_granularity == 65536
        assert disk.read(70000, 100) == base_data[70000:70100]
        assert disk.layer().copy_up(70000, 100) == 0  # already filled, whole block
        own = disk.own_status(0, disk.virtual_size)
    assert [(e.offset, e.length, e.allocated) for e in own] == [
        (0, 65536, False), (65536, 65536, True), (131072, 131072, False)]
    with corefmt.open(top) as disk:
        assert disk.layer().copy_up(200000, 10) == 65536  # one whole copy unit


def test_async_copy_on_read_fills_in_the_background_and_drops_over_the_bound(
        blockmap, tmp_path):
    top, base_data = _cor_pair(tmp_path)
    spec = {"driver": "copy-on-read", "mode": "async", "max-outstanding": "64k",
            "file": {"driver": "blockmap", "file": top}}
    with corefmt.open(spec) as disk:
        cor = disk.filter
        assert cor.max_outstanding == 65536
        image_node = disk.layer()
        release = threading.Event()
        real_copy_up = image_node.copy_up

        def slow_copy_up(offset, length, data=None):
            release.wait(10)  # the first fill is still running during the next reads
            return real_copy_up(offset, length, data)

        image_node.copy_up = slow_copy_up
        for offset in range(0, 4 * 65536, 65536):
            assert disk.read(offset, 4096) == base_data[offset:offset + 4096]  # not waiting
        assert (cor.fills_started, cor.fills_dropped) == (1, 3)
        release.set()
        disk.flush()  # waits for fills in flight
        allocated = [(e.offset, e.length) for e in disk.own_status(0, disk.virtual_size)
                     if e.allocated]
    assert allocated == [(0, 65536)]
    with corefmt.open(top, read_only=True) as disk:
        assert disk.read(0, 4 * 65536) == base_data


def test_copy_on_read_filter_from_json_in_the_cli(blockmap, tmp_path):
    from tests.conftest import run_cli

    top, _ = _cor_pair(tmp_path)
    spec = json.dumps({"driver": "copy-on-read", "file": {"driver": "blockmap",
                                                          "file": {"filename": top}}})
    result = run_cli("io", "-c", "read 0 4096", f"json:{spec}", check=True)
    assert "read 4096/4096" in result.stdout
    with corefmt.open(top, read_only=True) as disk:
        assert disk.own_status(0, 65536)[0].allocated


# -- flags, limits and NotSupported -----------------------------------------------------
@attrs.frozen
class _Opts:
    pass


class _Recording(Image):
    """A memory-backed image recording what the driver is asked."""

    calls: list

    def __init__(self, storage, context, *, limits=None, new_style=True):
        super().__init__(storage, context)
        self.virtual_size = 256 * KiB
        self._limits = limits or Limits()
        self.data = bytearray(self.virtual_size)
        self.calls = []
        self.flushes = 0
        if not new_style:
            self.write = self._old_write  # type: ignore[method-assign]

    @property
    def limits(self):
        return self._limits

    def block_status(self, offset, length):
        return Extent(offset, length, data=True, zero=False)

    def readinto(self, offset, buf):
        self.calls.append(("read", offset, len(buf)))
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data, flags=RequestFlags.NONE):
        self.calls.append(("write", offset, len(data), flags))
        self.data[offset:offset + len(data)] = data

    def _old_write(self, offset, data):
        self.calls.append(("write", offset, len(data)))
        self.data[offset:offset + len(data)] = data

    def write_zeroes(self, offset, length, unmap):
        raise NotSupported("not here")

    def discard(self, offset, length):
        raise NotSupported("not here either")

    def flush(self):
        self.flushes += 1


def _node(image_kwargs=None) -> tuple[ImageNode, _Recording]:
    storage = MemoryStorageDriver().create("memory:graph-test")
    driver = _PlainDriver()
    node = ImageNode(storage=storage, driver=driver, filename="memory:graph-test",
                     read_only=False)
    image = _Recording(storage, corefmt.ImageContext(None, False, node.read_below),
                       **(image_kwargs or {}))
    node.attach(image)
    return node, image


class _PlainDriver(FormatDriver):
    name = "recording"

    def probe(self, head, path):
        return PROBE_NO

    def create(self, storage, size, options, backing):
        pass

    def open(self, storage, context):
        raise AssertionError("built by hand")


def test_flags_reach_a_driver_that_takes_them():
    node, image = _node()
    node.write(0, b"a" * 512, RequestFlags.FUA)
    assert image.calls == [("write", 0, 512, RequestFlags.FUA)] and image.flushes == 0


def test_fua_on_an_old_style_driver_is_a_flush_after_the_write():
    node, image = _node({"new_style": False})
    node.write(0, b"a" * 512, RequestFlags.FUA)
    assert image.calls == [("write", 0, 512)] and image.flushes == 1
    node.write(512, b"b" * 512)
    assert image.flushes == 1


def test_compressed_writes_are_refused_by_a_format_that_cannot_compress():
    node, image = _node()
    with pytest.raises(NotSupported, match="compression"):
        node.write(0, b"a" * 512, RequestFlags.COMPRESSED)
    assert image.calls == []


def test_declined_write_zeroes_are_emulated_and_no_fallback_refuses():
    node, image = _node()
    image.data[:] = b"\x01" * len(image.data)
    node.write_zeroes(4096, 8192)
    assert bytes(image.data[4096:12288]) == bytes(8192)
    assert [call[:3] for call in image.calls] == [("write", 4096, 8192)]
    with pytest.raises(NotSupported):
        node.write_zeroes(0, 4096, flags=RequestFlags.NO_FALLBACK)
    node.discard(0, 65536)  # declined: a hint, nothing happens and nothing fails


def test_max_transfer_and_alignment_shape_what_the_driver_sees():
    limits = Limits(request_alignment=512, max_transfer=8192, copy_granularity=4096)
    node, image = _node({"limits": limits})
    node.write(100, fill(20000, 3))
    writes = [(offset, length) for kind, offset, length, *_ in image.calls if kind == "write"]
    assert all(offset % 512 == 0 and length % 512 == 0 and length <= 8192
               for offset, length in writes)
    image.calls.clear()
    node.read(0, 20000)
    reads = [length for kind, _, length in image.calls if kind == "read"]
    assert reads == [8192, 8192, 20000 - 16384]


def test_limits_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        Limits(request_alignment=3)
    with pytest.raises(ValueError, match="multiple"):
        Limits(request_alignment=512, max_transfer=1000)
    with pytest.raises(ValueError, match="multiple"):
        Limits(request_alignment=512, copy_granularity=1000)
    # FVD's blocks need not be powers of two.
    assert Limits(request_alignment=512, copy_granularity=7680).copy_granularity == 7680


# -- specs ----------------------------------------------------------------------------
def test_json_and_image_opts_spellings_give_one_spec():
    nested = parse_json_filename(
        'json:{"driver":"raw","file":{"driver":"file","filename":"a"},'
        '"inject-error":[{"event":"read_aio"}]}')
    dotted = parse_json_filename('json:{"driver":"raw","file.driver":"file",'
                                 '"file.filename":"a","inject-error.0.event":"read_aio"}')
    opts = parse_image_opts("driver=raw,file.driver=file,file.filename=a,"
                            "inject-error.0.event=read_aio")
    assert nested == dotted == opts
    with pytest.raises(OptionError, match="JSON"):
        parse_json_filename('json:{"driver":')
    with pytest.raises(OptionError):
        parse_image_opts("file=a,file.filename=b")


def test_unknown_open_options_are_refused_as_qemu_words_it(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", MiB)
    with pytest.raises(OptionError, match="Block format 'raw' does not support the option "
                                          "'foo'"):
        corefmt.open({"driver": "raw", "file": path, "foo": "1"})
    with pytest.raises(OptionError, match="Block protocol 'file' doesn't support the option"):
        corefmt.open({"driver": "raw", "file": {"filename": path, "bar": 2}})
    with pytest.raises(OptionError, match="offset"):
        corefmt.open({"driver": "raw", "file": path, "offset": "x"})


def test_raw_open_options_show_a_window_of_the_file(tmp_path):
    path = str(tmp_path / "a.raw")
    corefmt.create(path, "raw", MiB)
    with corefmt.open(path, "raw", options={"offset": "4k", "size": "64k"}) as disk:
        assert disk.virtual_size == 65536
        disk.write(0, b"w" * 512)
        status = disk.block_status(0, 65536)
        assert status[0].host_offset == 4096
    with corefmt.open(path, "raw") as disk:
        assert disk.read(4096, 512) == b"w" * 512


# -- driver context: create gets the backing node, backing formats not recorded --------
class _NoFormatRecord(FormatDriver):
    """A blockmap that records no backing format (as qcow v1), and that
    sees the opened backing node at create time."""

    name = "bm-nofmt"
    supports_backing = True
    records_backing_format = False
    seen_backing_size: int | None = None

    def __init__(self, inner):
        self.inner = inner
        self.create_options = inner.create_options

    def create(self, storage, size, options, backing, context=None):
        _NoFormatRecord.seen_backing_size = context.backing.virtual_size if context.backing \
            else None
        self.inner.create(storage, size, options, backing)

    def open(self, storage, context):
        return self.inner.open(storage, context)


def test_create_sees_the_backing_node_and_needs_no_format_it_cannot_record(
        blockmap, tmp_path):
    class Plugin:
        @hookimpl
        def corefmt_register(self, registry):
            registry.add_format(_NoFormatRecord(blockmap))

    plugin = Plugin()
    plugins.register_plugin(plugin)
    try:
        base = str(tmp_path / "base.raw")
        corefmt.create(base, "raw", 3 * MiB)
        corefmt.create(str(tmp_path / "top"), "bm-nofmt", backing="base.raw")
        assert _NoFormatRecord.seen_backing_size == 3 * MiB
        with pytest.raises(OptionError, match="backing format"):
            corefmt.create(str(tmp_path / "other"), "blockmap", backing="base.raw")
    finally:
        plugins.unregister_plugin(plugin)


# -- info and map report what the interfaces say ------------------------------------------
def test_info_reports_the_dirty_flag_and_map_hides_compressed_offsets(tmp_path):
    node, image = _node()
    type(image).dirty = property(lambda self: True)  # type: ignore[assignment]
    try:
        assert info_op.node_info(node)["dirty-flag"] is True
    finally:
        del type(image).dirty
    compressed = Extent(0, 4096, data=True, zero=False, host_offset=12345, compressed=True)
    image.block_status = lambda offset, length: (  # type: ignore[method-assign]
        compressed if offset == 0 else Extent(offset, length, True, False, host_offset=offset))
    entries = list(map_op.map_entries(node))
    assert "offset" not in entries[0] and entries[1]["offset"] == 4096


def test_a_flush_after_a_failed_write_still_reaches_the_driver():
    # A write that fails part-way may have stored some of its data; a flush
    # after it must make that durable, not be skipped as idle.
    node, image = _node()

    def failing_write(offset, data, flags=RequestFlags.NONE):
        image.data[offset:offset + 512] = bytes(data[:512])
        raise corefmt.StorageError("memory:graph-test", "write", OSError(5, "I/O error"))

    image.write = failing_write
    with pytest.raises(corefmt.StorageError):
        node.write(0, b"p" * 4096)
    node.flush()
    assert image.flushes == 1
    node.flush()
    assert image.flushes == 1  # nothing since: idle

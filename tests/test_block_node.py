"""The block layer: chains, copy-on-read, hooks, alignment, errors."""

from __future__ import annotations

import pytest

import corefmt
from corefmt import hookimpl, plugins
from corefmt.block.chain import open_chain
from corefmt.errors import BackingChainError, RangeError, ReadOnlyError
from tests.conftest import fill

MiB = 1024 * 1024
KiB = 1024


def make_raw(path, size, data=b"", at=0):
    corefmt.create(str(path), "raw", size)
    if data:
        with corefmt.open(str(path), "raw") as disk:
            disk.write(at, data)
    return str(path)


def make_overlay(path, backing, backing_format, size=None):
    corefmt.create(str(path), "blockmap", size, backing=backing, backing_format=backing_format)
    return str(path)


def test_top_layer_wins_on_long_reads(blockmap, tmp_path):
    base_data = fill(MiB, 10)
    make_raw(tmp_path / "base.raw", MiB, base_data)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    with corefmt.open(top) as disk:
        disk.write(4096 * 3, b"x" * 4096)
        data = disk.read(0, MiB)
    assert data[:12288] == base_data[:12288]
    assert data[12288:16384] == b"x" * 4096
    assert data[16384:] == base_data[16384:]


def test_zeros_past_the_end_of_a_shorter_base(blockmap, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"\x07" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw", size=MiB)
    with corefmt.open(top) as disk:
        assert disk.read(0, 64 * KiB) == b"\x07" * 64 * KiB
        assert disk.read(64 * KiB, MiB - 64 * KiB) == bytes(MiB - 64 * KiB)
        tail = [e for e in disk.block_status(0, MiB) if e.offset >= 64 * KiB]
        assert tail and all(e.zero and not e.present for e in tail)


def test_copy_on_read_copies_into_the_top_only(blockmap, tmp_path):
    base_data = fill(256 * KiB, 11)
    base = make_raw(tmp_path / "base.raw", 256 * KiB, base_data)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    with corefmt.open(top, copy_on_read=True) as disk:
        assert disk.read(8192, 20000) == base_data[8192:28192]
        own = disk.own_status(0, 256 * KiB)
    assert [(e.offset, e.length, e.allocated) for e in own] == [
        (0, 8192, False), (8192, 20480, True), (28672, 233472, False)]
    with corefmt.open(top, backing=False, read_only=True) as alone:
        # the copied blocks now hold the base's bytes in the overlay itself
        assert alone.read(8192, 20000) == base_data[8192:28192]
    with corefmt.open(base, "raw", read_only=True) as disk:
        assert disk.read(0, 256 * KiB) == base_data


def test_copy_on_read_is_off_by_default(blockmap, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"b" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    with corefmt.open(top) as disk:
        disk.read(0, 64 * KiB)
        assert not any(e.allocated for e in disk.own_status(0, 64 * KiB))


class _Recorder:
    def __init__(self, decision=None, write_during_copy=None):
        self.calls: list[tuple[str, int, int]] = []
        self.decision = decision
        self.write_during_copy = write_during_copy

    @hookimpl
    def corefmt_copy_on_read(self, node, offset, length):
        return self.decision

    @hookimpl
    def corefmt_observe_request(self, node, operation, offset, length):
        if node.backing is None:
            return  # only requests on the overlays under test
        self.calls.append((operation, offset, length))
        if operation == "copy_on_read" and self.write_during_copy:
            self.write_during_copy(node)


@pytest.fixture
def recorder_plugin(blockmap):
    created = []

    def install(**kwargs):
        recorder = _Recorder(**kwargs)
        plugins.register_plugin(recorder)
        plugins.registry()
        created.append(recorder)
        return recorder

    yield install
    for recorder in created:
        plugins.unregister_plugin(recorder)


def test_hooks_decide_copy_on_read_and_observe_requests(recorder_plugin, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"b" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    recorder = recorder_plugin(decision=True)
    with corefmt.open(top) as disk:  # copy_on_read flag off, the hook says yes
        disk.write(0, b"w" * 512)
        disk.read(0, 8192)
        assert all(e.allocated for e in disk.own_status(0, 8192))
    operations = [call[0] for call in recorder.calls]
    assert operations[:3] == ["write", "read", "copy_on_read"]
    assert ("copy_on_read", 4096, 4096) in recorder.calls


def test_hook_can_veto_copy_on_read(recorder_plugin, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"b" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    recorder_plugin(decision=False)
    with corefmt.open(top, copy_on_read=True) as disk:
        disk.read(0, 64 * KiB)
        assert not any(e.allocated for e in disk.own_status(0, 64 * KiB))


def test_guest_write_during_copy_on_read_wins(recorder_plugin, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"b" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")

    def guest_write(node):
        node.write(0, b"G" * 4096)

    recorder_plugin(write_during_copy=guest_write)
    with corefmt.open(top, copy_on_read=True) as disk:
        assert disk.read(0, 8192) == b"b" * 8192  # the read saw the base
        assert disk.read(0, 8192) == b"G" * 4096 + b"b" * 4096  # the write was not undone


def test_write_zeroes_emulated_over_backing_data(blockmap, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB, b"b" * 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    with corefmt.open(top) as disk:
        disk.write_zeroes(1000, 10000)
        data = disk.read(0, 64 * KiB)
        disk.discard(0, 64 * KiB)  # blockmap cannot discard: a no-op
        assert disk.read(0, 64 * KiB) == data
    assert data == b"b" * 1000 + bytes(10000) + b"b" * (64 * KiB - 11000)


def test_read_only_and_range_errors_change_nothing(tmp_path):
    path = make_raw(tmp_path / "a.raw", 64 * KiB, b"a" * 64 * KiB)
    before = (tmp_path / "a.raw").read_bytes()
    with corefmt.open(path, "raw", read_only=True) as disk:
        for call in (lambda: disk.write(0, b"x"), lambda: disk.write_zeroes(0, 512),
                     lambda: disk.discard(0, 512), lambda: disk.truncate(0)):
            with pytest.raises(ReadOnlyError):
                call()
    with corefmt.open(path, "raw") as disk:
        with pytest.raises(RangeError):
            disk.write(64 * KiB - 1, b"xy")
        with pytest.raises(RangeError):
            disk.read(64 * KiB, 1)
        with pytest.raises(RangeError):
            disk.read(-1, 1)
    assert (tmp_path / "a.raw").read_bytes() == before


def test_missing_backing_file_is_named(blockmap, tmp_path):
    make_raw(tmp_path / "base.raw", 64 * KiB)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    (tmp_path / "base.raw").unlink()
    with pytest.raises(BackingChainError, match=r"base\.raw"):
        corefmt.open(top)
    with corefmt.open(top, backing=False) as alone:  # the overlay alone still opens
        assert alone.backing is None


def test_backing_loop_and_depth_limit(blockmap, tmp_path):
    make_raw(tmp_path / "b0.rw", 64 * KiB)
    a = make_overlay(tmp_path / "a.bm", "b0.rw", "raw")
    make_overlay(tmp_path / "b.bm", "a.bm", "blockmap")
    make_overlay(tmp_path / "c.bm", "b.bm", "blockmap")
    _point_backing(a, "c.bm")  # a loop: c -> b -> a -> c
    with pytest.raises(BackingChainError, match="loop"):
        corefmt.open(str(tmp_path / "c.bm"))
    with pytest.raises(BackingChainError, match="deeper"):
        open_chain(str(tmp_path / "b.bm"), max_depth=1)


def _point_backing(path: str, target: str, target_format: str = "blockmap") -> None:
    """Rewrite a blockmap header's backing reference in place."""
    import struct

    with open(path, "r+b") as file:
        file.seek(20)
        file.write(struct.pack(">II", len(target), len(target_format)))
        file.write((target + target_format).encode())


def test_recorded_raw_backing_is_not_probed(blockmap, tmp_path):
    # A raw base whose bytes look like a blockmap header must stay raw.
    from corefmt_blockmap.driver import HEADER, MAGIC

    evil = HEADER.pack(MAGIC, 1 << 40, 4096, 0, 0)
    make_raw(tmp_path / "base.raw", 64 * KiB, evil)
    top = make_overlay(tmp_path / "top.bm", "base.raw", "raw")
    with corefmt.open(top) as disk:
        assert disk.backing.format_name == "raw"
        assert disk.read(0, len(evil)) == evil


def test_long_chain_reads_use_cached_status(blockmap, tmp_path, monkeypatch):
    from corefmt_blockmap.driver import BlockMapImage

    make_raw(tmp_path / "l0.raw", 64 * KiB, b"z" * 64 * KiB)
    previous, previous_format = "l0.raw", "raw"
    layers = 300
    for index in range(1, layers + 1):
        make_overlay(tmp_path / f"l{index}.bm", previous, previous_format)
        previous, previous_format = f"l{index}.bm", "blockmap"
    calls = []
    original = BlockMapImage.block_status

    def counting(self, offset, length):
        calls.append(offset)
        return original(self, offset, length)

    monkeypatch.setattr(BlockMapImage, "block_status", counting)
    with corefmt.open(str(tmp_path / previous)) as disk:
        assert len(disk.chain()) == layers + 1
        assert disk.read(0, 64 * KiB) == b"z" * 64 * KiB
        first = len(calls)
        for offset in range(0, 64 * KiB, 4096):
            assert disk.read(offset, 4096) == b"z" * 4096
        # later reads ask only the top layer; the chain below is cached
        assert len(calls) - first == 16
        assert first >= layers


def test_backing_name_with_control_characters_gives_a_one_line_error(blockmap, tmp_path):
    make_raw(tmp_path / "b0.rw", 4 * KiB)
    top = make_overlay(tmp_path / "top.bm", "b0.rw", "raw")
    _point_backing(top, "a\nb\x1b", "raw")
    with pytest.raises(BackingChainError) as caught:
        corefmt.open(top)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "a\\nb\\x1b" in message


def test_last_partial_block_of_an_odd_sized_image_is_writable(blockmap, tmp_path):
    path = str(tmp_path / "odd.bm")
    corefmt.create(path, "blockmap", 1000)
    with corefmt.open(path) as disk:
        assert disk.request_alignment == 512
        disk.write(900, b"t" * 100)  # the aligned block runs past the end
        assert disk.read(890, 110) == bytes(10) + b"t" * 100


def test_a_read_that_waited_for_a_shrinking_truncate_is_refused(tmp_path):
    """A read past the new end, started while a truncate shrinks the image,
    waits for it and then fails as out of range (it must not read zeros
    from beyond the end, or fail as a driver error)."""
    import threading
    import time

    path = tmp_path / "shrink.raw"
    path.write_bytes(b"\x55" * MiB)
    node = corefmt.open(str(path), "raw")
    image = node.layer().image
    real_truncate = image.truncate
    truncating = threading.Event()

    def slow_truncate(size, *args, **kwargs):
        truncating.set()
        time.sleep(0.3)  # the read below starts meanwhile and waits
        return real_truncate(size, *args, **kwargs)

    image.truncate = slow_truncate
    outcome: dict[str, object] = {}

    def read_past_new_end() -> None:
        truncating.wait(5)
        try:
            outcome["data"] = node.read(768 * 1024, 4096)
        except Exception as error:  # the test looks at which
            outcome["error"] = error

    reader = threading.Thread(target=read_past_new_end)
    reader.start()
    node.truncate(512 * 1024)
    reader.join(5)
    node.close()
    assert isinstance(outcome.get("error"), RangeError), outcome

"""blkdebug: errors and power cuts injected at named events, as QEMU's rules say."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from corefmt_raw.driver import RawDriver, RawImage

import corefmt
from corefmt import hookimpl, plugins
from corefmt.block.chain import open_graph
from corefmt.block.imagespec import parse_image_opts
from corefmt.driver import PROBE_NO, ImageContext
from corefmt.errors import OptionError, StorageError
from corefmt.filters.blkdebug import BlkdebugOptions, BlkdebugStorage, InjectErrorRule
from corefmt.storage.base import Storage
from corefmt.storage.simulated import SimStorageDriver
from tests.conftest import fill
from tests.filters.helpers import blkdebug_spec, make_raw

KiB = 1024
SIZE = 64 * KiB
SECTOR = 512
#: The event the test format emits before each write (a qcow2-like table update).
DRIVER_EVENT = "l2_update"


# -- a format that emits its own event ------------------------------------------------
class EventImage(RawImage):
    """raw that names a metadata step before every write, as qcow2 does."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.context.emit(DRIVER_EVENT)
        super().write(offset, data)


class EventRawDriver(RawDriver):
    name = "raw-events"

    def probe(self, head: bytes, path: str | None) -> int:
        return PROBE_NO

    def open(self, storage: Storage, context: ImageContext) -> RawImage:
        return EventImage(storage, context)


class EventFormatPlugin:
    @hookimpl
    def corefmt_register(self, registry) -> None:
        registry.add_format(EventRawDriver())


@pytest.fixture
def event_format() -> Iterator[str]:
    plugin = EventFormatPlugin()
    plugins.register_plugin(plugin)
    yield EventRawDriver.name
    plugins.unregister_plugin(plugin)


@pytest.fixture
def image(tmp_path: Path) -> str:
    """A raw image with data everywhere (holes are not read, so cannot fail)."""
    return make_raw(tmp_path / "disk.raw", SIZE, fill(SIZE, 5))


def debugged(image: str, *rules: dict[str, Any], format: str = "raw", **options: Any):
    spec = blkdebug_spec(image, list(rules), **options)
    spec["driver"] = format
    return open_graph(spec)


@contextlib.contextmanager
def close_fails(node):
    """For a node whose device fails flushes by the end: close still releases
    everything, and reports the failed flush of what was left unflushed."""
    yield node
    with pytest.raises(StorageError):
        node.close()
    assert node.closed


def fails_with(code: int, request: Callable[[], Any], reason: str | None = None
               ) -> StorageError:
    """The StorageError ``request`` raises: its errno, and the reason it gives
    (strerror, as for a real file, unless told otherwise)."""
    with pytest.raises(StorageError) as caught:
        request()
    assert caught.value.errno == code, caught.value
    assert str(caught.value).endswith(f"failed: {reason or os.strerror(code)}")
    return caught.value


# -- events from the core and from drivers -------------------------------------------
CORE_EVENTS = {
    "read_aio": lambda node: node.read(0, SECTOR),
    "write_aio": lambda node: node.write(0, b"w" * SECTOR),
    # a flush with nothing written is skipped (no event), as in qemu
    "flush_to_disk": lambda node: (node.write(0, b"f" * SECTOR), node.flush()),
}


@pytest.mark.parametrize("event", sorted(CORE_EVENTS))
def test_a_core_event_injects_eio_once(image, event):
    request = CORE_EVENTS[event]
    with debugged(image, {"event": event, "once": True}) as node:
        fails_with(errno.EIO, lambda: request(node))
        request(node)
        request(node)
        assert node.storage.errors_injected == 1


@pytest.mark.parametrize("event", sorted(CORE_EVENTS))
def test_a_core_event_without_once_fails_every_time(image, event):
    request = CORE_EVENTS[event]
    node = debugged(image, {"event": event})
    for _ in range(3):
        fails_with(errno.EIO, lambda: request(node))
    if event in ("flush_to_disk", "write_aio"):
        # close flushes what failed writes and flushes may have left unflushed:
        # the rule fails that flush too, and close says so after releasing all
        fails_with(errno.EIO, node.close)
        assert node.closed
    else:
        node.close()  # nothing was written: nothing to flush


@pytest.mark.parametrize("event", sorted(CORE_EVENTS))
def test_a_core_event_injects_enospc(image, event):
    request = CORE_EVENTS[event]
    with debugged(image, {"event": event, "errno": errno.ENOSPC, "once": True}) as node:
        error = fails_with(errno.ENOSPC, lambda: request(node))
        assert "No space left on device" in str(error)
        request(node)


@pytest.mark.parametrize(("once", "code"), [(True, errno.EIO), (False, errno.EIO),
                                            (True, errno.ENOSPC)])
def test_an_event_the_driver_emits_injects(image, event_format, once, code):
    rule = {"event": DRIVER_EVENT, "errno": code, "once": once}
    node = debugged(image, rule, format=event_format)
    node.read(0, SECTOR)  # reads emit no l2_update: nothing is active yet
    fails_with(code, lambda: node.write(0, b"a" * SECTOR))
    if once:
        node.write(0, b"b" * SECTOR)
        assert node.read(0, SECTOR) == b"b" * SECTOR
        node.close()
    else:
        fails_with(code, lambda: node.write(0, b"b" * SECTOR))
        fails_with(code, lambda: node.read(0, SECTOR))  # active rules match any I/O
        fails_with(code, node.close)  # so does the flush of what the writes left


def test_an_event_emitted_on_the_node_injects(image):
    with debugged(image, {"event": DRIVER_EVENT, "once": True}) as node:
        node.read(0, SECTOR)
        node.emit(DRIVER_EVENT)
        fails_with(errno.EIO, lambda: node.read(0, SECTOR))
        node.read(0, SECTOR)


# -- QEMU's rule semantics ------------------------------------------------------------
def test_an_event_replaces_the_active_rules_only_if_it_has_some(image):
    rules = ({"event": "write_aio", "errno": errno.ENOSPC},
             {"event": "read_aio", "once": True})
    with close_fails(debugged(image, *rules)) as node:
        fails_with(errno.ENOSPC, lambda: node.write(0, b"x" * SECTOR))
        fails_with(errno.EIO, lambda: node.read(0, SECTOR))  # read_aio's rule replaced it
        node.read(0, SECTOR)  # once: gone; read_aio has no rules left, nothing is active
        fails_with(errno.ENOSPC, lambda: node.write(0, b"x" * SECTOR))


def test_an_active_rule_stays_active_across_events_without_rules(image):
    with debugged(image, {"event": "write_aio", "iotype": "read"}) as node:
        node.write(0, b"x" * SECTOR)  # not a read: passes, but the rule is now active
        node.flush()  # flush_to_disk has no rules: the write_aio rule stays
        fails_with(errno.EIO, lambda: node.read(0, SECTOR))


def test_sector_limits_the_requests_a_rule_fails(image):
    target = 8  # bytes 4096..4607
    with debugged(image, {"event": "read_aio", "sector": target, "once": True}) as node:
        node.read(0, 4096)
        node.read(4608, 512)
        node.flush()  # a flush covers no sector
        fails_with(errno.EIO, lambda: node.read(4000, 200))
        node.read(4096, 512)


@pytest.mark.parametrize(("iotype", "failing"), [
    ("read", "read"), ("write", "write"), ("flush", "flush"), ("write-zeroes", "zeroes"),
    ("discard", "discard")])
def test_iotype_limits_the_kind_of_request(tmp_path, iotype, failing):
    image = make_raw(tmp_path / "disk.raw", SIZE, fill(SIZE, 6))
    requests = {
        "read": lambda node: node.read(0, SECTOR),
        "write": lambda node: node.write(0, b"w" * SECTOR),
        "flush": lambda node: node.flush(),
        "zeroes": lambda node: node.write_zeroes(0, 4096),
        "discard": lambda node: node.discard(0, 4096),
    }
    node = debugged(image, {"event": DRIVER_EVENT, "iotype": iotype})
    node.emit(DRIVER_EVENT)
    for name, request in requests.items():
        if name == failing:
            fails_with(errno.EIO, lambda: request(node))  # noqa: B023 - called now
        else:
            request(node)
    if failing == "flush":
        fails_with(errno.EIO, node.close)  # close's flush of what is unflushed fails too
    else:
        node.close()


def test_block_status_is_checked_only_when_asked_for(image):
    with debugged(image, {"event": DRIVER_EVENT, "iotype": "block-status"}) as node:
        node.emit(DRIVER_EVENT)
        node.storage.readinto(0, bytearray(SECTOR))
        fails_with(errno.EIO, lambda: node.storage.data_run(0, SECTOR))


def test_set_state_makes_the_second_write_fail(image):
    """docs/devel/blkdebug.txt's example: match the 2nd write_aio, not the 1st."""
    with close_fails(debugged(image, {"event": "write_aio", "state": 2, "errno": 5},
                              **{"set-state": [{"event": "write_aio", "state": 1,
                                                "new_state": 2}]})) as node:
        node.write(0, b"1" * SECTOR)
        assert node.storage.state == 2
        fails_with(errno.EIO, lambda: node.write(0, b"2" * SECTOR))


def test_errno_zero_injects_nothing(image):
    with debugged(image, {"event": "read_aio", "errno": 0}) as node:
        node.read(0, SECTOR)
        node.read(0, SECTOR)


# -- options: json, --image-opts, config files ----------------------------------------
def test_image_opts_rules_are_converted_from_strings(image):
    text = ("driver=raw,file.driver=blkdebug,"
            "file.inject-error.0.event=read_aio,file.inject-error.0.errno=28,"
            "file.inject-error.0.once=on,file.inject-error.0.sector=-1,"
            "file.inject-error.1.event=write_aio,file.inject-error.1.immediately=off,"
            "file.inject-error.1.iotype=write,file.inject-error.1.state=0,"
            f"file.image.filename={image}")
    with open_graph(parse_image_opts(text)) as node:
        storage = node.storage
        assert isinstance(storage, BlkdebugStorage)
        first, second = storage._rules
        assert (first.event, first.errno, first.once, first.sector) == ("read_aio", 28, True, -1)
        assert (second.event, second.iotype, second.immediately) == ("write_aio", "write", False)
        fails_with(errno.ENOSPC, lambda: node.read(0, SECTOR))
        node.read(0, SECTOR)


def test_one_rule_may_be_given_without_a_list(image):
    text = (f"driver=raw,file.driver=blkdebug,file.inject-error.event=read_aio,"
            f"file.inject-error.once=yes,file.image.filename={image}")
    with open_graph(parse_image_opts(text)) as node:
        fails_with(errno.EIO, lambda: node.read(0, SECTOR))
        node.read(0, SECTOR)


def test_rules_may_be_given_as_objects():
    options = BlkdebugOptions(
        inject_error=[InjectErrorRule("read_aio", once=True)])
    assert options.inject_error[0].once


def test_a_qemu_config_file_adds_rules_before_the_given_ones(image, tmp_path):
    config = tmp_path / "blkdebug.conf"
    config.write_text('# fail the second read\n'
                      '[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n\n'
                      '[inject-error]\nevent = "read_aio"\nstate = "2"\nerrno = "28"\n'
                      'once = "on"\n')
    with debugged(image, {"event": "write_aio", "once": True}, config=str(config)) as node:
        node.read(0, SECTOR)
        fails_with(errno.ENOSPC, lambda: node.read(0, SECTOR))
        node.read(0, SECTOR)
        fails_with(errno.EIO, lambda: node.write(0, b"x" * SECTOR))


@pytest.mark.parametrize(("rule", "options", "message"), [
    ({"event": "read_aio", "colour": "red"}, {}, "Invalid parameter 'inject-error.0.colour'"),
    ({"event": "read_aio", "errno": "abc"}, {}, "'inject-error.0.errno' expects a number"),
    ({"event": "read_aio", "once": "maybe"}, {}, "'inject-error.0.once' expects 'on' or 'off'"),
    ({"event": "read_aio", "iotype": "write_zeroes"}, {}, "does not accept value"),
    ({"event": "read_aio", "action": "explode"}, {}, "does not accept value 'explode'"),
    ({"errno": 5}, {}, "Missing event name for rule inject-error.0"),
    ({"event": "read_aio", "sector": -2}, {}, "must be -1"),
    ({"event": "read_aio"}, {"align": 3}, "align must be integer power of 2"),
    ({"event": "read_aio"}, {"config": "/no/such/blkdebug.conf"},
     "Could not read blkdebug config file: No such file or directory"),
    ({"event": "read_aio"}, {"set-state": [{"event": "read_aio"}]}, "new_state' is missing"),
    ({"event": "read_aio"}, {"size": 1}, "does not support the option 'size'"),
])
def test_bad_rules_are_refused(image, rule, options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        debugged(image, rule, **options)


def test_a_malformed_config_file_is_refused(image, tmp_path):
    config = tmp_path / "bad.conf"
    config.write_text('[inject-error]\nevent = read_aio\n')
    with pytest.raises(OptionError, match=re.escape("bad.conf:2: Could not parse blkdebug config")):
        debugged(image, config=str(config))
    config.write_text('[no-such-group]\n')
    with pytest.raises(OptionError, match="There is no option group 'no-such-group'"):
        debugged(image, config=str(config))


def test_align_sets_the_files_request_alignment(image):
    with debugged(image, align=4096) as node:
        assert node.storage.request_alignment == 4096
        node.write(100, b"unaligned")
        assert node.read(100, 9) == b"unaligned"


# -- power cuts ---------------------------------------------------------------------------
POWERCUT_SEEDS = range(16)
#: What a simulated disk without power answers.
SIM_DEAD = "simulated device lost power"


@pytest.fixture
def sim() -> SimStorageDriver:
    driver = plugins.registry().storages["sim"]
    assert isinstance(driver, SimStorageDriver)
    return driver


def test_a_power_cut_at_an_event_loses_unflushed_writes_on_a_sim_disk(sim):
    """Cut at the second flush: the first flush's data always survives; the
    writes since then survive or not, as a volatile cache decides."""
    outcomes = set()
    for seed in POWERCUT_SEEDS:
        path = f"sim:blkdebug-cut-{seed}"
        corefmt.create(path, "raw", SIZE)
        rules = [{"event": "flush_to_disk", "state": 2, "action": "powercut", "seed": seed}]
        spec = {"driver": "raw", "file": {
            "driver": "blkdebug", "inject-error": rules, "image": {"filename": path},
            "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]}}
        with close_fails(open_graph(spec)) as node:
            node.write(0, b"A" * SECTOR)
            node.flush()  # state 1 -> 2: no cut yet
            node.write(SECTOR, b"B" * SECTOR)
            node.write(2 * SECTOR, b"C" * SECTOR)
            fails_with(errno.EIO, node.flush, SIM_DEAD)  # the cut comes before the flush
            fails_with(errno.EIO, lambda: node.read(0, SECTOR), SIM_DEAD)  # the disk is gone
        survived = bytes(sim.disk(path).crash_image)
        assert survived[:SECTOR] == b"A" * SECTOR
        outcomes.add((survived[SECTOR:SECTOR + 1], survived[2 * SECTOR:2 * SECTOR + 1]))
        sim.forget(path)
    lost = [outcome for outcome in outcomes if outcome != (b"B", b"C")]
    assert lost, "no seed lost an unflushed write"
    assert (b"B", b"C") in outcomes, "no seed kept both unflushed writes"


def test_a_power_cut_over_a_file_stops_every_request(image):
    before = Path(image).read_bytes()
    with close_fails(debugged(image, {"event": DRIVER_EVENT, "action": "powercut"})) as node:
        node.write(0, b"kept" * 128)
        node.emit(DRIVER_EVENT)
        fails_with(errno.EIO, lambda: node.write(SECTOR, b"lost" * 128))
        fails_with(errno.EIO, lambda: node.read(0, SECTOR))
        fails_with(errno.EIO, node.flush)
        fails_with(errno.EIO, lambda: node.storage.truncate(SIZE * 2))
        assert node.storage.size() == SIZE  # asking changes nothing
    after = Path(image).read_bytes()
    assert after[:SECTOR] == b"kept" * 128
    assert after[SECTOR:] == before[SECTOR:]


def test_nested_blkdebug_passes_the_power_cut_down(sim):
    path = "sim:blkdebug-nested"
    corefmt.create(path, "raw", SIZE)
    inner = {"driver": "blkdebug", "image": {"filename": path}}
    spec = {"driver": "raw", "file": {
        "driver": "blkdebug", "image": inner,
        "inject-error": [{"event": DRIVER_EVENT, "action": "powercut"}]}}
    with open_graph(spec) as node:
        node.emit(DRIVER_EVENT)
        fails_with(errno.EIO, lambda: node.read(0, SECTOR), SIM_DEAD)
        assert sim.disk(path).dead
    sim.forget(path)

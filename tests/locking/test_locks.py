"""Image locks without qemu: the bytes each open holds (qemu's, as measured
on qemu-io 7.2), corefmt against corefmt in another process, release on
close, reopen, backing files, -U, locking=off, and create/convert targets."""

from __future__ import annotations

import gc
import hashlib
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from corefmt.block.chain import open_chain
from corefmt.errors import OptionError
from corefmt.ops import convert as convert_module
from corefmt.ops.convert import convert
from corefmt.ops.create import create
from corefmt.storage.locking import ImageLockError
from tests.locking.helpers import ENV, KINDS, MODES, in_use, locked_bytes, refusal, try_open
from tests.locking.holder import LOCKMETA, open_image

#: The bytes qemu-io 7.2 holds (perm bytes 100+bit, unshared bytes 200+bit).
RAW_RO, RAW_RW = {100}, {100, 101}
META_RO, META_RW = {100, 201, 203}, {100, 101, 103, 201, 203}
FORCE_SHARED = {100}
WINDOW_RO, WINDOW_RW = {100, 203}, {100, 101, 203}
#: qemu-img create/convert's lock on a target before it truncates it.
CREATING = {101, 103, 203}
#: Two qemu-io processes on one image (holder, tryer) -> refusal; others open.
REFUSED = {
    ("raw/rw", "meta/ro"): 'Failed to get shared "write" lock',
    ("raw/rw", "meta/rw"): 'Failed to get shared "write" lock',
    ("meta/ro", "raw/rw"): 'Failed to get "write" lock',
    ("meta/ro", "meta/rw"): 'Failed to get "write" lock',
    ("meta/rw", "raw/rw"): 'Failed to get "write" lock',
    ("meta/rw", "meta/ro"): 'Failed to get shared "write" lock',
    ("meta/rw", "meta/rw"): 'Failed to get "write" lock',
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("format", "mode", "expected"), [
    ("raw", "ro", RAW_RO), ("raw", "rw", RAW_RW), ("raw", "U", FORCE_SHARED),
    (LOCKMETA, "ro", META_RO), (LOCKMETA, "rw", META_RW), (LOCKMETA, "U", FORCE_SHARED),
])
def test_an_open_image_holds_qemus_bytes_until_closed(image, registry, format, mode,
                                                      expected):
    node = open_image(str(image), format, mode, registry)
    try:
        assert locked_bytes(image) == expected
    finally:
        node.close()
    assert locked_bytes(image) == set()


@pytest.mark.parametrize(("read_only", "expected"), [(True, WINDOW_RO), (False, WINDOW_RW)])
def test_a_raw_window_does_not_share_resize(image, read_only, expected):
    spec = {"driver": "raw", "offset": 512, "file": {"driver": "file", "filename": str(image)}}
    with open_chain(spec, read_only=read_only):
        assert locked_bytes(image) == expected


@pytest.mark.parametrize("holder_kind", KINDS)
@pytest.mark.parametrize("holder_mode", MODES)
def test_corefmt_refuses_corefmt_as_qemu_refuses_qemu(image, registry, corefmt_holder,
                                                      holder_kind, holder_mode):
    holder = f"{holder_kind}/{holder_mode}"
    with corefmt_holder.holding(image, KINDS[holder_kind], holder_mode):
        got = {f"{kind}/{mode}": try_open(image, kind, mode, registry)
               for kind in KINDS for mode in MODES}
    expected = {tryer: REFUSED.get((holder, tryer)) for tryer in got}
    assert {tryer: refusal(message) for tryer, message in got.items()} == expected
    for tryer, message in got.items():
        if message is not None:
            assert message == in_use(image, expected[tryer])


def test_a_closed_image_lets_others_in_while_its_process_lives(image, registry,
                                                               corefmt_holder):
    assert corefmt_holder.ask(f"open {image} {LOCKMETA} rw") == "ok"
    try:
        assert try_open(image, "meta", "ro", registry) is not None
    finally:
        assert corefmt_holder.ask("close") == "ok"
    assert try_open(image, "meta", "ro", registry) is None
    assert locked_bytes(image) == set()


def test_reopen_switches_the_locks_and_never_lets_go(image, registry, monkeypatch):
    node = open_image(str(image), LOCKMETA, "ro", registry)
    seen_while_closed: list[set[int]] = []
    close_for_reopen = node._close_image_for_reopen

    def close_and_look() -> None:
        close_for_reopen()
        seen_while_closed.append(locked_bytes(image))

    monkeypatch.setattr(node, "_close_image_for_reopen", close_and_look)
    try:
        assert locked_bytes(image) == META_RO
        node.reopen(False)
        assert locked_bytes(image) == META_RW
        node.reopen(True)
        assert locked_bytes(image) == META_RO
    finally:
        node.close()
    assert locked_bytes(image) == set()
    # While the storage was closed, the old mode and the new were both held.
    assert seen_while_closed == [META_RW, META_RW]


def test_a_refused_reopen_changes_nothing(image, registry, corefmt_holder):
    node = open_image(str(image), LOCKMETA, "ro", registry)
    try:
        with corefmt_holder.holding(image, LOCKMETA, "ro"):
            with pytest.raises(ImageLockError) as refused:
                node.reopen(False)
            assert str(refused.value) == in_use(image, 'Failed to get "write" lock')
            assert node.read_only
            assert node.read(0, 512) == image.read_bytes()[:512]
        assert locked_bytes(image) == META_RO  # ours, as before
        node.reopen(False)  # the other process has gone
        assert locked_bytes(image) == META_RW
    finally:
        node.close()


@pytest.mark.parametrize(("format", "expected"), [("raw", RAW_RO), (LOCKMETA, META_RO)])
def test_a_backing_file_takes_read_only_locks(tmp_path, image, registry, format, expected):
    below = tmp_path / "below.img"
    below.write_bytes(bytes(1024 * 1024))
    spec = {"driver": LOCKMETA, "file": {"driver": "file", "filename": str(image)},
            "backing": {"driver": format, "file": {"driver": "file", "filename": str(below)}}}
    with open_chain(spec, read_only=False, registry=registry):
        assert locked_bytes(image) == META_RW
        assert locked_bytes(below) == expected
    assert locked_bytes(below) == set()


def test_force_share_is_for_read_only_use(image, registry):
    path = str(image)
    with open_chain(path, LOCKMETA, read_only=True, force_share=True, registry=registry):
        assert locked_bytes(image) == FORCE_SHARED
    spec = {"driver": LOCKMETA, "file": {"driver": "file", "filename": path,
                                         "force-share": "on"}}
    with open_chain(spec, read_only=True, registry=registry):
        assert locked_bytes(image) == FORCE_SHARED
    message = "force-share=on can only be used with read-only images"
    with pytest.raises(OptionError, match=message):
        open_chain(path, LOCKMETA, read_only=False, force_share=True, registry=registry)
    with pytest.raises(OptionError, match=message):
        open_chain(spec, read_only=False, registry=registry)
    assert locked_bytes(image) == set()


def test_locking_off_takes_no_locks(image, registry):
    spec = {"driver": LOCKMETA, "file": {"driver": "file", "filename": str(image),
                                         "locking": "off"}}
    with open_chain(spec, read_only=False, registry=registry):
        assert locked_bytes(image) == set()


def test_a_storage_filter_over_the_file_keeps_the_locks(image, registry):
    spec = {"driver": LOCKMETA, "file": {"driver": "blkdebug", "image": {
        "driver": "file", "filename": str(image)}}}
    with open_chain(spec, read_only=False, registry=registry):
        assert locked_bytes(image) == META_RW


@pytest.mark.parametrize("operation", ["create", "convert", "cli convert"])
def test_a_target_in_use_is_refused_before_it_is_truncated(tmp_path, image, corefmt_holder,
                                                           operation):
    source = tmp_path / "small.raw"
    source.write_bytes(b"\x5a" * 3 * 1024 * 1024)
    size, before = image.stat().st_size, digest(image)
    expected = in_use(image, 'Failed to get "write" lock', opening=False)
    with corefmt_holder.holding(image, LOCKMETA, "rw"):
        if operation == "cli convert":
            result = subprocess.run([sys.executable, "-m", "corefmt.cli.main", "convert",
                                     "-O", "raw", str(source), str(image)],
                                    capture_output=True, text=True, env=ENV)
            assert (result.returncode, result.stderr) == (1, f"corefmt: {expected}\n")
        else:
            with pytest.raises(ImageLockError) as refused:
                if operation == "create":
                    create(str(image), "raw", 1024 * 1024)
                else:
                    convert(str(source), str(image))
            assert str(refused.value) == expected
        assert (image.stat().st_size, digest(image)) == (size, before)
    convert(str(source), str(image))  # nobody holds it now
    assert image.read_bytes() == source.read_bytes()
    assert locked_bytes(image) == set()


def test_convert_holds_the_target_from_create_until_it_is_open(tmp_path, image, monkeypatch):
    source = tmp_path / "small.raw"
    source.write_bytes(b"\x5a" * 1024 * 1024)
    seen: list[set[int]] = []
    real_open_chain = convert_module.open_chain

    def open_and_look(path, *args, **kwargs):
        if path == str(image):
            seen.append(locked_bytes(image))
        return real_open_chain(path, *args, **kwargs)

    monkeypatch.setattr(convert_module, "open_chain", open_and_look)
    convert(str(source), str(image))
    assert seen == [CREATING]
    assert locked_bytes(image) == set()


def test_a_closed_image_leaves_nothing_behind(image, registry):
    node = open_image(str(image), LOCKMETA, "rw", registry)
    storage = weakref.ref(node.storage)
    node.close()
    del node
    gc.collect()
    assert storage() is None  # the lock registry does not keep storages alive

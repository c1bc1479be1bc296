"""Image locks against the real qemu: corefmt takes the bytes qemu-io takes,
every pairing of {ro, rw, -U} x {raw, a format with metadata} between
corefmt and qemu-io ends as it does between two qemu-io processes, and a
convert onto an image a qemu process writes is refused and changes nothing.

The image is qcow2: qemu-io opens it as qcow2 (a format with metadata) or
raw; corefmt as lockmeta (raw's bytes, a metadata format's locks) or raw."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from corefmt.block.chain import open_chain
from tests.locking.helpers import (
    ENV,
    MODES,
    QEMU_IMG,
    QEMU_NBD,
    in_use,
    locked_bytes,
    nbd_holding,
    qemu_args,
    qemu_holding,
    qemu_try,
    refusal,
    try_open,
)
from tests.locking.helpers import KINDS as COREFMT_FORMATS
from tests.locking.holder import LOCKMETA, open_image

pytestmark = pytest.mark.interop

#: qemu's format for each kind of format (corefmt's: COREFMT_FORMATS).
QEMU_FORMATS = {"raw": "raw", "meta": "qcow2"}
TRYERS = [(kind, mode) for kind in QEMU_FORMATS for mode in MODES]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corefmt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corefmt.cli.main", *args],
                          capture_output=True, text=True, env=ENV)


@pytest.mark.parametrize("kind", QEMU_FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_corefmt_takes_the_bytes_qemu_io_takes(image, registry, kind, mode):
    corefmt_format, qemu_format = COREFMT_FORMATS[kind], QEMU_FORMATS[kind]
    with qemu_holding(image, qemu_args(image, qemu_format, mode)):
        qemus = locked_bytes(image)
    node = open_image(str(image), corefmt_format, mode, registry)
    try:
        assert locked_bytes(image) == qemus
    finally:
        node.close()


@pytest.mark.parametrize("read_only", [True, False])
def test_a_raw_window_takes_the_bytes_qemu_io_takes(image, read_only):
    options = f"driver=raw,offset=512,file.driver=file,file.filename={image}"
    with qemu_holding(image, [*(["-r"] if read_only else []), "--image-opts", options]):
        qemus = locked_bytes(image)
    spec = {"driver": "raw", "offset": 512, "file": {"driver": "file", "filename": str(image)}}
    with open_chain(spec, read_only=read_only):
        assert locked_bytes(image) == qemus


@pytest.mark.parametrize("holder_kind", QEMU_FORMATS)
@pytest.mark.parametrize("holder_mode", MODES)
def test_every_pairing_ends_as_between_two_qemu_io(image, registry, corefmt_holder,
                                                   holder_kind, holder_mode):
    holder_corefmt = COREFMT_FORMATS[holder_kind]
    holder_qemu = QEMU_FORMATS[holder_kind]
    # The reference: qemu-io holding, qemu-io trying; and corefmt trying.
    with qemu_holding(image, qemu_args(image, holder_qemu, holder_mode)):
        reference = {(kind, mode): qemu_try(image, QEMU_FORMATS[kind], mode)
                     for kind, mode in TRYERS}
        corefmt_tries = {(kind, mode): try_open(image, kind, mode, registry)
                         for kind, mode in TRYERS}
    # corefmt holding, qemu-io trying: qemu-io must say exactly what it said.
    with corefmt_holder.holding(image, holder_corefmt, holder_mode):
        qemu_tries = {(kind, mode): qemu_try(image, QEMU_FORMATS[kind], mode)
                      for kind, mode in TRYERS}
    assert qemu_tries == reference
    expected = {tryer: refusal(stderr) if status else None
                for tryer, (status, stderr) in reference.items()}
    assert {tryer: refusal(message) for tryer, message in corefmt_tries.items()} == expected
    for tryer, message in corefmt_tries.items():
        if message is not None:
            assert message == in_use(image, expected[tryer])
    if (holder_kind, holder_mode) == ("meta", "rw"):  # the reference is not all "ok"
        assert expected[("meta", "ro")] == 'Failed to get shared "write" lock'


@pytest.mark.parametrize(("arguments", "refused"), [
    (["-f", "raw"], 'Failed to get "write" lock'),
    (["-r", "-U", "-f", "raw"], None),
    (["-U", "-f", "raw"], "force-share=on can only be used with read-only images"),
])
def test_corefmt_io_says_so_in_one_line(image, arguments, refused):
    with qemu_holding(image, qemu_args(image, "qcow2", "rw")):
        result = corefmt_cli("io", *arguments, "-c", "read 0 512", str(image))
    if refused is None:
        assert (result.returncode, result.stderr) == (0, "")
    elif refused.startswith("Failed"):
        assert (result.returncode, result.stderr) == (1, f"corefmt: {in_use(image, refused)}\n")
    else:
        assert (result.returncode, result.stderr) == (1, f"corefmt: {refused}\n")


def test_qemu_io_refuses_an_image_corefmt_reopened(image, corefmt_holder):
    assert corefmt_holder.ask(f"open {image} {LOCKMETA} ro") == "ok"
    try:
        assert qemu_try(image, "qcow2", "ro")[0] == 0
        assert corefmt_holder.ask("reopen rw") == "ok"
        status, stderr = qemu_try(image, "qcow2", "ro")
        assert (status, refusal(stderr)) == (1, 'Failed to get shared "write" lock')
        assert corefmt_holder.ask("reopen ro") == "ok"
        assert qemu_try(image, "qcow2", "ro")[0] == 0
        with qemu_holding(image, qemu_args(image, "qcow2", "ro")):
            answer = corefmt_holder.ask("reopen rw")
        assert answer == "error: " + in_use(image, 'Failed to get "write" lock')
    finally:
        assert corefmt_holder.ask("close") == "ok"
    assert qemu_try(image, "qcow2", "rw")[0] == 0


HOLDERS = {
    "qemu-io qcow2 rw": ("qcow2", "rw", 'Failed to get "write" lock'),
    "qemu-io qcow2 ro": ("qcow2", "ro", 'Failed to get "write" lock'),
    "qemu-nbd raw rw": ("nbd", "rw", 'Failed to get "resize" lock'),
    "qemu-io raw rw": ("raw", "rw", None),  # shares everything: qemu-img converts too
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_convert_onto_an_image_qemu_holds_ends_as_qemu_img_convert(tmp_path, image, holder):
    qemu_format, mode, refused = HOLDERS[holder]
    if qemu_format == "nbd" and not QEMU_NBD:
        pytest.skip("qemu-nbd not installed")
    assert QEMU_IMG is not None
    source = tmp_path / "small.raw"
    source.write_bytes(b"\x5a" * 3 * 1024 * 1024)
    size, before = image.stat().st_size, digest(image)
    holding = (nbd_holding(image, tmp_path / "nbd.sock") if qemu_format == "nbd"
               else qemu_holding(image, qemu_args(image, qemu_format, mode)))
    with holding:
        result = corefmt_cli("convert", "-O", "raw", str(source), str(image))
        changed = (image.stat().st_size, digest(image)) != (size, before)
        qemu_img = subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(source), str(image)],
                                  capture_output=True, text=True, env=ENV)
    if refused is None:
        assert (result.returncode, qemu_img.returncode) == (0, 0)
        assert image.read_bytes() == source.read_bytes()
        return
    message = in_use(image, refused, opening=False)
    assert (result.returncode, result.stderr) == (1, f"corefmt: {message}\n")
    assert not changed
    assert (qemu_img.returncode, refusal(qemu_img.stderr)) == (1, refused)
    assert (image.stat().st_size, digest(image)) == (size, before)

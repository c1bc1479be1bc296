"""corefmt snapshot as a user runs it, next to qemu-img snapshot: output,
the first line of errors, exit statuses."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


def _first_error(text: str) -> str:
    return text.splitlines()[0].split(": ", 1)[1] if text else ""


@pytest.fixture
def image(qemu_img, qemu_io):
    assert qemu_img("create", "-q", "-f", "qcow2", "disk.qcow2", "1M").returncode == 0
    assert qemu_io("-c", "write -P 1 0 64k", "disk.qcow2").returncode == 0
    assert qemu_img("snapshot", "-c", "base", "disk.qcow2").returncode == 0
    return "disk.qcow2"


def test_the_verb_answers_as_qemu_img(corefmt, qemu_img, image):
    cases = [["-l", image], ["-q", "-l", image], [image],  # no action lists
             ["-c", "two", image], ["-l", image], ["-a", "base", image], ["-d", "two", image],
             ["-a", "nope", image], ["-d", "nope", image], ["-l", "-c", "x", image],
             ["-c", "x", "-d", "y", image], ["-l"], ["-l", image, image]]
    for args in cases:
        ours, theirs = corefmt("snapshot", *args), qemu_img("snapshot", *args)
        assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout, args
        assert _first_error(ours.stderr) == _first_error(theirs.stderr), args
    assert qemu_img("check", image).returncode == 0


def test_read_only_verbs_take_force_share(corefmt, image):
    listed = corefmt("snapshot", "-U", "-l", image)
    assert listed.returncode == 0 and "base" in listed.stdout
    refused = corefmt("snapshot", "-U", "-c", "x", image)
    assert refused.returncode == 1
    assert "force-share=on can only be used with read-only images" in refused.stderr

"""Credentials in names are left out wherever a name is shown or recorded."""

from __future__ import annotations

import pytest

from corefmt.credentials import without_credentials


@pytest.mark.parametrize(("name", "shown"), [
    ("http://alice:s3cret@host/dir/x.qcow2", "http://host/dir/x.qcow2"),
    ("https://alice@host:8443/x", "https://host:8443/x"),
    ("http://host/x@y", "http://host/x@y"),  # an @ in the path is not userinfo
    ("/tmp/odd@name.raw", "/tmp/odd@name.raw"),
    ("relative/a@b", "relative/a@b"),
    ('json:{"driver":"qcow2","file":{"driver":"http","url":"http://u:pw@h/x"}}',
     'json:{"driver":"qcow2","file":{"driver":"http","url":"http://h/x"}}'),
    ('json:{"file":"/tmp/a@b"}', 'json:{"file":"/tmp/a@b"}'),
])
def test_without_credentials(name: str, shown: str):
    assert without_credentials(name) == shown

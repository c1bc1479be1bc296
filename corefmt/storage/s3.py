"""The ``s3`` storage driver: read-only images in an S3-compatible object store.

``s3://BUCKET/KEY`` is read exactly as an ``https://`` object (the same
connection pool, ranged GETs, readahead, retries and identity checks of
``corefmt.storage.http``), through URLs presigned with SigV4. botocore
supplies what a user of the AWS tools expects to just work: the credential
chain (environment, shared credentials and config files, profiles, SSO,
instance metadata), the region, ``AWS_ENDPOINT_URL`` and the addressing
style. It only signs: no request goes through it, so the data path is the
one measured for http. With no credentials anywhere, requests go unsigned,
as ``aws --no-sign-request`` (public buckets).

Presigned URLs carry the access key id and a signature: they never leave
the ``Target`` (messages, node names and ``info`` show ``s3://BUCKET/KEY``).
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from typing import Any

from corefmt import sync
from corefmt.credentials import without_credentials
from corefmt.errors import CorefmtError
from corefmt.storage.http import HttpSettings, RangedStorageDriver, Target

SCHEME = "s3"
PREFIX = f"{SCHEME}://"
#: A presigned URL stays valid this long...
PRESIGN_SECONDS = 3600
#: ...and is renewed when this old (temporary credentials renew sooner
#: than they expire, so a URL signed with them is renewed in time too).
RENEW_SECONDS = 600
#: What S3 and its clones accept as a bucket name: 3 to 63 characters (the
#: old us-east-1 rule's capitals and underscores too).
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,62}$")
#: botocore's operation for each HTTP method the reader sends.
OPERATIONS = {"GET": "get_object", "HEAD": "head_object"}


def parse(path: str) -> tuple[str, str]:
    """``s3://bucket/key`` as (bucket, key); anything else is refused."""
    shown = without_credentials(path)
    if not path.startswith(PREFIX):
        raise CorefmtError(f"'{shown}' is not an s3:// name")
    bucket, _, key = path[len(PREFIX):].partition("/")
    if not BUCKET_NAME.match(bucket) or not key:
        raise CorefmtError(f"'{shown}' is not an s3://BUCKET/KEY name")
    return bucket, key


#: urllib3 logs each request's path and query at DEBUG: a presigned one
#: carries the access key id and a signature.
URLLIB3_LOGGER = "urllib3.connectionpool"
PRESIGNED_QUERY = re.compile(r"\?[^ \"]*X-Amz-[^ \"]*")


class _PresignedQueryFilter(logging.Filter):
    """Keeps presigned queries out of urllib3's log lines (an API user who
    turns on debug logging must not capture keys)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any("X-Amz-" in str(arg) for arg in record.args):
            record.args = tuple(PRESIGNED_QUERY.sub("?(presigned)", str(arg))
                                if isinstance(arg, str) else arg for arg in record.args)
        return True


_QUERY_FILTER = _PresignedQueryFilter()


class _Signer:
    """A botocore S3 client used only to presign, made on first use (its
    import and set-up cost a tenth of a second)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._lock = sync.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    @staticmethod
    def _make() -> Any:
        try:
            import botocore.session
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError:  # pragma: no cover - botocore is a dependency
            raise CorefmtError("s3:// storage needs botocore (pip install botocore)") from None
        session = botocore.session.get_session()
        try:
            signed = session.get_credentials() is not None
            config = Config(signature_version="s3v4" if signed else UNSIGNED)
            return session.create_client("s3", config=config)
        except Exception as error:  # botocore's config errors: a bad profile, region
            raise CorefmtError(f"s3:// storage: {error}") from None

    def presign(self, method: str, bucket: str, key: str) -> str:
        client = self.client()
        try:
            return client.generate_presigned_url(
                OPERATIONS[method], Params={"Bucket": bucket, "Key": key},
                ExpiresIn=PRESIGN_SECONDS, HttpMethod=method)
        except Exception as error:  # botocore's: credentials that failed to refresh, ...
            raise CorefmtError(f"{PREFIX}{bucket}/{key}: signing the request failed: "
                               f"{error}") from None


class S3Target(Target):
    """An object reached by presigned URLs, one per method, renewed before
    they expire; shown as its ``s3://`` name. A redirect (S3's answer for a
    bucket in another region) is an error, not followed: the signature is
    for this endpoint only."""

    follows_redirects = False

    def __init__(self, bucket: str, key: str, signer: _Signer):
        super().__init__(url=f"{PREFIX}{bucket}/{key}", shown=f"{PREFIX}{bucket}/{key}")
        self.bucket, self.key = bucket, key
        self._signer = signer
        self._signed: dict[str, tuple[float, str]] = {}
        self._lock = sync.Lock()

    def wire(self, method: str) -> str:
        now = time.time()  # wall time: a URL expires by it, suspended or not
        with self._lock:
            signed = self._signed.get(method)
            if signed is None or now - signed[0] > RENEW_SECONDS:
                signed = (now, self._signer.presign(method, self.bucket, self.key))
                self._signed[method] = signed
            return signed[1]


class S3StorageDriver(RangedStorageDriver):
    """``s3://BUCKET/KEY``, read-only."""

    name = SCHEME
    prefix = PREFIX

    def __init__(self, settings: HttpSettings | None = None):
        super().__init__(settings)
        self._signer = _Signer()
        logger = logging.getLogger(URLLIB3_LOGGER)
        if _QUERY_FILTER not in logger.filters:
            logger.addFilter(_QUERY_FILTER)

    def target(self, path: str) -> Target:
        bucket, key = parse(path)
        return S3Target(bucket, key, self._signer)

    def is_sibling(self, path: str, holder: str) -> bool:
        """The same bucket."""
        try:
            return parse(path)[0] == parse(holder)[0]
        except CorefmtError:
            return False

    def resolve(self, path: str, relative_to: str | None) -> str:
        """A relative name in a remote image is a key beside it in the same
        bucket; one climbing out of the bucket is refused."""
        if "://" in path or not relative_to or not relative_to.startswith(PREFIX):
            return path
        bucket, key = parse(relative_to)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), path))
        if joined == "." or joined.startswith(("../", "/")) or joined == "..":
            raise CorefmtError(f"{relative_to}: backing file name '{path}' leads out of "
                               f"the bucket '{bucket}'")
        return f"{PREFIX}{bucket}/{joined}"

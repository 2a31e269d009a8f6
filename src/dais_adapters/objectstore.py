"""Object storage: ``s3://bucket/key`` in S3 or any S3-compatible store.

A staged copy is a multipart upload written through smart-open: staging
creates the upload, writing streams it part by part, and nothing is visible
until commit completes the upload, when the store makes the whole object
appear at once. Abort aborts the upload, so it is never completed.

Commit first copies the object it replaces, server-side, to a backup key
under the reserved ``.dais-staging/`` prefix of the same bucket; rollback
copies the backup back (or deletes the new object when there was none) and
release deletes the backup.

smart-open completes an upload in ``close()``, and :class:`io.IOBase` calls
``close()`` when a writer is garbage-collected: a staged copy that is simply
dropped (its thread died) would publish whatever part of the file it held.
Two guards stop that. The writer talks to S3 through a
:class:`_CompletionGate`, which refuses to complete an upload until commit
opens it; and a finalizer aborts the upload of a dropped copy, so that it
leaves no parts behind either.

The boto3 client is built at the first stage, from the standard AWS
environment and files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``~/.aws/config``, ...), so a deployment without S3 starts
without reading any of them. boto3 itself is the optional ``s3`` extra:
without it the hook serves nothing and ``s3://`` locations are refused as an
unknown scheme.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

import attrs
import smart_open
import smart_open.s3

from dais_adapters.hooks import StorageContext, hookimpl
from dais_core.errors import PublishFailed
from dais_core.ports import Storage
from dais_core.rules import Location

__all__ = [
    "SCHEME",
    "STAGING_PREFIX",
    "ObjectStorage",
    "ObjectStoreOptions",
    "default_client",
]

log = logging.getLogger(__name__)

SCHEME = "s3"
STAGING_PREFIX = ".dais-staging/"
_MIB = 1024 * 1024
_COPY_OBJECT_LIMIT = 5 * 1024 * _MIB


@attrs.frozen
class ObjectStoreOptions:
    """How the ``s3`` storage writes and cleans up."""

    #: Bytes per multipart part. The writer holds one part in memory per
    #: upload; smart-open clamps the value to S3's 5 MiB to 5 GiB, and S3
    #: allows 10,000 parts, so 16 MiB carries objects up to 156 GiB.
    part_size: int = 16 * _MIB
    #: Buckets whose stale backups :meth:`ObjectStorage.sweep` removes.
    sweep_buckets: tuple[str, ...] = ()
    #: Seconds after which a backup under ``.dais-staging/`` is stale: well
    #: past the longest request, so no live commit still needs it.
    stale_after: float = 3600.0


class _Writer(Protocol):
    """The part of smart-open's S3 writer that a staged copy uses."""

    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...

    def terminate(self) -> None: ...


@functools.cache
def _driver_errors() -> tuple[type[BaseException], ...]:
    # smart-open raises ValueError for a refused upload and OSError when its
    # retries give up; botocore is imported late because it is optional.
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, OSError, ValueError)


def _reason(exc: BaseException) -> str:
    """Name a failure by its S3 error code or class: neither carries secrets."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "unknown error"))
    return type(exc).__name__


def _is_missing(exc: BaseException) -> bool:
    return _reason(exc) in {"404", "NoSuchKey"}


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except _driver_errors() as exc:
        raise PublishFailed(
            f"the object storage could not {action}: {_reason(exc)}"
        ) from exc


def default_client() -> Any:
    """Build an S3 client the way every AWS tool does.

    Endpoint, credentials and region come from the environment
    (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_PROFILE``, ...) and the shared config and credentials files, so any
    S3-compatible store works without a setting of ours. A session of its
    own keeps the build safe from other threads.
    """
    import boto3

    _bound_smart_open_retries()
    return boto3.session.Session().client("s3")


def _bound_smart_open_retries() -> None:
    # smart-open retries a failed S3 call 6 times, 10 s apart, through a
    # module-wide policy: an unreachable store would hold an upload's worker
    # for a minute before the 500. Two tries a second apart is enough for a
    # blip; the upload itself is the caller's to retry. This changes the
    # policy for the whole process, which is ours.
    retry = smart_open.s3.RETRY
    retry.attempts = min(retry.attempts, 2)
    retry.sleep_seconds = min(retry.sleep_seconds, 1)


@functools.cache
def _copy_config() -> Any:
    """Copy in one CopyObject request up to its 5 GiB limit, in parts past it.

    A single request is what S3 does fastest and atomically; boto3's default
    would split anything over 8 MiB into parts (five times slower on moto).
    """
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=_COPY_OBJECT_LIMIT + 1, multipart_chunksize=512 * _MIB
    )


class _CompletionRefused(RuntimeError):
    """smart-open tried to complete an upload that was never committed."""


class _CompletionGate:
    """The client smart-open writes through: it completes nothing until opened.

    Completing a multipart upload, or putting the empty object smart-open
    writes for a zero-byte file, is the only way an upload becomes visible;
    every other call passes straight to the client.

    Args:
        client: The boto3 S3 client.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self.open = False
        #: Whether a completion was sent: a failed one may still have landed.
        self.attempted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        """Complete the upload, if the staged copy is being committed."""
        return self._complete(self._client.complete_multipart_upload, kwargs)

    def put_object(self, **kwargs: Any) -> Any:
        """Put a whole object, if the staged copy is being committed."""
        return self._complete(self._client.put_object, kwargs)

    def _complete(self, call: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        if not self.open:
            raise _CompletionRefused("an uncommitted upload may not be completed")
        self.attempted = True
        return call(**kwargs)


def _abandon(writer: _Writer, uri: str) -> None:
    """Abort the upload of a staged copy dropped without commit or abort."""
    try:
        writer.terminate()
    except _driver_errors() as exc:
        log.warning(
            "could not abort the upload of a dropped staged copy of %s (%s); "
            "its parts stay until the bucket's lifecycle rule removes them",
            uri,
            _reason(exc),
        )
    else:
        log.warning("aborted the upload of a dropped staged copy of %s", uri)


class _StagedObject:
    """A staged copy: a multipart upload that becomes the object on commit.

    Args:
        client: The boto3 S3 client, for copies and deletes.
        gate: The gate the writer completes through.
        writer: smart-open's writer of the upload.
        location: Where the object goes.
    """

    def __init__(
        self, client: Any, gate: _CompletionGate, writer: _Writer, location: Location
    ) -> None:
        self.client = client
        self.gate = gate
        self.writer = writer
        self.bucket = location.authority
        self.key = location.path
        self.uri = location.uri
        self.backup: str | None = None
        self.committed = False
        self._finalizer = weakref.finalize(self, _abandon, writer, self.uri)

    def write(self, chunk: bytes) -> None:
        with _translated("upload the object"):
            self.writer.write(chunk)

    def commit(self) -> None:
        self.backup = self._back_up()
        self.gate.open = True
        try:
            with _translated("complete the upload"):
                self.writer.close()
        finally:
            # A writer whose close failed must not complete later, in __del__.
            self.gate.open = False
        self.committed = True
        self._finalizer.detach()
        log.debug("committed %s", self.uri)

    def abort(self) -> None:
        self._finalizer.detach()
        if self.gate.attempted:
            # The completion failed, but it may have reached the store first.
            with contextlib.suppress(*_driver_errors()):
                self.writer.terminate()
            self._put_back()
            return
        with _translated("abort the upload"):
            self.writer.terminate()
        self._drop_backup()
        log.debug("aborted %s", self.uri)

    def rollback(self) -> None:
        if not self.committed:
            return
        self._put_back()
        log.warning("rolled back %s", self.uri)

    def release(self) -> None:
        self._drop_backup()

    def _back_up(self) -> str | None:
        backup = f"{STAGING_PREFIX}{uuid.uuid4().hex}.prev"
        try:
            self._copy(self.key, backup)
        except _driver_errors() as exc:
            if _is_missing(exc):
                return None
            raise PublishFailed(
                f"the object storage could not keep the previous object: {_reason(exc)}"
            ) from exc
        return backup

    def _put_back(self) -> None:
        with _translated("restore the previous object"):
            if self.backup is None:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            else:
                self._copy(self.backup, self.key)
        self.committed = False
        try:
            self._drop_backup()
        except PublishFailed:
            # The location is restored; only a stray backup is left behind.
            log.warning("could not delete the backup %s of %s", self.backup, self.uri)

    def _drop_backup(self) -> None:
        if self.backup is None:
            return
        with _translated("drop the previous object"):
            self.client.delete_object(Bucket=self.bucket, Key=self.backup)
        self.backup = None

    def _copy(self, source: str, destination: str) -> None:
        self.client.copy(
            {"Bucket": self.bucket, "Key": source},
            self.bucket,
            destination,
            Config=_copy_config(),
        )


def _checked(location: Location) -> Location:
    """Return ``location`` if it names an object this storage may write.

    Raises:
        PublishFailed: Another scheme, a folder, the reserved prefix, or a
            key smart-open would read otherwise (``?versionId=`` in it).
    """
    if location.scheme != SCHEME:
        raise PublishFailed(f"{location.uri} is not an {SCHEME}:// location")
    if location.is_folder:
        raise PublishFailed(f"{location.uri} names a folder, not an object")
    if (location.path + "/").startswith(STAGING_PREFIX):
        raise PublishFailed(f"{location.uri} is in the reserved {STAGING_PREFIX}")
    parsed = smart_open.s3.parse_uri(location.uri)
    if (parsed["bucket_id"], parsed["key_id"]) != (location.authority, location.path):
        raise PublishFailed(f"{location.uri} is not a plain bucket and key")
    return location


class ObjectStorage:
    """The ``s3`` scheme: objects in S3 or an S3-compatible store.

    Args:
        options: Part size and clean-up settings.
        client_factory: Builds the S3 client, once, at the first stage.
    """

    def __init__(
        self,
        options: ObjectStoreOptions | None = None,
        client_factory: Callable[[], Any] = default_client,
    ) -> None:
        self.options = options or ObjectStoreOptions()
        self._client_factory = client_factory
        self._client: Any = None
        self._lock = threading.Lock()
        self._buckets: set[str] = set()

    def ping(self) -> None:
        """Check the buckets this process has written to still answer.

        Before the first upload to object storage there is nothing to check
        (no bucket is known in advance), so readiness does not depend on S3
        for a deployment that does not use it.

        Raises:
            PublishFailed: A bucket in use cannot be reached or listed.
        """
        with self._lock:
            client, buckets = self._client, sorted(self._buckets)
        for bucket in buckets:
            with _translated(f"reach s3://{bucket}"):
                client.list_objects_v2(Bucket=bucket, MaxKeys=1)

    def client(self) -> Any:
        """Return the S3 client, building it on first use.

        Raises:
            PublishFailed: The AWS configuration is unusable.
        """
        with self._lock:
            if self._client is None:
                with _translated("set up its client"):
                    self._client = self._client_factory()
            return self._client

    def stage(self, location: Location) -> _StagedObject:
        """Start a multipart upload for ``location``; nothing is visible yet.

        Raises:
            PublishFailed: The location is unsafe, or the store refuses (no
                such bucket, access denied, unreachable).
        """
        location = _checked(location)
        client = self.client()
        with self._lock:
            self._buckets.add(location.authority)
        gate = _CompletionGate(client)
        params = {"client": gate, "min_part_size": self.options.part_size}
        with _translated("start the upload"):
            writer = smart_open.open(
                location.uri, "wb", compression="disable", transport_params=params
            )
        log.debug("staged %s", location.uri)
        return _StagedObject(client, gate, cast(_Writer, writer), location)

    def sweep(self, min_age: float = 0.0) -> int:
        """Remove stale backups from the sweep buckets; return how many.

        Only backups older than ``stale_after`` (or ``min_age``, if longer) go, so a commit in flight in
        another process keeps its own. Uploads left pending by a process
        that died are not touched here: a bucket lifecycle rule
        (``AbortIncompleteMultipartUpload``) removes them without risk to
        other writers of the bucket. A store that fails is logged and
        skipped, so that start-up goes on.
        """
        failures: tuple[type[BaseException], ...] = (PublishFailed, *_driver_errors())
        removed = 0
        for bucket in self.options.sweep_buckets:
            try:
                removed += self._sweep_bucket(bucket, min_age)
            except failures as exc:
                log.warning("could not sweep s3://%s (%s)", bucket, _reason(exc))
        if removed:
            log.warning("removed %d stale backups from object storage", removed)
        return removed

    def _sweep_bucket(self, bucket: str, min_age: float) -> int:
        client = self.client()
        age = max(self.options.stale_after, min_age)
        stale_after = datetime.timedelta(seconds=age)
        cutoff = datetime.datetime.now(datetime.UTC) - stale_after
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=STAGING_PREFIX
        )
        stale = [
            item["Key"]
            for page in pages
            for item in page.get("Contents", [])
            if item["LastModified"] <= cutoff
        ]
        for key in stale:
            client.delete_object(Bucket=bucket, Key=key)
        return len(stale)


@hookimpl
def dais_storages(context: StorageContext) -> Mapping[str, Storage]:
    """Serve ``s3://`` locations, if boto3 (the ``s3`` extra) is installed."""
    if importlib.util.find_spec("boto3") is None:
        log.debug("boto3 is not installed; no %s:// storage", SCHEME)
        return {}
    storage: Storage = ObjectStorage()
    return {SCHEME: storage}

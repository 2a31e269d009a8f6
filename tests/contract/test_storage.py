"""The Storage port's contract, over every adapter: local folder and S3.

:class:`TestStorageContract` is one suite run against each storage through a
small harness that can read a location, put content there behind the
adapter's back, list what readers see and list staging leftovers.
:class:`TestPublishAcrossStorages` runs :func:`dais_core.usecases.publish`
over a File Manager folder and S3 together, built by the plugin hooks.
:class:`TestObjectStorage` covers what only the S3 adapter has: client
construction, error translation, the guard against dropped writers.

S3 is a moto server started on 127.0.0.1 for the session (see
:mod:`tests.moto_server`); boto3 finds it through ``AWS_ENDPOINT_URL`` alone.
"""

from __future__ import annotations

import gc
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import smart_open.s3
from botocore.config import Config
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dais_adapters.hooks import StorageContext, plugin_manager
from dais_adapters.localfs import STAGING_FOLDER, LocalFolderStorage
from dais_adapters.objectstore import (
    STAGING_PREFIX,
    ObjectStorage,
    ObjectStoreOptions,
)
from dais_core.errors import PublishFailed
from dais_core.policies import map_resource
from dais_core.ports import StagedWrite, Storage
from dais_core.rules import Location
from dais_core.usecases import publish
from dais_core.values import Grant
from tests import strategies
from tests.refusing import RefusingStorage

MiB = 1024 * 1024
#: The smallest part S3 allows: a few megabytes make several parts.
PART = 5 * MiB
#: More than a part, so that S3 has received a part before commit.
OVER_A_PART = PART + 12345


def _random_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunks(data: bytes, size: int = MiB + 7) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class LocalHarness:
    """The File Manager folder under test, seen from outside the adapter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage = LocalFolderStorage(root)

    def location(self, name: str) -> Location:
        return Location("filemanager", "p1", f"in/{name}")

    def _path(self, location: Location) -> Path:
        return self.root / location.authority / location.path

    def read(self, location: Location) -> bytes | None:
        path = self._path(location)
        return path.read_bytes() if path.is_file() else None

    def put(self, location: Location, data: bytes) -> None:
        path = self._path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def visible(self) -> set[str]:
        staging = self.root / STAGING_FOLDER
        return {
            str(path.relative_to(self.root))
            for path in self.root.rglob("*")
            if path.is_file() and staging not in path.parents
        }

    def leftovers(self) -> list[str]:
        staging = self.root / STAGING_FOLDER
        return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []

    def sweep(self) -> None:
        self.storage.sweep()


class S3Harness:
    """A bucket of the moto server under test, seen through a plain client."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        options = ObjectStoreOptions(
            part_size=PART, sweep_buckets=(bucket,), stale_after=0
        )
        self.storage = ObjectStorage(options)

    def location(self, name: str) -> Location:
        return Location("s3", self.bucket, f"in/{name}")

    def read(self, location: Location) -> bytes | None:
        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=location.path)
        except self.s3.exceptions.NoSuchKey:
            return None
        return bytes(answer["Body"].read())

    def put(self, location: Location, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=location.path, Body=data)

    def keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def pending_uploads(self) -> list[str]:
        answer = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    def visible(self) -> set[str]:
        return {key for key in self.keys() if not key.startswith(STAGING_PREFIX)}

    def leftovers(self) -> list[str]:
        backups = [key for key in self.keys() if key.startswith(STAGING_PREFIX)]
        pending = [f"pending upload of {key}" for key in self.pending_uploads()]
        return sorted(backups + pending)

    def sweep(self) -> None:
        self.storage.sweep()


Harness = LocalHarness | S3Harness


@pytest.fixture(
    params=[
        pytest.param("local-folder", id="local-folder"),
        pytest.param("s3", id="s3", marks=pytest.mark.integration),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """Each storage adapter in turn, with a way to look behind it."""
    if request.param == "local-folder":
        return LocalHarness(tmp_path / "filemanager")
    s3 = request.getfixturevalue("s3")
    return S3Harness(s3, request.getfixturevalue("bucket"))


def _with_previous(harness: Harness, previous: bytes | None) -> tuple[Location, Any]:
    """Put ``previous`` (if any) at a location; return it and what is visible."""
    where = harness.location("data.bin")
    if previous is not None:
        harness.put(where, previous)
    return where, harness.visible()


def _stage_and_write(storage: Storage, location: Location, data: bytes) -> StagedWrite:
    staged = storage.stage(location)
    for chunk in _chunks(data):
        staged.write(chunk)
    return staged


def _published(storage: Storage, location: Location, data: bytes) -> StagedWrite:
    staged = _stage_and_write(storage, location, data)
    staged.commit()
    return staged


PREVIOUS = [pytest.param(None, id="absent"), pytest.param(b"old content", id="old")]


class TestStorageContract:
    """What every Storage adapter promises the publish use case."""

    def test_commit_makes_the_content_visible_whole(self, harness: Harness) -> None:
        """A staged, written and committed copy is the location's content."""
        where = harness.location("data.bin")
        data = _random_bytes(3 * MiB + 11)

        _published(harness.storage, where, data).release()

        assert harness.read(where) == data
        assert harness.leftovers() == []

    @pytest.mark.parametrize("previous", PREVIOUS)
    def test_nothing_is_visible_before_commit(
        self, harness: Harness, previous: bytes | None
    ) -> None:
        """Until commit, readers see the previous content and no new name."""
        where, before = _with_previous(harness, previous)

        staged = _stage_and_write(harness.storage, where, _random_bytes(OVER_A_PART))

        assert harness.visible() == before
        assert harness.read(where) == previous
        staged.abort()

    @pytest.mark.parametrize("previous", PREVIOUS)
    def test_abort_keeps_the_previous_content(
        self, harness: Harness, previous: bytes | None
    ) -> None:
        """An aborted copy leaves the location as it was and no staging behind."""
        where, before = _with_previous(harness, previous)

        _stage_and_write(harness.storage, where, _random_bytes(OVER_A_PART)).abort()

        assert harness.read(where) == previous
        assert harness.visible() == before
        assert harness.leftovers() == []

    @pytest.mark.parametrize("previous", PREVIOUS)
    def test_rollback_after_commit_restores_the_previous_content(
        self, harness: Harness, previous: bytes | None
    ) -> None:
        """Rollback puts the old content back, or removes a new name."""
        where, before = _with_previous(harness, previous)

        _published(harness.storage, where, b"new content").rollback()

        assert harness.read(where) == previous
        assert harness.visible() == before
        assert harness.leftovers() == []

    def test_release_drops_what_rollback_needed(self, harness: Harness) -> None:
        """After release the new content stays and no backup is kept."""
        where = harness.location("data.bin")
        harness.put(where, b"old content")
        staged = _published(harness.storage, where, b"new content")
        assert harness.leftovers() != []

        staged.release()

        assert harness.read(where) == b"new content"
        assert harness.leftovers() == []

    def test_two_staged_writes_commit_in_order(self, harness: Harness) -> None:
        """Of two copies staged for one location, the last committed wins."""
        where = harness.location("data.bin")
        first = _stage_and_write(harness.storage, where, b"first")
        second = _stage_and_write(harness.storage, where, b"second")

        first.commit()
        assert harness.read(where) == b"first"
        second.commit()
        first.release()
        second.release()

        assert harness.read(where) == b"second"
        assert harness.leftovers() == []

    def test_large_content_round_trips(self, harness: Harness) -> None:
        """Twenty mebibytes, several parts in S3, come back byte for byte."""
        where = harness.location("large.bin")
        data = _random_bytes(20 * MiB + 3)

        _published(harness.storage, where, data).release()

        assert harness.read(where) == data

    def test_an_empty_file_is_a_valid_file(self, harness: Harness) -> None:
        """Committing zero bytes replaces the old content with an empty file."""
        where = harness.location("empty.bin")
        harness.put(where, b"old content")

        _published(harness.storage, where, b"").release()

        assert harness.read(where) == b""

    def test_names_that_look_compressed_are_stored_as_sent(
        self, harness: Harness
    ) -> None:
        """A ``.gz`` name is not a reason to compress the bytes."""
        where = harness.location("export.csv.gz")

        _published(harness.storage, where, b"a,b\n1,2\n").release()

        assert harness.read(where) == b"a,b\n1,2\n"

    @pytest.mark.parametrize("previous", PREVIOUS)
    def test_a_dropped_writer_leaves_nothing(
        self, harness: Harness, previous: bytes | None
    ) -> None:
        """A copy dropped without commit or abort changes nothing readers see."""
        where, before = _with_previous(harness, previous)

        staged = _stage_and_write(harness.storage, where, _random_bytes(OVER_A_PART))
        del staged
        gc.collect()

        assert harness.read(where) == previous
        assert harness.visible() == before
        harness.sweep()
        assert harness.leftovers() == []

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096)))
    def test_any_chunking_round_trips(
        self, harness: Harness, data: bytes, cuts: list[int]
    ) -> None:
        """However the bytes are split into writes, the same bytes are stored."""
        where = harness.location(f"{uuid.uuid4().hex}.bin")
        staged = harness.storage.stage(where)
        for chunk in strategies.chunked(data, cuts):
            staged.write(chunk)
        staged.commit()
        staged.release()

        assert harness.read(where) == data


def _hooked_storages(root: Path) -> dict[str, Storage]:
    storages: dict[str, Storage] = {}
    context = StorageContext(root)
    for contributed in plugin_manager().hook.dais_storages(context=context):
        storages.update(contributed)
    return storages


def _outcomes(error: PublishFailed) -> dict[str, str]:
    return {item["location"]: item["outcome"] for item in error.detail["locations"]}


@pytest.mark.integration
class TestPublishAcrossStorages:
    """``publish`` to a File Manager folder and S3 at once, as the hooks wire it."""

    def test_publish_writes_every_location(
        self, tmp_path: Path, s3: Any, bucket: str
    ) -> None:
        """One publish puts the same bytes in the folder and in the bucket."""
        grant = Grant("in/", ("filemanager://p1/in/", f"s3://{bucket}/in/"))
        target = map_resource([grant], "in/data.bin")
        data = _random_bytes(7 * MiB)

        result = publish(
            "in/data.bin",
            target,
            _chunks(data),
            _hooked_storages(tmp_path),
            max_size=64 * MiB,
        )

        assert result.size == len(data)
        assert (tmp_path / "p1" / "in" / "data.bin").read_bytes() == data
        stored = s3.get_object(Bucket=bucket, Key="in/data.bin")["Body"].read()
        assert stored == data
        assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1

    def test_a_failed_s3_commit_rolls_the_folder_back(
        self, tmp_path: Path, s3: Any, bucket: str
    ) -> None:
        """When the bucket vanishes before commit, the folder gets its old file back."""
        grant = Grant("in/", ("filemanager://p1/in/", f"s3://{bucket}/in/"))
        target = map_resource([grant], "in/data.bin")
        local = tmp_path / "p1" / "in" / "data.bin"
        local.parent.mkdir(parents=True)
        local.write_bytes(b"old content")

        def body_then_bucket_gone() -> Iterator[bytes]:
            yield b"new content"
            s3.delete_bucket(Bucket=bucket)

        with pytest.raises(PublishFailed) as failed:
            publish(
                "in/data.bin",
                target,
                body_then_bucket_gone(),
                _hooked_storages(tmp_path),
                max_size=MiB,
            )

        assert local.read_bytes() == b"old content"
        assert _outcomes(failed.value) == {
            "filemanager://p1/in/data.bin": "rolled_back",
            f"s3://{bucket}/in/data.bin": "failed",
        }
        assert "NoSuchBucket" in failed.value.detail["locations"][1]["reason"]

    def test_a_failed_local_commit_rolls_the_s3_object_back(
        self, tmp_path: Path, s3: Any, bucket: str
    ) -> None:
        """When the folder fails after S3 committed, S3 gets its old object back."""
        grant = Grant("in/", (f"s3://{bucket}/in/", "filemanager://p1/in/"))
        target = map_resource([grant], "in/data.bin")
        s3.put_object(Bucket=bucket, Key="in/data.bin", Body=b"old content")
        storages = _hooked_storages(tmp_path)
        storages["filemanager"] = RefusingStorage(storages["filemanager"])

        with pytest.raises(PublishFailed) as failed:
            publish(
                "in/data.bin",
                target,
                _chunks(_random_bytes(OVER_A_PART)),
                storages,
                max_size=64 * MiB,
            )

        stored = s3.get_object(Bucket=bucket, Key="in/data.bin")["Body"].read()
        assert stored == b"old content"
        assert _outcomes(failed.value) == {
            f"s3://{bucket}/in/data.bin": "rolled_back",
            "filemanager://p1/in/data.bin": "failed",
        }
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == ["in/data.bin"]
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


class _LandedButFailed:
    """A client whose completions reach the store and then report a failure."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        self.client.complete_multipart_upload(**kwargs)
        error = {"Error": {"Code": "InternalError", "Message": "connection reset"}}
        raise ClientError(error, "CompleteMultipartUpload")


class _AbortFails:
    """A client that cannot abort uploads."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        error = {"Error": {"Code": "ServiceUnavailable", "Message": "try later"}}
        raise ClientError(error, "AbortMultipartUpload")


class _FailsOnce:
    """A client whose first completion fails before reaching the store."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.completions = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        self.completions += 1
        if self.completions == 1:
            error = {"Error": {"Code": "InternalError", "Message": "try again"}}
            raise ClientError(error, "CompleteMultipartUpload")
        return self.client.complete_multipart_upload(**kwargs)


@pytest.mark.integration
class TestObjectStorage:
    """What only the S3 adapter does."""

    def test_the_client_finds_the_store_through_aws_endpoint_url(
        self, moto: str
    ) -> None:
        """boto3 takes the endpoint from ``AWS_ENDPOINT_URL``; nothing is hard-coded."""
        assert ObjectStorage().client().meta.endpoint_url == moto

    def test_the_hook_builds_no_client(
        self, tmp_path: Path, moto: str, bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The client is built at the first stage, from the settings of that time."""
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        storage = _hooked_storages(tmp_path)["s3"]
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto)

        _published(storage, Location("s3", bucket, "late.bin"), b"x").release()

        assert S3Harness(boto3.client("s3"), bucket).visible() == {"late.bin"}

    def test_a_missing_bucket_fails_at_stage(self, moto: str) -> None:
        """No such bucket is a PublishFailed naming the S3 error, not a botocore error."""
        where = Location("s3", f"dais-none-{uuid.uuid4().hex[:8]}", "in/x.bin")

        with pytest.raises(PublishFailed, match="NoSuchBucket") as failed:
            ObjectStorage().stage(where)

        assert failed.value.__cause__ is not None

    def test_an_unreachable_store_fails_at_stage(
        self, moto: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A store nobody answers for is a PublishFailed, without secrets in it."""
        monkeypatch.setattr(smart_open.s3.RETRY, "attempts", 1)
        monkeypatch.setattr(smart_open.s3.RETRY, "sleep_seconds", 0)
        config = Config(connect_timeout=1, retries={"total_max_attempts": 1})

        def closed_port() -> Any:
            url = "http://127.0.0.1:9"
            return boto3.session.Session().client("s3", endpoint_url=url, config=config)

        with pytest.raises(PublishFailed) as failed:
            ObjectStorage(client_factory=closed_port).stage(
                Location("s3", "dais-any", "x.bin")
            )

        assert "testing" not in failed.value.message
        assert "127.0.0.1" not in failed.value.message

    @pytest.mark.parametrize(
        "path", [".dais-staging/x.prev", ".dais-staging", "in/", "a?versionId=1"]
    )
    def test_unsafe_keys_are_refused_before_any_request(self, path: str) -> None:
        """The reserved prefix, folders and keys smart-open would rewrite are refused."""

        def no_client() -> Any:
            raise AssertionError("no request may be made")

        with pytest.raises(PublishFailed):
            ObjectStorage(client_factory=no_client).stage(Location("s3", "bkt", path))

    def test_a_completion_that_landed_is_undone_by_abort(
        self, s3: Any, bucket: str
    ) -> None:
        """A commit whose completion failed after landing is reverted by abort."""
        where = Location("s3", bucket, "data.bin")
        s3.put_object(Bucket=bucket, Key="data.bin", Body=b"old content")
        storage = ObjectStorage(client_factory=lambda: _LandedButFailed(s3))
        staged = _stage_and_write(storage, where, b"new content")

        with pytest.raises(PublishFailed, match="InternalError"):
            staged.commit()
        staged.abort()

        harness = S3Harness(s3, bucket)
        assert harness.read(where) == b"old content"
        assert harness.leftovers() == []

    def test_a_dropped_writer_aborts_its_upload_at_once(
        self, s3: Any, bucket: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Dropping a staged copy aborts its upload, without waiting for a sweep."""
        harness = S3Harness(s3, bucket)
        staged = _stage_and_write(
            harness.storage, harness.location("x.bin"), _random_bytes(OVER_A_PART)
        )
        assert harness.pending_uploads() == ["in/x.bin"]

        del staged
        gc.collect()

        assert harness.pending_uploads() == []
        assert harness.keys() == []
        assert "aborted the upload of a dropped staged copy" in caplog.text

    def test_a_dropped_writer_never_completes_even_if_abort_fails(
        self, s3: Any, bucket: str
    ) -> None:
        """If the abort fails too, the finalising close() still completes nothing."""
        storage = ObjectStorage(client_factory=lambda: _AbortFails(s3))
        staged = _stage_and_write(
            storage, Location("s3", bucket, "x.bin"), _random_bytes(1000)
        )

        del staged
        gc.collect()

        assert S3Harness(s3, bucket).keys() == []
        # io.IOBase's finaliser did call close(): it sent the buffered bytes as
        # a part, then the gate refused the completion (silently, as CPython
        # swallows errors of close() in a finaliser outside dev mode).
        (upload,) = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
        parts = s3.list_parts(Bucket=bucket, Key="x.bin", UploadId=upload["UploadId"])
        assert len(parts["Parts"]) == 1
        s3.abort_multipart_upload(
            Bucket=bucket, Key="x.bin", UploadId=upload["UploadId"]
        )

    def test_a_failed_commit_does_not_complete_later(
        self, s3: Any, bucket: str
    ) -> None:
        """A writer whose commit and abort both failed completes nothing when dropped."""
        client = _FailsOnce(_AbortFails(s3))
        storage = ObjectStorage(client_factory=lambda: client)
        staged = _stage_and_write(storage, Location("s3", bucket, "x.bin"), b"new")

        with pytest.raises(PublishFailed, match="InternalError"):
            staged.commit()
        staged.abort()
        del staged
        gc.collect()

        assert S3Harness(s3, bucket).keys() == []
        # Only commit's completion reached the client; the finaliser's was
        # refused at the gate.
        assert client.completions == 1
        (upload,) = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
        s3.abort_multipart_upload(
            Bucket=bucket, Key="x.bin", UploadId=upload["UploadId"]
        )

    def test_sweep_removes_only_stale_backups(self, s3: Any, bucket: str) -> None:
        """Backups older than ``stale_after`` go; fresh ones stay for their commit."""
        s3.put_object(Bucket=bucket, Key=f"{STAGING_PREFIX}x.prev", Body=b"old")
        s3.put_object(Bucket=bucket, Key="in/kept.bin", Body=b"kept")

        fresh = ObjectStoreOptions(sweep_buckets=(bucket,), stale_after=3600)
        assert ObjectStorage(fresh).sweep() == 0
        stale = ObjectStoreOptions(sweep_buckets=(bucket,), stale_after=0)
        assert ObjectStorage(stale).sweep() == 1

        assert S3Harness(s3, bucket).keys() == ["in/kept.bin"]

    def test_sweep_without_buckets_builds_no_client(self) -> None:
        """The default storage sweeps nothing and reads no AWS settings."""

        def no_client() -> Any:
            raise AssertionError("no client may be built")

        assert ObjectStorage(client_factory=no_client).sweep() == 0


class TestObjectStorageReadiness:
    """Readiness checks the buckets in use, and nothing before there are any."""

    def test_ping_checks_the_buckets_written_to(self, s3, bucket, tmp_path):
        """Idle storage is ready; a bucket in use that vanished is not."""
        storage = _hooked_storages(tmp_path)["s3"]
        storage.ping()
        staged = storage.stage(Location("s3", bucket, "ready.bin"))
        staged.abort()
        storage.ping()
        s3.delete_bucket(Bucket=bucket)
        with pytest.raises(PublishFailed, match="could not reach"):
            storage.ping()

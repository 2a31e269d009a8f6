"""The Integration API over a real waitress server, driven by curl."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dais_core.values import DataType
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")
BINARY, SQLITE, CSV = DataType.BINARY, DataType.SQLITE, DataType.CSV


def curl(*args: str) -> tuple[int, dict[str, Any], str]:
    """Run curl; return the status, the JSON body (or {}) and the raw headers."""
    assert CURL, "curl is needed for the integration tests"
    done = subprocess.run(
        [
            CURL,
            "-sS",
            "-D",
            "/dev/stderr",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "60",
            *args,
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else {}, done.stderr


def upload(
    gateway: Gateway, token: str | None, resource: str, *form: str, **kw: str
) -> Any:
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    extra = [arg for pair in kw.items() for arg in ("-H", f"{pair[0]}: {pair[1]}")]
    return curl(
        *auth, *extra, *form, f"{gateway.url}/integration/v1/resources/{resource}"
    )


def make_sqlite(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany(
            "INSERT INTO t (name) VALUES (?)", [(f"row{i}",) for i in range(500)]
        )
    db.close()
    return path


def make_csv(path: Path) -> Path:
    path.write_text('id,name,note\n1,alpha,"multi\nline"\n2,beta,"with ""quotes"""\n')
    return path


@pytest.fixture
def publisher(gateway: Gateway) -> tuple[str, str]:
    return gateway.make_key(
        grants=(
            ("dirOne/", ("filemanager://p1/inputs/",), BINARY),
            ("db/data.sqlite3", ("filemanager://p1/db/data.sqlite3",), SQLITE),
            ("tables/x.csv", ("filemanager://p1/tables/x.csv",), CSV),
            (
                "both/x.bin",
                ("filemanager://p1/a/x.bin", "filemanager://p1/b/x.bin"),
                BINARY,
            ),
        )
    )


class TestPublish:
    """Files land byte-identical in the File Manager."""

    def test_sqlite_database_lands_byte_identical(self, gateway, publisher, tmp_path):
        """A real SQLite database uploaded with curl -F arrives unchanged."""
        source = make_sqlite(tmp_path / "data.sqlite3")
        status, body, _ = upload(
            gateway, publisher[1], "db/data.sqlite3", "-F", f"data=@{source}"
        )
        assert status == 200, body
        stored = gateway.filemanager / "p1/db/data.sqlite3"
        assert stored.read_bytes() == source.read_bytes()
        assert body["size"] == source.stat().st_size
        assert body["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert body["locations"] == ["filemanager://p1/db/data.sqlite3"]

    def test_csv_lands_byte_identical(self, gateway, publisher, tmp_path):
        """A CSV with quoted multi-line fields arrives unchanged."""
        source = make_csv(tmp_path / "x.csv")
        status, body, _ = upload(
            gateway, publisher[1], "tables/x.csv", "-F", f"data=@{source}"
        )
        assert status == 200, body
        assert (
            gateway.filemanager / "p1/tables/x.csv"
        ).read_bytes() == source.read_bytes()

    def test_zero_byte_file(self, gateway, publisher, tmp_path):
        """An empty file is a valid upload."""
        source = tmp_path / "empty"
        source.write_bytes(b"")
        status, body, _ = upload(
            gateway, publisher[1], "dirOne/empty", "-F", f"data=@{source}"
        )
        assert status == 200, body
        assert body["size"] == 0
        assert (gateway.filemanager / "p1/inputs/empty").read_bytes() == b""

    def test_upload_again_overwrites(self, gateway, publisher, tmp_path):
        """A second upload replaces the first."""
        source = tmp_path / "f.bin"
        for content in (b"first version", b"second"):
            source.write_bytes(content)
            status, body, _ = upload(
                gateway, publisher[1], "dirOne/sub/f.bin", "-F", f"data=@{source}"
            )
            assert status == 200, body
        assert (gateway.filemanager / "p1/inputs/sub/f.bin").read_bytes() == b"second"

    def test_every_location_gets_the_file(self, gateway, publisher, tmp_path):
        """A grant with two locations writes both."""
        source = tmp_path / "x.bin"
        source.write_bytes(bytes(range(256)) * 100)
        status, body, _ = upload(
            gateway, publisher[1], "both/x.bin", "-F", f"data=@{source}"
        )
        assert status == 200, body
        for folder in ("a", "b"):
            assert (
                gateway.filemanager / f"p1/{folder}/x.bin"
            ).read_bytes() == source.read_bytes()

    def test_no_staging_file_is_left(self, gateway, publisher, tmp_path):
        """After a publish the staging folder is empty."""
        source = tmp_path / "x.bin"
        source.write_bytes(b"x" * 5000)
        upload(gateway, publisher[1], "dirOne/x.bin", "-F", f"data=@{source}")
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    def test_matching_digest_is_accepted(self, gateway, publisher, tmp_path):
        """A correct X-Checksum-SHA256 passes."""
        source = tmp_path / "x.bin"
        source.write_bytes(b"digest me")
        digest = hashlib.sha256(b"digest me").hexdigest()
        status, _, _ = upload(
            gateway,
            publisher[1],
            "dirOne/x.bin",
            "-F",
            f"data=@{source}",
            **{"X-Checksum-SHA256": digest},
        )
        assert status == 200


class TestRefusals:
    """Bad requests get a JSON error with the right status, and nothing lands."""

    def test_missing_key_is_401(self, gateway, tmp_path):
        """No Authorization header is 401."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(gateway, None, "dirOne/x", "-F", f"data=@{source}")
        assert (status, body["error"]) == (401, "unauthenticated")

    def test_invalid_key_is_401(self, gateway, publisher, tmp_path):
        """A key with one character changed fails its checksum: 401."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        token = publisher[1]
        broken = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
        status, body, _ = upload(gateway, broken, "dirOne/x", "-F", f"data=@{source}")
        assert status == 401
        assert token not in json.dumps(body) and broken not in json.dumps(body)

    def test_revoked_key_is_401(self, gateway, publisher, tmp_path):
        """A revoked key is refused."""
        gateway.store.revoke(publisher[0], time.time())
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(
            gateway, publisher[1], "dirOne/x", "-F", f"data=@{source}"
        )
        assert (status, body["message"]) == (401, "the API key has been revoked")

    def test_expired_key_is_401(self, gateway, tmp_path):
        """An expired key is refused."""
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), BINARY),), expires=time.time() - 1
        )
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, _, _ = upload(gateway, token, "x", "-F", f"data=@{source}")
        assert status == 401

    def test_resource_not_granted_is_401(self, gateway, publisher, tmp_path):
        """Publishing outside the key's grants is an unauthorised publish."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(
            gateway, publisher[1], "elsewhere/x", "-F", f"data=@{source}"
        )
        assert (status, body["error"]) == (401, "unauthorised_publish")

    def test_no_data_part_is_400(self, gateway, publisher, tmp_path):
        """A form without a 'data' file is 400."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(
            gateway, publisher[1], "dirOne/x", "-F", f"other=@{source}"
        )
        assert status == 400, body
        status, body, _ = upload(gateway, publisher[1], "dirOne/x", "-F", "note=hello")
        assert (status, body["error"]) == (400, "invalid_data")
        assert not (gateway.filemanager / "p1/inputs/x").exists()

    def test_two_files_is_400(self, gateway, publisher, tmp_path):
        """Two file parts named data are refused, and nothing is written."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, _, _ = upload(
            gateway,
            publisher[1],
            "dirOne/x",
            "-F",
            f"data=@{source}",
            "-F",
            f"data=@{source}",
        )
        assert status == 400
        assert not (gateway.filemanager / "p1/inputs/x").exists()

    def test_not_multipart_is_415(self, gateway, publisher, tmp_path):
        """A raw body instead of a form is 415."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(
            gateway,
            publisher[1],
            "dirOne/x",
            "--data-binary",
            f"@{source}",
            **{"Content-Type": "application/octet-stream"},
        )
        assert (status, body["error"]) == (415, "unsupported_type")

    def test_fake_sqlite_is_415_and_keeps_the_old_copy(
        self, gateway, publisher, tmp_path
    ):
        """A file declared sqlite that is not one is 415; the stored copy stays."""
        good = make_sqlite(tmp_path / "good.sqlite3")
        assert (
            upload(gateway, publisher[1], "db/data.sqlite3", "-F", f"data=@{good}")[0]
            == 200
        )
        fake = tmp_path / "fake.sqlite3"
        fake.write_bytes(b"this is not a database" * 100)
        status, body, _ = upload(
            gateway, publisher[1], "db/data.sqlite3", "-F", f"data=@{fake}"
        )
        assert (status, body["error"]) == (415, "unsupported_type")
        assert (
            gateway.filemanager / "p1/db/data.sqlite3"
        ).read_bytes() == good.read_bytes()
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    def test_wrong_digest_is_400(self, gateway, publisher, tmp_path):
        """A digest that does not match is 400 and nothing is written."""
        source = tmp_path / "x"
        source.write_bytes(b"payload")
        status, body, _ = upload(
            gateway,
            publisher[1],
            "dirOne/x",
            "-F",
            f"data=@{source}",
            **{"X-Checksum-SHA256": "00" * 32},
        )
        assert status == 400, body
        assert not (gateway.filemanager / "p1/inputs/x").exists()

    @pytest.mark.parametrize(
        "resource",
        [
            "dirOne/../escape",
            "dirOne/%2e%2e/escape",
            "dirOne/a%2Fb",
            "dirOne//x",
            "dirOne/a%5Cb",
            "dirOne/a%00b",
            "dirOne/C:x",
        ],
    )
    def test_bad_resource_id_is_400(self, gateway, publisher, tmp_path, resource):
        """Resource ids that could escape the root are refused."""
        source = tmp_path / "x"
        source.write_bytes(b"x")
        status, body, _ = upload(
            gateway, publisher[1], resource, "--path-as-is", "-F", f"data=@{source}"
        )
        assert status == 400, body
        assert not (gateway.filemanager.parent / "escape").exists()


class TestThrottle:
    """One upload per second per key by default."""

    def test_second_upload_within_a_second_is_429(self, start_gateway, tmp_path):
        """Back-to-back uploads: the second gets 429 and Retry-After."""
        gateway = start_gateway()
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        source = tmp_path / "x"
        source.write_bytes(b"x")
        first = upload(gateway, token, "x", "-F", f"data=@{source}")
        second = upload(gateway, token, "x", "-F", f"data=@{source}")
        assert first[0] == 200
        assert "ratelimit-policy:" in first[2].lower()
        assert second[0] == 429
        assert "retry-after: 1" in second[2].lower()

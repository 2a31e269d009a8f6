"""All-or-nothing publish, deeper type checks, limits and records."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3

from dais_adapters.hooks import StorageContext, hookimpl
from dais_adapters.localfs import LocalFolderStorage
from dais_core.values import DataType
from tests.integration.conftest import FAST, Gateway
from tests.integration.test_streaming import MiB, connect, raw_upload_head
from tests.refusing import RefusingStorage

pytestmark = pytest.mark.integration

BINARY = DataType.BINARY


def post(
    gateway: Gateway, token: str, resource: str, content: bytes, **headers: str
) -> Any:
    http = urllib3.PoolManager(retries=False)
    return http.request(
        "POST",
        f"{gateway.url}/integration/v1/resources/{resource}",
        fields={"data": ("file.bin", content, "application/octet-stream")},
        headers={"Authorization": f"Bearer {token}", **headers},
    )


def raw_post(
    gateway: Gateway, token: str, resource: str, body: bytes, content_type: str
) -> Any:
    http = urllib3.PoolManager(retries=False)
    return http.request(
        "POST",
        f"{gateway.url}/integration/v1/resources/{resource}",
        body=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )


class RefusingPlugin:
    """A plugin serving ``refusing://``: a local folder whose commits fail."""

    def __init__(self, root: Path) -> None:
        self.storage = RefusingStorage(LocalFolderStorage(root))

    @hookimpl
    def dais_storages(self, context: StorageContext) -> dict[str, Any]:
        return {"refusing": self.storage}


class TestAllOrNothing:
    """A failing location leaves every location as it was."""

    def test_a_commit_failure_rolls_back_the_locations_already_committed(
        self, start_gateway, tmp_path
    ):
        """The 500 lists each outcome and the first location keeps its old file."""
        gateway = start_gateway(
            plugins=(RefusingPlugin(tmp_path / "refusing"),), **FAST
        )
        _, plain = gateway.make_key(grants=(("x", ("filemanager://p1/a/x",), BINARY),))
        _, both = gateway.make_key(
            grants=(("x", ("filemanager://p1/a/x", "refusing://p1/x"), BINARY),)
        )
        assert post(gateway, plain, "x", b"old").status == 200
        response = post(gateway, both, "x", b"new")
        assert response.status == 500
        body = response.json()
        assert body["error"] == "publish_failed"
        assert [o["outcome"] for o in body["locations"]] == ["rolled_back", "failed"]
        assert (gateway.filemanager / "p1/a/x").read_bytes() == b"old"
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    def test_a_folder_where_the_file_goes_is_a_conflict(self, gateway):
        """A destination that is a folder fails the publish with 409, unwritten."""
        (gateway.filemanager / "p1/b/x").mkdir(parents=True)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/a/x", "filemanager://p1/b/x"), BINARY),)
        )
        response = post(gateway, token, "x", b"data")
        assert response.status == 409
        body = response.json()
        assert body["error"] == "location_conflict"
        assert [o["outcome"] for o in body["locations"]] == ["aborted", "failed"]
        assert not (gateway.filemanager / "p1/a/x").exists()
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    @pytest.mark.parametrize("resource", ["d/a/x", "d/a/b/x"])
    def test_a_file_where_a_folder_goes_is_a_conflict(self, gateway, resource):
        """Publishing under a name that is already a file is 409; the file stays."""
        _, token = gateway.make_key(grants=(("d/", ("filemanager://p1/d/",), BINARY),))
        assert post(gateway, token, "d/a", b"kept").status == 200

        response = post(gateway, token, resource, b"data")

        assert response.status == 409
        body = response.json()
        assert body["error"] == "location_conflict"
        assert "stands where a folder" in body["locations"][0]["reason"]
        assert (gateway.filemanager / "p1/d/a").read_bytes() == b"kept"
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    def test_concurrent_uploads_never_mix_locations(self, start_gateway):
        """Of many concurrent uploads, one wins at both locations."""
        gateway = start_gateway(uploads_in_flight=0, reserved_threads=0, **FAST)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/a/x", "filemanager://p1/b/x"), BINARY),)
        )
        contents = [bytes([n]) * (300_000 + n) for n in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(lambda c: post(gateway, token, "x", c).status, contents)
            )
        assert statuses == [200] * 8
        first = (gateway.filemanager / "p1/a/x").read_bytes()
        assert first in contents
        assert (gateway.filemanager / "p1/b/x").read_bytes() == first


def sqlite_database(path: Path) -> bytes:
    """Return the bytes of a small, sound SQLite database made at ``path``."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (v TEXT)")
        db.executemany("INSERT INTO t VALUES (?)", [("x" * 100,)] * 200)
    db.close()
    return path.read_bytes()


def damaged_database(folder: Path) -> bytes:
    """Return a database whose header is sound and whose second page is garbage."""
    data = bytearray(sqlite_database(folder / "damaged.sqlite3"))
    page = int.from_bytes(data[16:18], "big")
    data[page : page + 64] = b"\xff" * 64
    return bytes(data)


class TestDeclaredTypes:
    """SQLite and CSV grants are checked before anything is committed."""

    def test_a_damaged_sqlite_database_is_400(self, gateway, tmp_path):
        """A database whose pages are garbage fails SQLite's integrity check."""
        _, token = gateway.make_key(
            grants=(("db", ("filemanager://p1/db",), DataType.SQLITE),)
        )
        response = post(gateway, token, "db", damaged_database(tmp_path))
        assert response.status == 400, response.data
        assert response.json()["error"] == "corrupt_data"
        assert not (gateway.filemanager / "p1/db").exists()

    def test_a_database_stored_only_in_s3_is_checked_too(
        self, gateway, tmp_path, s3, bucket
    ):
        """With no local location, a local copy of its own is checked, then dropped."""
        _, token = gateway.make_key(
            grants=(("db", (f"s3://{bucket}/db",), DataType.SQLITE),)
        )
        damaged = post(gateway, token, "db", damaged_database(tmp_path))
        assert damaged.status == 400, damaged.data
        assert damaged.json()["error"] == "corrupt_data"
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0

        sound = sqlite_database(tmp_path / "sound.sqlite3")
        assert post(gateway, token, "db", sound).status == 200
        assert s3.get_object(Bucket=bucket, Key="db")["Body"].read() == sound
        assert list((gateway.filemanager / ".dais-staging").iterdir()) == []

    @pytest.mark.parametrize(
        ("content", "status"),
        [(b"\x89PNG\r\n\x1a\n\x00\x00", 415), (b'a,b\n"unterminated,1\n', 400)],
    )
    def test_a_bad_csv_is_refused(self, gateway, content, status):
        """Binary data is 415; text that is not CSV is 400."""
        _, token = gateway.make_key(
            grants=(("t.csv", ("filemanager://p1/t.csv",), DataType.CSV),)
        )
        assert post(gateway, token, "t.csv", content).status == status
        assert not (gateway.filemanager / "p1/t.csv").exists()


class TestMultipart:
    """Malformed forms are 400, quickly."""

    def test_the_media_type_is_case_insensitive(self, gateway):
        """``MULTIPART/Form-Data`` is a form like any other (RFC 9110, 8.3.1)."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        body = (
            b'--zz\r\nContent-Disposition: form-data; name="data"; filename="f"'
            b"\r\n\r\nabc\r\n--zz--\r\n"
        )
        response = raw_post(
            gateway, token, "x", body, "MULTIPART/Form-Data; boundary=zz"
        )
        assert response.status == 200, response.data
        assert (gateway.filemanager / "p1/x").read_bytes() == b"abc"

    def test_a_windows_path_as_the_file_name_is_one_file(self, gateway):
        """A Windows path as the file name is one file: published, name unused."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        body = (
            b'--zz\r\nContent-Disposition: form-data; name="data"; '
            b'filename="C:\\Users\\me\\x.csv"\r\n\r\nabc\r\n--zz--\r\n'
        )
        response = raw_post(
            gateway, token, "x", body, "multipart/form-data; boundary=zz"
        )
        assert response.status == 200, response.data
        assert (gateway.filemanager / "p1/x").read_bytes() == b"abc"

    def test_two_content_types_are_400(self, gateway):
        """Two Content-Type lines: the body cannot be read one way; 400."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        # Framed for the two lines joined, as waitress joins them.
        body = (
            b'--abc, text/plain\r\nContent-Disposition: form-data; name="data"; '
            b'filename="f"\r\n\r\nx\r\n--abc, text/plain--\r\n'
        )
        port = int(gateway.url.rsplit(":", 1)[1])
        head = (
            "POST /integration/v1/resources/x HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n"
            "Content-Type: multipart/form-data; boundary=abc\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + body)
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert not (gateway.filemanager / "p1/x").exists()

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("multipart/form-data", b"--x\r\n"),
            ("multipart/form-data; boundary=" + "b" * 71, b""),
            (
                "multipart/form-data; boundary=\xe9",
                b'--?\r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--?--\r\n",
            ),
            (
                "multipart/form-data; boundary=a<b",
                b'--a<b\r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--a<b--\r\n",
            ),
            (
                'multipart/form-data; boundary="zz "',
                b'--zz \r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--zz --\r\n",
            ),
            (
                "multipart/form-data; boundary=abc, boundary=def",
                b'--abc, boundary=def\r\nContent-Disposition: form-data; name="data"; '
                b'filename="f"\r\n\r\nx\r\n--abc, boundary=def--\r\n',
            ),
            (
                'multipart/form-data; boundary=a b; xboundary="a b"',
                b'--a b\r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--a b--\r\n",
            ),
            (
                "multipart/form-data; boundary=yy; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--zz--\r\n",
            ),
            ("multipart/form-data; boundary=zz", b"no boundary here at all"),
            (
                "multipart/form-data; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="data"; filename="f"\r\n\r\nhalf',
            ),
            (
                "multipart/form-data; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="data"; filename="f"\r\n'
                + b"X-Pad: "
                + b"p" * 10_000
                + b"\r\n\r\nx\r\n--zz--\r\n",
            ),
            (
                "multipart/form-data; boundary=zz",
                b"".join(
                    b'--zz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n'
                    % n
                    for n in range(100)
                )
                + b"--zz--\r\n",
            ),
            (
                "multipart/form-data; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="data"; filename="a/b"\r\n\r\n'
                b"x\r\n--zz--\r\n",
            ),
            (
                "multipart/form-data; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="data"; '
                b'filename="\xff\xfe.csv"\r\n\r\nx\r\n--zz--\r\n',
            ),
            (
                "multipart/form-data; boundary=zz",
                b'--zz\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nv\r\n'
                b'--zz\r\nContent-Disposition: form-data; name="data"; filename="f"'
                b"\r\n\r\nx\r\n--zz--\r\n",
            ),
        ],
        ids=[
            "no-boundary",
            "long-boundary",
            "boundary-not-ascii",
            "boundary-odd-character",
            "boundary-ending-in-a-space",
            "unquoted-comma",
            "quoted-elsewhere",
            "two-boundaries",
            "no-parts",
            "truncated",
            "huge-part-headers",
            "too-many-parts",
            "directory-upload",
            "filename-not-utf-8",
            "field-name-not-utf-8",
        ],
    )
    def test_malformed_forms_are_400(self, gateway, content_type, body):
        """Each malformed form is refused and nothing is written."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        response = raw_post(gateway, token, "x", body, content_type)
        assert response.status == 400, response.data
        assert not (gateway.filemanager / "p1/x").exists()


class TestLimitsAndRecords:
    """Digests, throttle headers, the in-flight cap and the publish record."""

    @pytest.mark.parametrize(
        ("field", "status"),
        [
            ("sha-256=:{bad}:, sha-256=:{good}:", 200),
            ("sha-256=:{good}:, sha-256=:{bad}:", 400),
            ("sha-256=:{good}:;note=1", 200),
            ("sha-512=:{bad}:, sha-256=:{good}:", 200),
            ("sha-256={good}", 400),
            ('sha-256=:{bad}:;p="x, sha-256=:{good}:;q="', 400),
            ('sha-256=:{good}:;p="x, sha-256=:{bad}:;q="', 200),
            ("SHA-256=:{good}:", 400),
            ("sha-256=:AAAA:", 400),
            ("sha-256=:{good}:,,", 400),
        ],
        ids=[
            "last-good",
            "last-bad",
            "parameters",
            "other-algorithm",
            "no-colons",
            "comma-in-quoted-parameter-bad",
            "comma-in-quoted-parameter-good",
            "upper-case-key",
            "three-bytes",
            "empty-member",
        ],
    )
    def test_content_digest_is_read_as_a_dictionary(self, gateway, field, status):
        """Of two sha-256 members the last counts; parameters are ignored."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        good = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
        bad = base64.b64encode(hashlib.sha256(b"abd").digest()).decode()
        header = field.format(good=good, bad=bad)
        response = post(gateway, token, "x", b"abc", **{"Content-Digest": header})
        assert response.status == status, response.data
        assert (gateway.filemanager / "p1/x").exists() == (status == 200)

    @pytest.mark.parametrize(
        ("value", "status"),
        [
            ("{hex}", 200),
            ("{upper}", 200),
            ("{spaced}", 400),
            ("abcd", 400),
            ("{hex}00", 400),
        ],
        ids=["lower", "upper", "spaced-pairs", "short", "long"],
    )
    def test_x_checksum_sha256_is_64_hex_digits(self, gateway, value, status):
        """The hex digest is exactly 64 digits, in either case, nothing else."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        digest = hashlib.sha256(b"abc").hexdigest()
        header = value.format(
            hex=digest,
            upper=digest.upper(),
            spaced=" ".join(digest[i : i + 2] for i in range(0, 64, 2)),
        )
        response = post(gateway, token, "x", b"abc", **{"X-Checksum-SHA256": header})
        assert response.status == status, response.data
        assert (gateway.filemanager / "p1/x").exists() == (status == 200)

    def test_content_digest_is_checked(self, gateway):
        """An RFC 9530 Content-Digest that matches passes; one that does not is 400."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        good = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
        assert (
            post(
                gateway, token, "x", b"abc", **{"Content-Digest": f"sha-256=:{good}:"}
            ).status
            == 200
        )
        bad = base64.b64encode(hashlib.sha256(b"xyz").digest()).decode()
        response = post(
            gateway, token, "x", b"new", **{"Content-Digest": f"sha-256=:{bad}:"}
        )
        assert response.status == 400
        assert (gateway.filemanager / "p1/x").read_bytes() == b"abc"

    def test_allowed_and_throttled_answers_carry_ratelimit_fields(self, start_gateway):
        """Both answers name the policy; the 429 says when to retry."""
        gateway = start_gateway()
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        first, second = post(gateway, token, "x", b"1"), post(gateway, token, "x", b"2")
        assert first.status == 200
        assert first.headers["RateLimit-Policy"] == '"upload";q=1;w=1'
        assert first.headers["RateLimit"].startswith('"upload";r=0;t=')
        assert second.status == 429
        assert second.headers["Retry-After"] == "1"
        assert second.json()["error"] == "throttled"

    def test_every_attempt_is_recorded(self, gateway):
        """Publish records carry key, resource, size, sha256, outcome and request id."""
        key_id, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), BINARY),)
        )
        ok = post(gateway, token, "x", b"12345", **{"X-Request-Id": "req-1"})
        post(gateway, token, "x", b"1", **{"X-Checksum-SHA256": "00" * 32})
        assert ok.status == 200
        gateway.flush()
        records = gateway.store.publishes(key_id)  # type: ignore[attr-defined]
        assert [r["outcome"] for r in records] == ["invalid_data", "published"]
        latest_ok = records[1]
        assert (latest_ok["size"], latest_ok["request_id"]) == (5, "req-1")
        assert latest_ok["sha256"] == hashlib.sha256(b"12345").hexdigest()
        assert latest_ok["locations"] == ["filemanager://p1/x"]
        refused = records[0]
        assert (refused["size"], refused["sha256"]) == (
            1,
            hashlib.sha256(b"1").hexdigest(),
        )

    def test_uploads_in_flight_are_capped_per_key(self, start_gateway):
        """With one upload of a key still streaming, the next one is 429."""
        gateway = start_gateway(uploads_in_flight=1, **FAST)
        _, token = gateway.make_key(
            grants=(("big/", ("filemanager://p1/big/",), BINARY),)
        )
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, token, "big/slow", 4 * MiB))
            sock.sendall(b"s" * MiB)
            time.sleep(0.3)
            response = post(gateway, token, "big/other", b"x")
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
        # Once the first client is gone, its slot is free again.
        deadline = time.monotonic() + 5
        while post(gateway, token, "big/other", b"x").status != 200:
            assert time.monotonic() < deadline, "the in-flight slot was never released"
            time.sleep(0.05)


class TestContainment:
    """A symbolic link in the File Manager cannot lead a publish outside it."""

    def test_no_folder_is_made_through_a_link_that_leaves_the_root(
        self, gateway, tmp_path
    ):
        """The refused publish creates nothing beyond the link."""
        outside = tmp_path / "outside"
        outside.mkdir()
        project = gateway.filemanager / "p1"
        project.mkdir(parents=True)
        (project / "link").symlink_to(outside)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/link/deep/x",), BINARY),)
        )
        response = post(gateway, token, "x", b"data")
        assert response.status == 500
        assert list(outside.iterdir()) == []


class TestFoldersMadeOnCommit:
    """Folders on the way to a file are made only when it is committed."""

    def test_a_refused_upload_makes_no_folders(self, gateway):
        """A wrong digest deep in a new tree leaves the tree unmade."""
        _, token = gateway.make_key(grants=(("x/", ("filemanager://p1/x/",), BINARY),))
        gateway.filemanager.joinpath("p1/x").mkdir(parents=True)
        response = post(
            gateway,
            token,
            "x/n1/n2/n3/f.bin",
            b"abc",
            **{"X-Checksum-SHA256": "00" * 32},
        )
        assert response.status == 400
        assert list(gateway.filemanager.joinpath("p1/x").iterdir()) == []

    def test_a_published_file_gets_its_folders(self, gateway):
        """The same upload with no digest lands, folders and all."""
        _, token = gateway.make_key(grants=(("x/", ("filemanager://p1/x/",), BINARY),))
        assert post(gateway, token, "x/n1/n2/n3/f.bin", b"abc").status == 200
        assert (
            gateway.filemanager.joinpath("p1/x/n1/n2/n3/f.bin").read_bytes() == b"abc"
        )


class TestDigestHeaders:
    """Both digest headers are checked, and must agree."""

    def test_disagreeing_digest_headers_are_400(self, gateway):
        """A right Content-Digest does not excuse a wrong X-Checksum-SHA256."""
        _, token = gateway.make_key(grants=(("x", ("filemanager://p1/x",), BINARY),))
        good = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
        response = post(
            gateway,
            token,
            "x",
            b"abc",
            **{"Content-Digest": f"sha-256=:{good}:", "X-Checksum-SHA256": "00" * 32},
        )
        assert response.status == 400
        assert not (gateway.filemanager / "p1/x").exists()

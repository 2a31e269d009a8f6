"""The installed ``dais-gateway`` command, end to end, as an admin uses it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import urllib3

from tests.upstream import Upstream

pytestmark = pytest.mark.integration

COMMAND = shutil.which("dais-gateway") or str(
    Path(sys.executable).parent / "dais-gateway"
)


def command(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``dais-gateway --home HOME ARGS...`` and return how it ended."""
    return subprocess.run(
        [COMMAND, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run(home: Path, *args: str) -> str:
    """Run an admin command and return what it printed."""
    done = command(home, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(home: Path, *args: str) -> str:
    """Run a command that must be refused (exit status 2); return its message."""
    done = command(home, *args)
    assert done.returncode == 2, done.stdout
    return done.stderr


@contextlib.contextmanager
def serving(
    home: Path, *options: str, file_size_limit: int | None = None
) -> Iterator[str]:
    """Run ``dais-gateway serve`` on a free port; yield the line it announces."""
    with serving_process(home, *options, file_size_limit=file_size_limit) as (
        line,
        _,
    ):
        yield line


@contextlib.contextmanager
def serving_process(
    home: Path, *options: str, file_size_limit: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``dais-gateway serve``; yield the line it announces and the process.

    The process is stopped with SIGTERM afterwards and must exit cleanly;
    one that does not is killed, so that no test leaves a server behind.
    ``file_size_limit`` caps the size of any file it writes (``RLIMIT_FSIZE``),
    so that its writes past that size fail as on a full disk.
    """

    def cap_file_size() -> None:
        if file_size_limit is not None:
            limit = (file_size_limit, file_size_limit)
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    process = subprocess.Popen(
        [COMMAND, "--home", str(home), "serve", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=cap_file_size,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("dais gateway on http://127.0.0.1:"), line
        yield line, process
    finally:
        if process.poll() is None:  # a test may have stopped it already
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        assert status == 0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``dais-gateway serve`` in a child process on a free port."""
    home = tmp_path / "home"
    run(home, "keys", "list", "--json")
    with serving(home) as line:
        yield home, line.split()[3]


class TestAdminCommands:
    """Keys, permissions, grants and services from the command line."""

    def test_keys_create_prints_the_secret_once(self, tmp_path):
        """create --json prints id and key; list never shows the secret."""
        home = tmp_path / "home"
        created = json.loads(
            run(
                home,
                "keys",
                "create",
                "--project",
                "p1",
                "--label",
                "nightly",
                "--requestor",
                "a@example.org",
                "--approver",
                "b@example.org",
                "--case-code",
                "C-7",
                "--lighthouse",
                "--business-case",
                "exports",
                "--json",
            )
        )
        assert set(created) == {"id", "key"}
        assert created["key"].startswith(f"dais_{created['id']}_")
        listed = run(home, "keys", "list", "--project", "p1", "--json")
        assert created["key"] not in listed
        assert created["key"].split("_")[2][:32] not in listed
        (item,) = json.loads(listed)
        assert item["id"] == created["id"]
        assert (item["case_code"], item["lighthouse"], item["label"]) == (
            "C-7",
            True,
            "nightly",
        )
        assert json.loads(run(home, "keys", "list", "--project", "p2", "--json")) == []

    def test_a_whole_key_pasted_for_its_id_is_read_as_the_id(self, tmp_path):
        """``keys revoke <key>`` revokes that key and prints its id, never the key."""
        home = tmp_path / "home"
        created = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))
        printed = run(home, "keys", "revoke", created["key"])
        assert printed.strip() == f"revoked {created['id']}"
        (item,) = json.loads(run(home, "keys", "list", "--project", "p1", "--json"))
        assert item["revoked"] is not None
        damaged = created["key"][:-1] + ("0" if created["key"][-1] != "0" else "1")
        done = command(home, "keys", "revoke", damaged)
        assert done.returncode == 2
        assert created["key"].split("_")[2][:32] not in done.stderr + done.stdout

    @pytest.mark.parametrize(
        ("args", "said"),
        [
            (("keys", "create", "--project", "p1", "--expires-days", "0"), "above 0"),
            (("keys", "create", "--project", "p1", "--expires-days", "-1"), "above 0"),
            (("keys", "create", "--project", "p1", "--expires-days", "nan"), "above 0"),
            (
                ("admins", "create", "--role", "platform", "--project", "p1"),
                "a platform admin has no project",
            ),
        ],
        ids=["expires-now", "expired", "expires-nan", "platform-with-project"],
    )
    def test_a_request_that_would_mean_something_else_is_refused(
        self, tmp_path, args, said
    ):
        """No key that never expires for 0 days, no platform admin 'of' a project."""
        home = tmp_path / "home"
        assert said in refused(home, *args)
        assert json.loads(run(home, "keys", "list", "--json")) == []

    def test_the_database_holds_only_a_hash(self, tmp_path):
        """The secret is nowhere in the SQLite file."""
        home = tmp_path / "home"
        created = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))
        secret = created["key"].split("_")[2][:32]
        dump = "\n".join(sqlite3.connect(home / "dais.sqlite3").iterdump())
        assert created["id"] in dump
        assert secret not in dump

    def test_bad_input_is_refused_with_a_message(self, tmp_path):
        """An unsafe grant location exits non-zero and says why."""
        home = tmp_path / "home"
        key_id = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))[
            "id"
        ]
        message = refused(
            home,
            "grants",
            "add",
            key_id,
            "--resource",
            "x",
            "--to",
            "filemanager://p1/../../etc/x",
        )
        assert "dot segment" in message

    def test_a_new_store_is_announced_once(self, tmp_path):
        """A store URL that names no file yet says so: a typo shows in the log."""
        home = tmp_path / "home"
        argv = [COMMAND, "--home", str(home), "keys", "list"]
        env = {**os.environ, "DAIS_LOG_LEVEL": "INFO"}
        first, again = (
            subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
            for _ in range(2)
        )
        assert "created a new, empty key store" in first.stderr
        assert "created a new" not in again.stderr

    @pytest.mark.parametrize(
        ("label", "said"),
        [
            ("\x1b]0;owned\x07", "control or invisible characters"),
            (os.fsdecode(b"\xff\xfe"), "not valid Unicode"),
            ("n" * 201, "longer than 200"),
        ],
        ids=["terminal-escape", "undecodable", "too-long"],
    )
    def test_a_key_label_is_checked(self, tmp_path, label, said):
        """A label that could rewrite the terminal listing it is refused in one line."""
        message = refused(
            tmp_path / "home", "keys", "create", "--project", "p1", "--label", label
        )
        assert said in message
        assert "Traceback" not in message

    def test_changes_made_here_are_audited(self, tmp_path):
        """Each change names the command line's user, as the API names an admin."""
        from dais_adapters.sqlite import SqliteStore

        home = tmp_path / "home"
        key_id = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))[
            "id"
        ]
        where = ["--project", "p1", "--lineage-version", "3", "--service", "svc"]
        run(home, "services", "add", *where, "--url", "http://127.0.0.1:9")
        permit = ["--project", "p1", "--service", "svc", "--prefix", "/"]
        run(home, "permissions", "add", key_id, *permit)
        run(home, "services", "remove", *where)
        admin_id = json.loads(
            run(home, "admins", "create", "--role", "platform", "--json")
        )["id"]
        run(home, "admins", "revoke", admin_id)
        run(home, "keys", "revoke", key_id)
        store = SqliteStore(home / "dais.sqlite3")
        try:
            actions = [(r.action, r.target) for r in reversed(store.audit())]
            actors = {r.actor for r in store.audit()}
        finally:
            store.close()
        assert actions == [
            ("key.create", key_id),
            ("service.add", "p1/svc"),
            ("permission.add", key_id),
            ("service.remove", "p1/svc"),
            ("admin.create", admin_id),
            ("admin.revoke", admin_id),
            ("key.revoke", key_id),
        ]
        assert len(actors) == 1
        assert next(iter(actors)).startswith("cli:")

    def test_a_service_is_removed_once(self, tmp_path):
        """``services remove`` takes it out; a second time says it is not there."""
        home = tmp_path / "home"
        where = ["--project", "p1", "--lineage-version", "3", "--service", "svc"]
        run(home, "services", "add", *where, "--url", "http://127.0.0.1:9")
        assert run(home, "services", "remove", *where).strip() == "p1 v3 svc removed"
        assert "no service 'svc' at p1 v3" in refused(
            home, "services", "remove", *where
        )

    def test_a_location_no_storage_serves_is_refused(self, tmp_path):
        """A grant to ``foo://`` would fail every upload: it is refused at once."""
        home = tmp_path / "home"
        key_id = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))[
            "id"
        ]
        grant = ("grants", "add", key_id, "--resource", "x", "--to")
        message = refused(home, *grant, "foo://x/w")
        assert "no storage serves foo:// locations" in message
        assert "filemanager://" in message
        assert "may publish" in run(home, *grant, "filemanager://p1/x")


class TestServe:
    """The served gateway uses what the admin commands stored."""

    def test_upload_webhook_and_revoke(self, served, tmp_path):
        """Set up by CLI, publish and call a webhook, revoke, then be refused."""
        home, base = served
        upstream = Upstream()
        try:
            key_id, token = key_for_service(home, upstream.url, "/api/webhook")
            run(
                home,
                "grants",
                "add",
                key_id,
                "--resource",
                "dirOne/x.csv",
                "--to",
                "filemanager://p1/inputs/x.csv",
                "--type",
                "csv",
            )
            source = tmp_path / "x.csv"
            source.write_text("a,b\n1,2\n")
            http = urllib3.PoolManager(retries=False)
            auth = {"Authorization": f"Bearer {token}"}

            published = http.request(
                "POST",
                f"{base}/integration/v1/resources/dirOne/x.csv",
                fields={"data": ("x.csv", source.read_bytes(), "text/csv")},
                headers=auth,
            )
            assert published.status == 200, published.data
            assert (
                home / "filemanager/p1/inputs/x.csv"
            ).read_bytes() == source.read_bytes()

            hook = f"{base}/project-gateway/webhooks/p1/lineage-version/latest/svc/api/webhook"
            assert http.request("POST", hook, body=b"hi", headers=auth).status == 200
            assert upstream.calls[-1].body == b"hi"

            run(home, "keys", "revoke", key_id)
            # Another process revoked it: the cache may keep it for at most
            # its degraded TTL (1 s).
            revoked_at = time.monotonic()
            while http.request("POST", hook, body=b"hi", headers=auth).status != 401:
                # 1 s of cache, plus slack for a loaded machine.
                assert time.monotonic() - revoked_at < 2.5, "revocation not enforced"
                time.sleep(0.05)
            calls_before_refusal = len(upstream.calls)
            assert http.request("POST", hook, body=b"hi", headers=auth).status == 401
            assert len(upstream.calls) == calls_before_refusal
        finally:
            upstream.close()

    def test_a_write_refused_mid_publish_changes_no_location(self, tmp_path, bucket):
        """A full disk at the second location rolls back the first: a 500 as told.

        The File Manager's disk refuses the file's last bytes (a cap on the
        file size stands in for a full disk) after the S3 copy committed.
        """
        home = tmp_path / "home"
        created = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))
        first, second = f"s3://{bucket}/x", "filemanager://p1/x"
        to = ["--to", first, "--to", second]
        run(home, "grants", "add", str(created["id"]), "--resource", "x", *to)
        http = urllib3.PoolManager(retries=False)
        auth = {"Authorization": f"Bearer {created['key']}"}
        cap = 8 * 1024 * 1024

        with serving(home, "--upload-rate", "100", file_size_limit=cap) as line:
            url = f"{line.split()[3]}/integration/v1/resources/x"

            def post(content: bytes) -> Any:
                fields = {"data": ("x", content, "application/octet-stream")}
                return http.request("POST", url, fields=fields, headers=auth)

            assert post(b"old").status == 200
            refused_publish = post(b"n" * (cap + 5))

        assert refused_publish.status == 500, refused_publish.data
        body = refused_publish.json()
        assert body["error"] == "publish_failed"
        outcomes = [o["outcome"] for o in body["locations"]]
        assert outcomes == ["rolled_back", "failed"]
        assert "File too large" in body["locations"][1]["reason"]
        s3 = boto3.session.Session().client("s3")
        assert s3.get_object(Bucket=bucket, Key="x")["Body"].read() == b"old"
        assert (home / "filemanager/p1/x").read_bytes() == b"old"
        assert list((home / "filemanager/.dais-staging").iterdir()) == []

    def test_a_killed_uploads_copy_goes_at_start_whatever_the_deadline(self, tmp_path):
        """An unlocked staged copy has no writer: it goes; a .prev waits its age."""
        home = tmp_path / "home"
        staging = home / "filemanager" / ".dais-staging"
        staging.mkdir(parents=True)
        (staging / "0123.part").write_bytes(b"half an upload")
        # A rollback copy may belong to another gateway's commit in flight.
        (staging / "89ab.prev").write_bytes(b"the file before a commit")
        time.sleep(2.5)
        with serving(home):
            assert [p.name for p in staging.iterdir()] == ["89ab.prev"]

    def test_a_killed_uploads_fresh_copy_goes_soon_after_a_quick_restart(
        self, tmp_path
    ):
        """Too fresh for the start-up sweep, it goes at the first one after."""
        home = tmp_path / "home"
        staging = home / "filemanager" / ".dais-staging"
        staging.mkdir(parents=True)
        dead = staging / "0123.part"
        dead.write_bytes(b"half an upload, written to a moment ago")
        with serving(home):
            deadline = time.monotonic() + 15
            while dead.exists():
                assert time.monotonic() < deadline, "the dead copy was never swept"
                time.sleep(0.2)

    def test_stale_staging_files_are_swept_at_start(self, tmp_path):
        """A killed process's staged file goes at start; a live one stays."""
        home = tmp_path / "home"
        staging = home / "filemanager" / ".dais-staging"
        staging.mkdir(parents=True)
        (staging / "0123.part").write_bytes(b"half an upload")
        # Left by a process that died: older than any request may last (2 s here).
        time.sleep(2.5)
        fresh = staging / "4567.part"
        fresh.write_bytes(b"another gateway's upload in flight")
        with serving(home, "--request-timeout", "2"):
            assert list(staging.iterdir()) == [fresh]

    def test_stale_staging_files_are_swept_while_serving(self, tmp_path):
        """Another gateway's copy, idle past the deadline, goes without a restart."""
        home = tmp_path / "home"
        staging = home / "filemanager" / ".dais-staging"
        staging.mkdir(parents=True)
        with serving(home, "--request-timeout", "1"):
            # Written after the start-up sweep, by a gateway that then died.
            dead = staging / "0123.part"
            dead.write_bytes(b"half an upload")
            alive = staging / "4567.part"
            deadline = time.monotonic() + 10
            while dead.exists():
                assert time.monotonic() < deadline, "the stale copy was never swept"
                # An upload in flight writes to its copy all the time.
                alive.write_bytes(b"another gateway's upload in flight")
                time.sleep(0.1)
            assert list(staging.iterdir()) == [alive]


def refusal_time(base: str) -> float:
    """Return how soon a server at ``base`` refuses connections (at most 5 s)."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    while time.monotonic() - started < 5:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break  # reset: queued as the last listener closed
        time.sleep(0.05)
    return time.monotonic() - started


def key_for_service(home: Path, url: str, prefix: str = "/") -> tuple[str, str]:
    """Register ``svc`` of project p1 at ``url``; return a key that may call it.

    Returns:
        The key's id and its token.
    """
    created = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))
    key_id = str(created["id"])
    permission = ["--project", "p1", "--service", "svc", "--prefix", prefix]
    run(home, "permissions", "add", key_id, *permission)
    service = ["--project", "p1", "--lineage-version", "1", "--service", "svc"]
    run(home, "services", "add", *service, "--url", url)
    return key_id, str(created["key"])


class TestOutputClosed:
    """A reader that goes away early (``| head``) is no error worth a trace."""

    def test_a_closed_pipe_ends_the_listing_quietly(self, tmp_path):
        """``keys list --json`` into a pipe nobody reads exits 1, no traceback."""
        home = tmp_path / "home"
        run(home, "keys", "create", "--project", "p1")
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run(
                [COMMAND, "--home", str(home), "keys", "list", "--json"],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr


class TestSettingsChecked:
    """A setting no server could work with is refused before serving."""

    @pytest.mark.parametrize(
        ("option", "value", "said"),
        [
            ("--port", "70000", "'port' must be <= 65535"),
            ("--port", "-1", "'port' must be >= 0"),
            ("--threads", "0", "'threads' must be >= 1"),
            ("--connection-limit", "0", "'connection_limit' must be >= 1"),
            ("--upload-rate", "0", "a rate reads"),
            ("--upload-rate", "1/0", "a rate reads"),
            ("--gateway-rate", "5,burst=0", "a rate reads"),
            ("--uploads-in-flight", "-1", "'uploads_in_flight' must be >= 0"),
            ("--gateway-in-flight", "-1", "'gateway_in_flight' must be >= 0"),
            ("--max-upload-bytes", "-1", "'max_upload_bytes' must be >= 1"),
            ("--connect-timeout", "-1", "'connect_timeout' must be seconds above 0"),
            ("--read-timeout", "inf", "'read_timeout' must be seconds above 0"),
            ("--read-timeout", "1e300", "'read_timeout' must be seconds above 0"),
            ("--request-timeout", "1e10", "at most a day"),
            ("--workers", "0", "a number from 1 to 256"),
            ("--workers", "-3", "a number from 1 to 256"),
            ("--workers", "1000", "a number from 1 to 256"),
            ("--request-timeout", "0", "'request_timeout' must be seconds above 0"),
            ("--request-timeout", "nan", "'request_timeout' must be seconds above 0"),
            ("--host", "999.1.1.1", "cannot listen on 999.1.1.1"),
            ("--throttle", "redis://[::1/0", "malformed Redis throttle URL"),
            ("--throttle", "redis://127.0.0.1:6379/abc", "database as /N"),
            ("--throttle", "redis://127.0.0.1:99999/0", "Port out of range"),
            ("--throttle", "redis://127.0.0.1:6379/99", "DB index is out of range"),
        ],
    )
    def test_a_setting_out_of_range_is_refused(self, tmp_path, option, value, said):
        """One line naming the setting, exit status 2, no traceback."""
        message = refused(tmp_path / "home", "serve", "--port", "0", option, value)
        assert said in message
        assert "Traceback" not in message

    @pytest.mark.parametrize(
        ("where", "said"),
        [
            ("home-is-a-file", "File exists"),
            ("under-a-file", "Not a directory"),
        ],
    )
    def test_a_home_that_cannot_be_made_is_refused(self, tmp_path, where, said):
        """A home (or store folder) that cannot be a folder: one line, exit 2."""
        afile = tmp_path / "afile"
        afile.write_text("not a folder")
        home = afile if where == "home-is-a-file" else afile / "home"
        message = refused(home, "keys", "list")
        assert "cannot make the key store's folder" in message
        assert said in message
        assert "Traceback" not in message

    @pytest.mark.parametrize("level", ["debug", "Warning"])
    def test_the_log_level_is_read_in_any_case(self, tmp_path, level):
        """``DAIS_LOG_LEVEL=debug`` is DEBUG."""
        done = subprocess.run(
            [COMMAND, "--home", str(tmp_path / "home"), "keys", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DAIS_LOG_LEVEL": level},
        )
        assert done.returncode == 0, done.stderr

    def test_an_unknown_log_level_is_a_clear_error(self, tmp_path):
        """A level logging does not know is refused in one line."""
        done = subprocess.run(
            [COMMAND, "--home", str(tmp_path / "home"), "keys", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DAIS_LOG_LEVEL": "chatty"},
        )
        assert done.returncode == 2
        assert "DAIS_LOG_LEVEL" in done.stderr
        assert "Traceback" not in done.stderr


class TestForwarderChoice:
    """``serve --forwarder`` picks the HTTP client for webhook calls."""

    @pytest.mark.parametrize(
        ("forwarder", "query"), [("curl", 'q="'), ("urllib3", "q=%22")]
    )
    def test_the_chosen_client_forwards(self, tmp_path, forwarder, query):
        """A query with a '"' shows which client made the call: urllib3 escapes it."""
        home = tmp_path / "home"
        upstream = Upstream()
        try:
            _, token = key_for_service(home, upstream.url)
            with serving(home, "--forwarder", forwarder) as line:
                host, port = line.split()[3].removeprefix("http://").split(":")
                connection = http.client.HTTPConnection(host, int(port), timeout=10)
                connection.request(
                    "POST",
                    '/project-gateway/webhooks/p1/lineage-version/1/svc/x?q="',
                    b"hi",
                    {"Authorization": f"Bearer {token}"},
                )
                assert connection.getresponse().status == 200
                connection.close()
        finally:
            upstream.close()
        assert upstream.calls[-1].target == f"/x?{query}"

    def test_a_slow_upstream_times_out_after_the_read_timeout(self, tmp_path):
        """``--read-timeout`` bounds how long a stalled upstream holds a call."""
        home = tmp_path / "home"
        upstream = Upstream()
        upstream.delay = 3.0
        try:
            _, token = key_for_service(home, upstream.url)
            with serving(home, "--read-timeout", "1") as line:
                base = line.split()[3]
                started = time.monotonic()
                answer = urllib3.PoolManager(retries=False).request(
                    "GET",
                    f"{base}/project-gateway/webhooks/p1/lineage-version/1/svc/x",
                    headers={"Authorization": f"Bearer {token}"},
                )
                waited = time.monotonic() - started
        finally:
            upstream.close()
        assert (answer.status, answer.json()["error"]) == (504, "upstream_timeout")
        assert waited < 2.9

    def test_a_signal_right_after_the_announcement_stops_cleanly(self, tmp_path):
        """SIGTERM or SIGINT as soon as the address is printed: exit status 0."""
        home = tmp_path / "home"
        run(home, "keys", "list", "--json")
        for signum in (signal.SIGTERM, signal.SIGINT) * 3:
            process = subprocess.Popen(
                [COMMAND, "--home", str(home), "serve", "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert process.stdout is not None
            assert process.stdout.readline().startswith("dais gateway on ")
            process.send_signal(signum)
            _, errors = process.communicate(timeout=30)
            assert process.returncode == 0, errors
            assert "Traceback" not in errors

    @pytest.mark.parametrize("workers", [1, 2])
    def test_a_stop_answers_the_calls_in_flight_first(self, tmp_path, workers):
        """SIGTERM mid-call: the caller gets the upstream's answer, then exit 0."""
        home = tmp_path / "home"
        upstream = Upstream()
        upstream.delay = 1.5
        options = ["--workers", str(workers)]
        if workers > 1:
            options += ["--throttle", "redis://127.0.0.1:6379/0"]
        try:
            _, token = key_for_service(home, upstream.url)
            with serving_process(home, *options) as (line, process):
                base = line.split()[3]
                http = urllib3.PoolManager(retries=False)
                hook = f"{base}/project-gateway/webhooks/p1/lineage-version/1/svc/x"
                auth = {"Authorization": f"Bearer {token}"}
                with concurrent.futures.ThreadPoolExecutor(3) as pool:
                    calls = [
                        pool.submit(
                            http.request, "POST", hook, body=b"hi", headers=auth
                        )
                        for _ in range(3)
                    ]
                    deadline = time.monotonic() + 10
                    while len(upstream.calls) < 3 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    process.send_signal(signal.SIGTERM)
                    refused_at = refusal_time(base)
                    statuses = [call.result(timeout=30).status for call in calls]
                assert process.wait(timeout=30) == 0
        finally:
            upstream.close()
        assert statuses == [200, 200, 200]
        assert refused_at < 5, "new connections were still taken while stopping"

    def test_an_unknown_client_is_refused(self, tmp_path):
        """Only the clients that exist can be named."""
        message = refused(tmp_path, "serve", "--forwarder", "wget")
        assert "invalid choice: 'wget'" in message


class TestDemo:
    """``dais-gateway demo``: a working gateway, then its key revoked."""

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
    def test_the_demo_serves_and_revokes_its_key_when_stopped(self, tmp_path, signum):
        """The printed key calls the sample service; a stop signal revokes it."""
        home = tmp_path / "home"
        process, printed = start_demo(home)
        try:
            base = re.search(r"gateway on (http://\S+),", printed).group(1)
            token = re.search(r"Bearer (dais_\w+)", printed).group(1)
            answer = urllib3.PoolManager(retries=False).request(
                "POST",
                f"{base}/project-gateway/webhooks/demo/lineage-version/latest"
                "/scheduler/api/webhooks/schedule?at=now",
                body=b"{}",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert answer.status == 202
        finally:
            process.send_signal(signum)
            assert process.wait(timeout=30) == 0
        keys = json.loads(run(home, "keys", "list", "--json"))
        assert [k["revoked"] is not None for k in keys] == [True]

    def test_a_killed_demos_key_is_revoked_by_the_next_demo(self, tmp_path):
        """SIGKILL leaves no chance to revoke: the next demo does it first."""
        home = tmp_path / "home"
        for signum in (signal.SIGKILL, signal.SIGTERM):
            process, printed = start_demo(home)
            process.send_signal(signum)
            process.wait(timeout=30)
            process.stdout.close()
        assert "left by a demo that was killed" in printed
        keys = json.loads(run(home, "keys", "list", "--json"))
        assert [k["state"] for k in keys] == ["revoked", "revoked"]


def start_demo(home: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``dais-gateway demo``; return it and all it printed up to Ctrl-C."""
    process = subprocess.Popen(
        [COMMAND, "--home", str(home), "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    printed = ""
    while "Press Ctrl-C" not in printed:
        line = process.stdout.readline()
        assert line, printed
        printed += line
    return process, printed


class TestExplain:
    """``explain`` says which permission matched, or why none did."""

    def test_allowed_and_refused_calls_are_explained(self, tmp_path):
        """A matching call names its permission; others say why not."""
        home = tmp_path / "home"
        key_id = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))[
            "id"
        ]
        run(
            home,
            "permissions",
            "add",
            key_id,
            "--project",
            "p1",
            "--service",
            "svc",
            "--prefix",
            "/api/webhook",
            "--method",
            "POST",
        )
        run(
            home,
            "services",
            "add",
            "--project",
            "p1",
            "--lineage-version",
            "2",
            "--service",
            "svc",
            "--url",
            "http://127.0.0.1:9/base",
        )
        base = "/project-gateway/webhooks/p1/lineage-version/latest/svc"
        allowed = json.loads(
            run(
                home,
                "explain",
                key_id,
                "POST",
                f"http://h{base}/api/web%68ook/x?a=1",
                "--json",
            )
        )
        assert allowed["allowed"] is True
        assert allowed["route"] == "/api/webhook/x"
        assert allowed["permission"]["prefix"] == "/api/webhook"
        assert allowed["upstream"] == "http://127.0.0.1:9/base/api/webhook/x?a=1"
        assert allowed["lineage_version"] == 2

        def refused(method: str, path: str) -> dict:
            done = subprocess.run(
                [
                    COMMAND,
                    "--home",
                    str(home),
                    "explain",
                    key_id,
                    method,
                    path,
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            return json.loads(done.stdout)

        wrong_method = refused("GET", f"{base}/api/webhook")
        assert wrong_method["status"] == 403
        assert wrong_method["considered"] == [
            "p1 svc /api/webhook (POST): method GET not allowed"
        ]
        outside = refused("POST", f"{base}/api/webhookx")
        assert outside["considered"] == [
            "p1 svc /api/webhook (POST): route not at or under the prefix"
        ]
        assert refused("POST", f"{base}/api/webhook/%2e%2e/x")["status"] == 400
        # Targets the server refuses before any key is looked at.
        assert refused("POST", f"{base}/api/webhook/x#f")["status"] == 400
        assert refused("POST", f"ftp://h{base}/api/webhook/x")["status"] == 400
        assert refused("POST", f"//h{base}/api/webhook/x")["status"] == 404
        lower_case = command(home, "explain", key_id, "post", f"{base}/api/webhook")
        assert lower_case.returncode == 2
        assert "not an HTTP method the gateway takes" in lower_case.stderr

        run(home, "keys", "revoke", key_id)
        revoked = refused("POST", f"{base}/api/webhook/x")
        assert (revoked["status"], revoked["reason"]) == (
            401,
            "the API key has been revoked",
        )
        text = command(home, "explain", key_id, "POST", f"{base}/api/webhook/x")
        assert text.stdout.startswith("refused (401): the API key has been revoked")


class TestAdminsCommand:
    """``admins create`` prints a token that opens the admin API."""

    def test_platform_and_project_tokens(self, tmp_path):
        """Both roles print an id and a daisadm_ token; a project needs --project."""
        home = tmp_path / "home"
        platform = json.loads(
            run(home, "admins", "create", "--role", "platform", "--json")
        )
        lead = json.loads(
            run(
                home,
                "admins",
                "create",
                "--role",
                "project",
                "--project",
                "p1",
                "--json",
            )
        )
        for made in (platform, lead):
            assert made["token"].startswith(f"daisadm_{made['id']}_")
        done = subprocess.run(
            [COMMAND, "--home", str(home), "admins", "create", "--role", "project"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "--project" in done.stderr


class TestWorkers:
    """``serve --workers N`` runs N processes on one port, one throttle."""

    def test_two_workers_share_the_port_and_the_throttle(self, tmp_path):
        """Uploads through either worker count against one rate; SIGTERM stops all."""
        home = tmp_path / "home"
        created = json.loads(run(home, "keys", "create", "--project", "p1", "--json"))
        run(
            home,
            "grants",
            "add",
            created["id"],
            "--resource",
            "x",
            "--to",
            "filemanager://p1/x",
        )
        throttle = ("--throttle", "redis://127.0.0.1:6379/0")
        with serving(home, "--workers", "2", *throttle) as line:
            assert line.endswith("(2 workers)\n"), line
            base = line.split()[3]
            http = urllib3.PoolManager(retries=False)
            deadline = time.monotonic() + 10
            while True:
                try:
                    if http.request("GET", f"{base}/healthz").status == 200:
                        break
                except urllib3.exceptions.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the workers never answered"
                time.sleep(0.1)
            statuses = [
                http.request(
                    "POST",
                    f"{base}/integration/v1/resources/x",
                    fields={"data": ("x", b"x", "application/octet-stream")},
                    headers={
                        "Authorization": f"Bearer {created['key']}",
                        "Connection": "close",
                    },
                ).status
                for _ in range(4)
            ]
            assert statuses.count(200) == 1 and statuses.count(429) == 3, statuses

    def test_a_worker_that_dies_is_replaced(self, tmp_path):
        """SIGKILL one worker: another takes its place; the stop is still clean."""
        home = tmp_path / "home"
        run(home, "keys", "list", "--json")
        throttle = ("--throttle", "redis://127.0.0.1:6379/0")
        with serving_process(home, "--workers", "2", *throttle) as (_, parent):
            first = wait_for_children(parent.pid, 2)
            os.kill(first[0], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while True:
                now = sorted(children_of(parent.pid))
                if len(now) == 2 and first[0] not in now:
                    break
                assert time.monotonic() < deadline, f"not replaced: {now}"
                time.sleep(0.1)
            assert first[1] in now

    def test_a_worker_that_cannot_stop_is_killed_and_the_port_freed(self, tmp_path):
        """A frozen worker holds the stop up to grace and margin, then is killed."""
        home = tmp_path / "home"
        run(home, "keys", "list", "--json")
        argv = [COMMAND, "--home", str(home), "serve", "--port", "0", "--workers", "2"]
        argv += ["--throttle", "redis://127.0.0.1:6379/0", "--shutdown-grace", "1"]
        parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        line = parent.stdout.readline()
        workers = wait_for_children(parent.pid, 2)
        for pid in workers:  # both running their server, past their start
            wait_for_state(pid, "S")
        os.kill(workers[0], signal.SIGSTOP)
        wait_for_state(workers[0], "T")
        parent.send_signal(signal.SIGTERM)
        try:
            status = parent.wait(timeout=30)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
            parent.stdout.close()
        assert status == 128 + signal.SIGKILL
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        assert refusal_time(line.split()[3]) < 1

    def test_a_stop_while_a_worker_restarts_stops_them_all(self, tmp_path):
        """SIGTERM right after a worker died: every worker ends, and the parent."""
        home = tmp_path / "home"
        run(home, "keys", "list", "--json")
        argv = [COMMAND, "--home", str(home), "serve", "--port", "0", "--workers", "2"]
        argv += ["--throttle", "redis://127.0.0.1:6379/0", "--shutdown-grace", "1"]
        for pause in (0.0, 0.1, 0.2):
            parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert parent.stdout is not None
            base = parent.stdout.readline().split()[3]
            workers = wait_for_children(parent.pid, 2)
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(pause)
            parent.send_signal(signal.SIGTERM)
            try:
                parent.wait(timeout=30)
            finally:
                if parent.poll() is None:
                    parent.kill()
                    parent.wait()
                parent.stdout.close()
            # A worker left running would still hold the port.
            assert refusal_time(base) < 1, f"a worker outlived the stop ({pause})"

    def test_workers_end_with_a_parent_killed_outright(self, tmp_path):
        """SIGKILL the parent: its workers stop too, and the port is free."""
        home = tmp_path / "home"
        run(home, "keys", "list", "--json")
        argv = [COMMAND, "--home", str(home), "serve", "--port", "0", "--workers", "2"]
        argv += ["--throttle", "redis://127.0.0.1:6379/0"]
        parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        line = parent.stdout.readline()
        workers = wait_for_children(parent.pid, 2)
        parent.kill()
        parent.wait()
        parent.stdout.close()
        deadline = time.monotonic() + 15
        while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
            if time.monotonic() > deadline:
                for pid in alive:  # ours: never leave one behind
                    os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the workers outlived the parent: {alive}")
            time.sleep(0.1)
        assert refusal_time(line.split()[3]) < 1

    def test_each_worker_keeps_to_a_cpu_of_its_own(self, tmp_path):
        """With ``auto`` affinity, worker i runs on the i-th CPU."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            pytest.skip("one CPU: nothing to spread the workers over")
        throttle = ("--throttle", "redis://127.0.0.1:6379/0")
        home = tmp_path / "home"
        with serving_process(home, "--workers", "2", *throttle) as (_, parent):
            deadline = time.monotonic() + 20
            while True:
                placed = sorted(thread_cpus(child) for child in children_of(parent.pid))
                if placed == [{cpus[0]}, {cpus[1]}]:
                    break
                assert time.monotonic() < deadline, placed
                time.sleep(0.1)

    def test_workers_without_a_shared_throttle_are_refused(self, tmp_path):
        """Several workers with the in-process throttle would admit N per second."""
        done = subprocess.run(
            [COMMAND, "--home", str(tmp_path / "home"), "serve", "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "shared throttle" in done.stderr


def thread_cpus(pid: int) -> set[int]:
    """Return the CPUs the threads of ``pid`` may run on (all threads alike)."""
    allowed = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):
            for line in status.read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    allowed.add(line.split(":", 1)[1].strip())
    assert len(allowed) == 1, f"threads of {pid} disagree: {allowed}"
    return cpu_list(allowed.pop())


def cpu_list(text: str) -> set[int]:
    """Parse a kernel CPU list such as ``0-2,5``."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def wait_for_state(pid: int, state: str) -> None:
    """Wait up to 10 s until process ``pid`` is in ``state`` (``S``, ``T``...)
    and has been for a moment: a worker still starting keeps busy."""
    deadline = time.monotonic() + 10
    steady = 0
    while steady < 3:
        stat = Path(f"/proc/{pid}/stat").read_text()
        steady = steady + 1 if stat.rpartition(")")[2].split()[0] == state else 0
        assert time.monotonic() < deadline, f"{pid} never stayed in state {state}"
        time.sleep(0.1)


def wait_for_children(pid: int, count: int) -> list[int]:
    """Wait up to 10 s until ``pid`` has ``count`` children; return them, sorted."""
    deadline = time.monotonic() + 10
    while len(found := sorted(children_of(pid))) < count:
        assert time.monotonic() < deadline, f"only {found}"
        time.sleep(0.05)
    return found


def children_of(pid: int) -> list[int]:
    """Return the PIDs of the processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class TestCpuAffinity:
    """``serve`` keeps its threads on one CPU unless told otherwise."""

    @pytest.fixture(autouse=True)
    def _two_cpus(self) -> None:
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("one CPU: there is no choice to make")

    def test_auto_keeps_every_thread_on_one_cpu(self, tmp_path):
        """By default every thread of the server shares one CPU."""
        with serving_process(tmp_path / "home") as (_, process):
            assert len(thread_cpus(process.pid)) == 1

    def test_a_named_cpu_is_the_one_used(self, tmp_path):
        """``--cpu-affinity N`` keeps the server on CPU N."""
        last = max(os.sched_getaffinity(0))
        options = ("--cpu-affinity", str(last))
        with serving_process(tmp_path / "home", *options) as (_, process):
            assert thread_cpus(process.pid) == {last}

    def test_off_leaves_placement_to_the_system(self, tmp_path):
        """``--cpu-affinity off`` leaves every thread free to move."""
        options = ("--cpu-affinity", "off")
        with serving_process(tmp_path / "home", *options) as (_, process):
            assert thread_cpus(process.pid) == os.sched_getaffinity(0)

    def test_a_cpu_the_server_may_not_use_is_refused(self, tmp_path):
        """A CPU outside the allowed set is a clear error, not a crash."""
        unusable = max(os.sched_getaffinity(0)) + 1
        message = refused(tmp_path / "home", "serve", "--cpu-affinity", str(unusable))
        assert f"CPU {unusable} is not one this process may use" in message

    @pytest.mark.parametrize(
        "value", ["fast", "-1", "\u00b2"], ids=["word", "negative", "superscript-2"]
    )
    def test_a_malformed_setting_is_refused(self, tmp_path, value):
        """Anything but auto, off or an ASCII number is refused by the parser."""
        message = refused(tmp_path / "home", "serve", "--cpu-affinity", value)
        assert "auto, off or a CPU number" in message

    @pytest.mark.parametrize(
        ("variable", "value"),
        [("DAIS_CPU_AFFINITY", "abc"), ("DAIS_FORWARDER", "xyz")],
    )
    def test_a_malformed_environment_value_is_a_clear_error(
        self, tmp_path, variable, value
    ):
        """A bad value from the environment is refused in one line, no traceback."""
        done = subprocess.run(
            [COMMAND, "--home", str(tmp_path / "home"), "serve", "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, variable: value},
        )
        assert done.returncode == 2, done.stderr
        assert "invalid configuration" in done.stderr
        assert "Traceback" not in done.stderr

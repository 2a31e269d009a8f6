"""One contract for every key store: SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dais_adapters.cache import BatchRecorder, CachedKeyStore
from dais_adapters.postgres import _MIGRATIONS as PG_MIGRATIONS
from dais_adapters.postgres import PostgresStore
from dais_adapters.sqlite import SqliteStore
from dais_core.errors import InvalidData, NotFound, Unavailable
from dais_core.keys import new_key
from dais_core.values import (
    ApiKey,
    DataType,
    ForwardRecord,
    Grant,
    KeyRequest,
    Permission,
    PublishRecord,
    ServiceEndpoint,
)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each key store, empty."""
    if request.param == "sqlite":
        yield SqliteStore(tmp_path / "keys.sqlite3")
        return
    url = request.getfixturevalue("pg_url")
    made = PostgresStore(url, pool_size=4)
    yield made
    made.close()


def a_key(project: str = "p1", **changes: Any) -> tuple[ApiKey, str]:
    made = new_key()
    key = ApiKey(
        made.id,
        made.secret_hash,
        project,
        "label",
        KeyRequest("req@x", "app@x", ("a1", "a2"), "C-1", True, "because"),
        1000.0,
        changes.get("expires"),
    )
    return key, made.token


class TestKeys:
    """Keys round-trip with their metadata; only the hash is stored."""

    def test_a_key_round_trips(self, store):
        """What was added is what load returns."""
        key, _ = a_key()
        store.add_key(key)
        loaded = store.load(key.id)
        assert loaded.key == key
        assert (loaded.permissions, loaded.grants) == ((), ())

    def test_an_unknown_key_is_none(self, store):
        """load of an id never added is None."""
        assert store.load("0123456789abcdef") is None

    def test_a_duplicate_id_is_refused(self, store):
        """Adding the same id twice is a conflict, not an overwrite."""
        key, _ = a_key()
        store.add_key(key)
        with pytest.raises(InvalidData):
            store.add_key(key)

    def test_revoke_marks_once(self, store):
        """The first revocation time stays; an unknown id is NotFound."""
        key, _ = a_key()
        store.add_key(key)
        store.revoke(key.id, 2000.0)
        store.revoke(key.id, 3000.0)
        assert store.load(key.id).key.revoked == 2000.0
        with pytest.raises(NotFound):
            store.revoke("ffffffffffffffff", 1.0)

    def test_list_keys_by_project(self, store):
        """A project sees its own keys only."""
        mine, _ = a_key("p1")
        theirs, _ = a_key("p2")
        store.add_key(mine)
        store.add_key(theirs)
        assert [c.key.id for c in store.list_keys("p1")] == [mine.id]
        assert {c.key.id for c in store.list_keys()} == {mine.id, theirs.id}


class TestPermissionsAndGrants:
    """Permissions and grants belong to a key."""

    def test_permissions_and_grants_load_with_the_key(self, store):
        """Both come back in insertion order; duplicates are ignored."""
        key, _ = a_key()
        store.add_key(key)
        first = Permission("p1", "svc", "/api", frozenset({"POST", "PUT"}))
        second = Permission("p1", "svc", "/other")
        for permission in (first, second, first):
            store.add_permission(key.id, permission)
        grant = Grant("dir/", ("filemanager://p1/in/", "s3://b/in/"), DataType.CSV)
        store.add_grant(key.id, grant)
        loaded = store.load(key.id)
        assert loaded.permissions == (first, second)
        assert loaded.grants == (grant,)

    def test_a_grant_for_the_same_resource_is_replaced(self, store):
        """Adding a grant again changes its locations and type."""
        key, _ = a_key()
        store.add_key(key)
        store.add_grant(key.id, Grant("x", ("filemanager://p1/x",)))
        store.add_grant(key.id, Grant("x", ("filemanager://p1/y",), DataType.SQLITE))
        assert store.load(key.id).grants == (
            Grant("x", ("filemanager://p1/y",), DataType.SQLITE),
        )

    def test_the_keys_reaching_a_project_are_found_through_both(self, store):
        """Its own, and others' with a permission or File Manager grant in it."""
        own, _ = a_key("q_1")
        by_permission, _ = a_key("p2")
        by_grant, _ = a_key("p2")
        look_alike, _ = a_key("p2")
        other_case, _ = a_key("p2")
        for key in (own, by_permission, by_grant, look_alike, other_case):
            store.add_key(key)
        store.add_permission(by_permission.id, Permission("q_1", "svc", "/"))
        store.add_grant(by_grant.id, Grant("x", ("s3://b/x", "filemanager://q_1/x")))
        store.add_grant(look_alike.id, Grant("x", ("filemanager://qx1/x",)))
        store.add_grant(other_case.id, Grant("x", ("filemanager://Q_1/x",)))
        found = {credential.key.id for credential in store.keys_reaching("q_1")}
        assert found == {own.id, by_permission.id, by_grant.id}

    def test_an_unknown_key_gets_nothing(self, store):
        """Permissions and grants need an existing key."""
        with pytest.raises(NotFound):
            store.add_permission("ffffffffffffffff", Permission("p", "s", "/"))
        with pytest.raises(NotFound):
            store.add_grant("ffffffffffffffff", Grant("x", ("filemanager://p/x",)))


class TestServices:
    """The registry keeps one base URL per project, version and service."""

    def test_services_are_listed_per_project_and_moved_in_place(self, store):
        """A second registration of the same service moves it."""
        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))
        store.add_service(ServiceEndpoint("p1", 2, "svc", "http://127.0.0.1:2"))
        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:3"))
        store.add_service(ServiceEndpoint("p2", 1, "svc", "http://127.0.0.1:4"))
        assert sorted(store.endpoints("p1"), key=lambda e: e.lineage_version) == [
            ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:3"),
            ServiceEndpoint("p1", 2, "svc", "http://127.0.0.1:2"),
        ]
        assert store.endpoints("nobody") == []

    def test_a_removed_service_is_gone_and_cannot_go_twice(self, store):
        """Removal takes one version's service; the others stay."""
        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))
        store.add_service(ServiceEndpoint("p1", 2, "svc", "http://127.0.0.1:2"))
        store.remove_service("p1", 2, "svc")
        assert store.endpoints("p1") == [
            ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1")
        ]
        with pytest.raises(NotFound):
            store.remove_service("p1", 2, "svc")


class TestRecords:
    """Records are kept in batches with the key's latest use."""

    def test_a_batch_keeps_records_and_the_latest_use(self, store):
        """last_used is the newest record's time, never older."""
        key, _ = a_key()
        store.add_key(key)
        publish = PublishRecord(
            key.id, "x", 5, "ab", ("filemanager://p1/x",), "published", 0.1, "r1", 50.0
        )
        forward = ForwardRecord(
            key.id, "p1", "svc", 2, "POST", "/a", 202, 0.01, 3, "r2", 70.0
        )
        store.record_batch([publish], [forward])
        store.record_batch(
            [],
            [
                ForwardRecord(
                    key.id, "p1", "svc", 2, "GET", "/b", 200, 0.0, 0, "r3", 60.0
                )
            ],
        )
        assert store.load(key.id).key.last_used == 70.0
        (kept,) = store.publishes(key.id)
        assert (kept["resource"], kept["size"], kept["locations"]) == (
            "x",
            5,
            ["filemanager://p1/x"],
        )
        assert [r["request_id"] for r in store.forwards(key.id)] == ["r3", "r2"]

    def test_the_latest_records_in_one_project_are_found_past_others(self, store):
        """Many records elsewhere push none of one project's off its list."""
        key, _ = a_key("q1")
        store.add_key(key)
        here_publish = PublishRecord(
            key.id,
            "x",
            1,
            "ab",
            ("s3://b/x", "filemanager://p_1/x"),
            "published",
            0.1,
            "here",
            1.0,
        )
        here_forward = ForwardRecord(
            key.id, "p_1", "svc", 1, "POST", "/a", 202, 0.0, 0, "here", 1.0
        )
        elsewhere = [
            ForwardRecord(key.id, "q1", "svc", 1, "POST", "/b", 202, 0.0, 0, "q", 2.0)
            for _ in range(25)
        ]
        look_alike = PublishRecord(
            key.id, "y", 1, "ab", ("filemanager://pX1/y",), "published", 0.1, "q", 2.0
        )
        store.record_batch([here_publish, look_alike], [here_forward, *elsewhere])
        assert [r["request_id"] for r in store.forwards(key.id, 20, "p_1")] == ["here"]
        assert [r["request_id"] for r in store.publishes(key.id, 20, "p_1")] == ["here"]
        assert len(store.forwards(key.id, 20)) == 20

    def test_the_recorder_writes_in_the_background(self, store):
        """Queued records reach the store without an explicit flush."""
        key, _ = a_key()
        store.add_key(key)
        recorder = BatchRecorder(store, interval=0.05).start()
        try:
            recorder.record_forward(
                ForwardRecord(
                    key.id, "p1", "svc", 1, "POST", "/", 200, 0.0, 0, "bg", 10.0
                )
            )
            deadline = time.monotonic() + 5
            while not store.forwards(key.id):
                assert time.monotonic() < deadline, "the recorder never wrote"
                time.sleep(0.02)
        finally:
            recorder.stop()

    def test_a_store_that_refuses_records_is_told_of_once_then_seldom(
        self, store, caplog
    ):
        """One warning naming the cause, then word of recovery; nothing is lost."""
        key, _ = a_key()
        store.add_key(key)
        recorder = BatchRecorder(store)
        record = ForwardRecord(
            key.id, "p1", "svc", 1, "POST", "/", 200, 0.0, 0, "kept", 10.0
        )
        broken = _Refusing(store)
        recorder.store = broken
        for _ in range(5):
            recorder.record_forward(record)
            recorder.flush()
        warned = [
            r.getMessage()
            for r in caplog.records
            if "could not write" in r.getMessage()
        ]
        assert len(warned) == 1
        assert "(OSError: the disk said no)" in warned[0]
        recorder.store = store
        recorder.flush()
        assert [r["request_id"] for r in store.forwards(key.id)] == ["kept"] * 5
        assert any("takes records again" in r.getMessage() for r in caplog.records)

    def test_a_store_without_its_tables_is_not_ready(self, store):
        """A database emptied under the gateway fails the readiness check."""
        store.ping()
        with store._transaction() as db:
            store._exec(db, "ALTER TABLE keys RENAME TO keys_gone")
        with pytest.raises(Unavailable):
            store.ping()


class _Refusing:
    """A store whose batch writes fail as a driver error would make them."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def record_batch(self, publishes: Any, forwards: Any) -> None:
        try:
            raise OSError("the disk said no")
        except OSError as exc:
            raise Unavailable("the key store is unavailable") from exc


class TestPostgresOnly:
    """What only the shared store has to do."""

    def test_concurrent_start_up_migrates_once(self, pg_url):
        """Several processes' stores starting together leave one schema."""
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            stores = list(
                pool.map(lambda _: PostgresStore(pg_url, pool_size=1), range(4))
            )
        with psycopg.connect(pg_url) as db:
            versions = db.execute("SELECT version FROM dais_schema ORDER BY version")
            assert [v for (v,) in versions] == list(range(1, len(PG_MIGRATIONS) + 1))
        for made in stores:
            made.close()

    def test_a_dead_server_is_unavailable(self):
        """A closed port is a 503-class error, not a driver exception."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(Unavailable):
            PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test", timeout=1.0)

    def test_a_connection_the_server_ended_is_replaced_unseen(self, pg_url):
        """A pooled connection ended by the server (a restart) costs no 503."""
        store = PostgresStore(pg_url, pool_size=1)
        key, _ = a_key()
        try:
            store.add_key(key)
            (row,) = store._read("SELECT pg_backend_pid() AS pid")
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (row["pid"],))
            assert store.load(key.id) is not None
        finally:
            store.close()

    def test_changes_are_announced_to_every_listener(self, pg_url):
        """A revocation through one store invalidates another process's cache."""
        writer = PostgresStore(pg_url, pool_size=2)
        reader = PostgresStore(pg_url, pool_size=2)
        key, _ = a_key()
        writer.add_key(key)
        cache = CachedKeyStore(
            reader, BatchRecorder(reader), ttl=60.0, degraded_ttl=60.0
        )
        heard: list[str] = []
        flowing = threading.Event()

        def on_state(up: bool) -> None:
            cache.notifications(up)
            if up:
                flowing.set()

        def on_change(key_id: str) -> None:
            heard.append(key_id)
            cache.invalidate(key_id)

        listener = reader.listener(on_change, on_state).start()
        try:
            assert flowing.wait(5), "the listener never connected"
            assert cache.load(key.id).key.revoked is None
            writer.revoke(key.id, 2000.0)
            deadline = time.monotonic() + 1.0
            while cache.load(key.id).key.revoked is None:
                assert time.monotonic() < deadline, "revocation not seen within 1 s"
                time.sleep(0.01)
            assert key.id in heard
        finally:
            listener.stop()
            writer.close()
            reader.close()


class TestCache:
    """The key cache answers from memory, misses included."""

    def test_hits_and_misses_are_cached_until_the_ttl(self, store):
        """A second load within the TTL does not reach the store."""
        key, _ = a_key()
        store.add_key(key)
        now = [0.0]
        cache = CachedKeyStore(
            store, BatchRecorder(store), ttl=5, degraded_ttl=1, clock=lambda: now[0]
        )
        cache.load(key.id)
        cache.load("0000000000000000")
        store.revoke(key.id, 2.0)
        assert cache.load(key.id).key.revoked is None
        assert cache.load("0000000000000000") is None
        assert (cache.stats.hits, cache.stats.misses) == (2, 2)
        now[0] = 1.5
        assert cache.load(key.id).key.revoked == 2.0

    def test_a_change_announced_during_a_read_is_not_overtaken(self, store):
        """A key revoked while the cache reads it is read again next time."""
        key, _ = a_key()
        store.add_key(key)

        class RevokedWhileRead:
            """The store, with the key revoked and announced mid-read."""

            def load(self, key_id: str) -> Any:
                found = store.load(key_id)
                store.revoke(key_id, 1.0)
                cache.invalidate(key_id)
                return found

            def __getattr__(self, name: str) -> Any:
                return getattr(store, name)

        cache = CachedKeyStore(RevokedWhileRead(), BatchRecorder(store), ttl=60)
        assert cache.load(key.id).key.revoked is None
        cache.store = store
        assert cache.load(key.id).key.revoked == 1.0

    def test_cached_answers_from_memory_only(self, store):
        """``cached`` gives a fresh entry, misses included, and never reads the store."""
        key, _ = a_key()
        store.add_key(key)
        now = [0.0]
        cache = CachedKeyStore(
            store, BatchRecorder(store), ttl=5, degraded_ttl=1, clock=lambda: now[0]
        )
        assert cache.cached(key.id) is None
        assert cache.stats.misses == 0
        cache.load(key.id)
        cache.load("0000000000000000")
        found = cache.cached(key.id)
        assert found is not None and found[0] is not None
        assert found[0].key.id == key.id
        assert cache.cached("0000000000000000") == (None,)
        now[0] = 1.5
        assert cache.cached(key.id) is None
        assert cache.stats.misses == 2

    def test_the_cache_is_bounded(self, store):
        """Past max_entries the least recently used entries go."""
        cache = CachedKeyStore(store, BatchRecorder(store), max_entries=3)
        for n in range(10):
            cache.load(f"{n:016x}")
        assert len(cache._entries) == 3


class TestAdminRecords:
    """Admin tokens, the audit log, rotation and expiry in every store."""

    def test_admin_tokens_round_trip(self, store):
        """A stored admin token loads with its role and project."""
        from dais_core.admin import AdminToken, Role

        admin = AdminToken("00000000000000aa", "hash", Role.PROJECT, "p1", "lead", 5.0)
        store.add_admin(admin)
        assert store.load_admin(admin.id) == admin
        assert store.load_admin("00000000000000bb") is None

    def test_the_audit_log_is_newest_first(self, store):
        """Actions come back newest first with their detail."""
        from dais_core.admin import AuditRecord

        store.record_audit(
            AuditRecord(1.0, "a1", "key.create", "k1", {"project": "p1"})
        )
        store.record_audit(AuditRecord(2.0, "a1", "key.revoke", "k1"))
        assert [(r.action, r.detail) for r in store.audit()] == [
            ("key.revoke", {}),
            ("key.create", {"project": "p1"}),
        ]

    def test_rotation_copies_reach_and_bounds_the_predecessor(self, store):
        """The successor gets the permissions and grants; the old key an end."""
        old, _ = a_key()
        store.add_key(old)
        store.add_permission(old.id, Permission("p1", "svc", "/api"))
        store.add_grant(old.id, Grant("x", ("filemanager://p1/x",)))
        new, _ = a_key()
        store.rotate(new, old.id, 1234.0)
        successor = store.load(new.id)
        assert successor.permissions == store.load(old.id).permissions
        assert successor.grants == (Grant("x", ("filemanager://p1/x",)),)
        assert store.load(old.id).key.expires == 1234.0

    def test_expiry_and_removals(self, store):
        """Expiry is set and cleared; removing what is not there is NotFound."""
        key, _ = a_key()
        store.add_key(key)
        store.set_expiry(key.id, 99.0)
        assert store.load(key.id).key.expires == 99.0
        store.set_expiry(key.id, None)
        assert store.load(key.id).key.expires is None
        with pytest.raises(NotFound):
            store.remove_permission(key.id, Permission("p1", "svc", "/"))
        with pytest.raises(NotFound):
            store.remove_grant(key.id, "x")
        with pytest.raises(NotFound):
            store.set_expiry("ffffffffffffffff", 1.0)


class TestRegistryCache:
    """Service lookups are cached per project and invalidated on change."""

    def test_a_registration_elsewhere_reaches_the_cache_at_once(self, pg_url):
        """With notifications flowing, a new service is seen without waiting."""
        from dais_adapters.cache import SERVICES_PREFIX, CachedRegistry

        writer = PostgresStore(pg_url, pool_size=2)
        reader = PostgresStore(pg_url, pool_size=2)
        cache = CachedRegistry(reader, ttl=60.0, degraded_ttl=60.0)
        flowing = threading.Event()

        def on_state(up: bool) -> None:
            cache.notifications(up)
            if up:
                flowing.set()

        def on_change(payload: str) -> None:
            if payload.startswith(SERVICES_PREFIX):
                cache.invalidate(payload.removeprefix(SERVICES_PREFIX))

        listener = reader.listener(on_change, on_state).start()
        try:
            assert flowing.wait(5), "the listener never connected"
            assert cache.endpoints("p1") == ()
            writer.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))
            deadline = time.monotonic() + 1.0
            while not cache.endpoints("p1"):
                assert time.monotonic() < deadline, "registration not seen within 1 s"
                time.sleep(0.01)
        finally:
            listener.stop()
            writer.close()
            reader.close()

    def test_entries_live_for_the_ttl(self, store):
        """Within the TTL the cache answers; after it, the store does."""
        from dais_adapters.cache import CachedRegistry

        now = [0.0]
        cache = CachedRegistry(store, ttl=5, degraded_ttl=1, clock=lambda: now[0])
        assert cache.endpoints("p1") == ()
        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))
        assert cache.endpoints("p1") == ()
        now[0] = 1.5
        assert len(cache.endpoints("p1")) == 1

    def test_a_change_announced_during_a_read_is_not_overtaken(self, store):
        """A service removed while the cache reads it is read again next time."""
        from dais_adapters.cache import CachedRegistry

        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))

        class RemovedWhileRead:
            """The registry, with the service removed and announced mid-read."""

            def endpoints(self, project: str) -> Any:
                found = store.endpoints(project)
                store.remove_service(project, 1, "svc")
                cache.invalidate(project)
                return found

        cache = CachedRegistry(RemovedWhileRead(), ttl=60, degraded_ttl=60)
        assert len(cache.endpoints("p1")) == 1
        cache.registry = store
        assert cache.endpoints("p1") == ()

    def test_cached_answers_from_memory_only(self, store):
        """``cached`` gives a fresh list, or ``None`` without reading the store."""
        from dais_adapters.cache import CachedRegistry

        now = [0.0]
        cache = CachedRegistry(store, ttl=5, degraded_ttl=1, clock=lambda: now[0])
        store.add_service(ServiceEndpoint("p1", 1, "svc", "http://127.0.0.1:1"))
        assert cache.cached("p1") is None
        assert len(cache.endpoints("p1")) == 1
        assert cache.cached("p1") == cache.endpoints("p1")
        now[0] = 1.5
        assert cache.cached("p1") is None


class TestCommitLocks:
    """Commit locks hold across processes: PostgreSQL's, and SQLite's file lock."""

    def test_the_same_names_wait_and_other_names_do_not(self, pg_url):
        """A second holder of a name waits for the first; another name passes."""
        first, second = (
            PostgresStore(pg_url, pool_size=2),
            PostgresStore(pg_url, pool_size=2),
        )
        held = threading.Event()
        release = threading.Event()

        def hold_a_while() -> None:
            with first.commit_locks().hold(["filemanager://p1/x", "s3://b/x"]):
                held.set()
                release.wait(5)

        holder = threading.Thread(target=hold_a_while)
        holder.start()
        try:
            assert held.wait(5)
            started = time.monotonic()
            with second.commit_locks().hold(["filemanager://p1/other"]):
                assert time.monotonic() - started < 1.0
            threading.Timer(0.5, release.set).start()
            with second.commit_locks().hold(["s3://b/x"]):
                waited = time.monotonic() - started
            assert waited >= 0.45
        finally:
            release.set()
            holder.join(5)
            first.close()
            second.close()

    def test_sqlite_locks_hold_across_processes(self, tmp_path):
        """A process holding the SQLite store's commit lock makes another wait."""
        path = tmp_path / "dais.sqlite3"
        SqliteStore(path)
        script = f"""
            import sys, time
            from pathlib import Path
            from dais_adapters.sqlite import SqliteStore
            with SqliteStore(Path({str(path)!r})).commit_locks().hold(["s3://b/x"]):
                print("held", flush=True)
                time.sleep(0.8)
        """
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "held"
            started = time.monotonic()
            with SqliteStore(path).commit_locks().hold(["filemanager://p1/x"]):
                waited = time.monotonic() - started
            assert waited >= 0.5
        finally:
            assert child.wait(timeout=30) == 0


class TestAdminSessions:
    """Browser sessions of admins in every store."""

    def _admin(self, store: Any) -> Any:
        from dais_core.admin import AdminToken, Role

        admin = AdminToken("00000000000000aa", "hash", Role.PROJECT, "p1", "lead", 5.0)
        store.add_admin(admin)
        return admin

    def test_a_session_round_trips_and_ends(self, store):
        """A stored session loads as it was; after end_session it is gone."""
        from dais_core.admin import AdminSession

        self._admin(store)
        session = AdminSession("00000000000000s1", "h1", "00000000000000aa", 10.0, 50.0)
        store.add_session(session)
        assert store.load_session(session.id) == session
        store.end_session(session.id)
        assert store.load_session(session.id) is None
        store.end_session(session.id)  # ending it twice is no error

    def test_opening_a_session_drops_the_ended_ones(self, store):
        """The table keeps only sessions that have not ended."""
        from dais_core.admin import AdminSession

        self._admin(store)
        old = AdminSession("00000000000000s1", "h1", "00000000000000aa", 10.0, 50.0)
        live = AdminSession("00000000000000s2", "h2", "00000000000000aa", 20.0, 90.0)
        store.add_session(old)
        store.add_session(live)
        new = AdminSession("00000000000000s3", "h3", "00000000000000aa", 60.0, 99.0)
        store.add_session(new)
        assert store.load_session(old.id) is None
        assert store.load_session(live.id) == live
        assert store.load_session(new.id) == new


def _open_files(path: Path) -> int:
    """How many descriptors of this process name ``path`` (or its -wal, -shm)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return count


class TestSqliteConnections:
    """A SQLite store's connections, one per thread, end when it closes."""

    def test_close_ends_the_connections_of_every_thread(self, tmp_path):
        """Connections opened by threads still running are closed too."""
        path = tmp_path / "keys.sqlite3"
        store = SqliteStore(path)
        opened, release = threading.Barrier(4), threading.Event()

        def hold() -> None:
            store.load("0000000000000000")
            opened.wait(5)
            release.wait(5)

        threads = [threading.Thread(target=hold) for _ in range(3)]
        for thread in threads:
            thread.start()
        opened.wait(5)
        assert _open_files(path) >= 3
        store.close()
        assert _open_files(path) == 0
        release.set()
        for thread in threads:
            thread.join(5)
        assert store.load("0000000000000000") is None  # opens afresh

    def test_a_thread_that_ended_leaves_no_connection_behind(self, tmp_path):
        """Connections of ended threads go when the next one opens."""
        path = tmp_path / "keys.sqlite3"
        store = SqliteStore(path)
        for _ in range(5):
            worker = threading.Thread(target=store.load, args=("0" * 16,))
            worker.start()
            worker.join(5)
        store.load("0" * 16)
        # This thread's connection, and at most the last worker's.
        assert _open_files(path) <= 2 * 3
        store.close()

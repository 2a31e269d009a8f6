"""``dais-gateway demo``: the gateway, a sample service and a key to try them.

Everything runs on loopback: a small persistent service that prints the
webhook calls it receives, and the gateway in front of it, set up with a demo
key, a permission, grants and sample files, so that the printed ``curl``
commands work as they are.
"""

from __future__ import annotations

import csv
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from waitress.server import create_server

from dais_core.errors import InvalidData
from dais_core.keys import new_key
from dais_core.values import (
    ApiKey,
    DataType,
    Grant,
    KeyRequest,
    Permission,
    ServiceEndpoint,
)
from dais_wsgi.bootstrap import admin_store, bootstrap
from dais_wsgi.server import BackgroundServer, make_server, run_until, stop_on_signals
from dais_wsgi.settings import Settings

__all__ = ["run_demo", "sample_service"]

PROJECT = "demo"
SERVICE = "scheduler"
#: The label of the key a demo makes, and revokes when it stops.
DEMO_LABEL = "demo key"


def sample_service(
    seen: Callable[[str], None] = print,
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """Return a WSGI app that reports each call it receives and answers 202."""

    def app(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        query = environ.get("QUERY_STRING", "")
        seen(
            f"[sample service] {environ['REQUEST_METHOD']} {environ.get('REQUEST_URI')}"
            f" ({len(body)} bytes, key {environ.get('HTTP_X_DAIS_KEY_ID')},"
            f" query {query!r})"
        )
        start_response("202 Accepted", [("Content-Length", "0")])
        return [b""]

    return app


def _samples(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "measurements.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["station", "taken", "value"])
        writer.writerows(
            [["north", "2026-12-01", "4.2"], ["south", "2026-12-01", "3.9"]]
        )
    database = folder / "analytics.sqlite3"
    database.unlink(missing_ok=True)
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, score REAL)")
        connection.executemany("INSERT INTO runs (score) VALUES (?)", [(0.5,), (0.75,)])
    connection.close()
    return table, database


def _revoke_leftover_keys(store: Any, now: float) -> None:
    """Revoke the keys of earlier demos that were killed before they could."""
    for credential in store.list_keys(PROJECT):
        key = credential.key
        if key.label == DEMO_LABEL and key.is_usable(now):
            store.revoke(key.id, now)
            print(f"revoked key {key.id}, left by a demo that was killed", flush=True)


def run_demo(settings: Settings) -> int:
    """Set up and serve the demo until interrupted; return the exit status."""
    upstream = BackgroundServer(
        create_server(sample_service(), host="127.0.0.1", port=0)
    )
    upstream.start()
    upstream_url = f"http://127.0.0.1:{upstream.port}"

    store = admin_store(settings)
    _revoke_leftover_keys(store, time.time())
    made = new_key()
    store.add_key(
        ApiKey(
            made.id,
            made.secret_hash,
            PROJECT,
            DEMO_LABEL,
            KeyRequest(requestor="demo@example.org", case_code="DEMO-1"),
            created=time.time(),
        )
    )
    store.add_permission(made.id, Permission(PROJECT, SERVICE, "/api/webhooks"))
    store.add_grant(made.id, Grant("reports/", ("filemanager://demo/inputs/",)))
    store.add_grant(
        made.id,
        Grant(
            "db/analytics.sqlite3",
            ("filemanager://demo/db/analytics.sqlite3",),
            DataType.SQLITE,
        ),
    )
    for version in (1, 2):
        store.add_service(ServiceEndpoint(PROJECT, version, SERVICE, upstream_url))
    table, database = _samples(settings.home / "samples")

    runtime = bootstrap(settings)
    try:
        server = make_server(runtime)
    except OSError as exc:
        store.revoke(made.id, time.time())
        upstream.stop()
        runtime.close()
        raise InvalidData(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from exc
    stopping = stop_on_signals(server)
    base = f"http://{settings.host}:{server.effective_port}"
    auth = f'-H "Authorization: Bearer {made.token}"'
    root = settings.resolved_filemanager_root / PROJECT
    print(
        f"""
dais demo: gateway on {base}, sample service on {upstream_url}
key id {made.id}; the key (shown once) is in the commands below.

Publish a CSV (lands in {root / "inputs"}):
  curl -sS -w '\\n' {auth} -F data=@{table} {base}/integration/v1/resources/reports/measurements.csv

Publish a SQLite database (checked to be one):
  curl -sS -w '\\n' {auth} -F data=@{database} {base}/integration/v1/resources/db/analytics.sqlite3

Call the sample service through the gateway (prints the call below):
  curl -sS -i {auth} -X POST -d '{{"run": 1}}' \\
    "{base}/project-gateway/webhooks/{PROJECT}/lineage-version/latest/{SERVICE}/api/webhooks/schedule?at=now"

Each key may upload once per second (429 with Retry-After otherwise).
Press Ctrl-C to stop.
""",
        flush=True,
    )
    try:
        run_until(server, stopping, settings.shutdown_grace)
    finally:
        upstream.stop()
        # The demo key lives as long as the demo.
        store.revoke(made.id, time.time())
        runtime.close()
    return 0

"""Real servers on 127.0.0.1: the gateway under waitress, and an upstream."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import urllib3

from dais_adapters.hooks import plugin_manager
from dais_core.errors import DaisError
from dais_core.keys import new_key, parse_token
from dais_core.policies import RatePolicy
from dais_core.rules import normalise_prefix
from dais_core.values import (
    ApiKey,
    DataType,
    Grant,
    KeyRequest,
    Permission,
    ServiceEndpoint,
)
from dais_wsgi.bootstrap import AdminStore, Runtime, admin_store, bootstrap
from dais_wsgi.server import BackgroundServer, make_server
from dais_wsgi.settings import Settings
from tests.upstream import Upstream

pytestmark = pytest.mark.integration

FAST = {"upload_rate": None}


@attrs.define
class Gateway:
    """A running gateway with its admin store."""

    url: str
    settings: Settings
    store: AdminStore
    server: Any
    runtime: Runtime

    def flush(self) -> None:
        """Write the records the gateway has queued."""
        self.runtime.records.flush()

    @property
    def filemanager(self) -> Path:
        return self.settings.resolved_filemanager_root

    def make_key(
        self,
        project: str = "p1",
        *,
        permissions: tuple[tuple[str, str], ...] = (),
        grants: tuple[tuple[str, tuple[str, ...], DataType], ...] = (),
        expires: float | None = None,
    ) -> tuple[str, str]:
        """Create a key with (service, prefix) permissions and grants."""
        made = new_key()
        self.store.add_key(
            ApiKey(
                made.id,
                made.secret_hash,
                project,
                "test",
                KeyRequest(requestor="tests"),
                time.time(),
                expires,
            )
        )
        for service, prefix in permissions:
            self.store.add_permission(
                made.id, Permission(project, service, normalise_prefix(prefix))
            )
        for resource, locations, data_type in grants:
            self.store.add_grant(made.id, Grant(resource, locations, data_type))
        return made.id, made.token

    def add_service(self, project: str, version: int, service: str, url: str) -> None:
        self.store.add_service(ServiceEndpoint(project, version, service, url))

    @property
    def lane(self) -> Any:
        """The event loop's lane for webhook calls, if it runs."""
        return getattr(self.server.server, "dais_lane", None)

    def warm(self, token: str | None, target: str) -> None:
        """Read a call's key and project into the caches, as a call just did.

        The event loop's lane forwards only calls whose key and services
        the caches hold fresh (a key in use): warming before each call lets
        a test's first call take that path.
        """
        with contextlib.suppress(DaisError):
            if token:
                self.runtime.keys.load(parse_token(token.strip())[0])
            parts = target.split("/")
            if target.startswith("/project-gateway/webhooks/") and len(parts) > 3:
                self.runtime.registry.endpoints(parts[3])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A recording upstream service on loopback."""
    service = Upstream()
    yield service
    service.close()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways on free loopback ports; each is closed after the test."""
    started: list[Any] = []

    def start(plugins: tuple[object, ...] = (), **overrides: Any) -> Gateway:
        if overrides.get("upload_rate", ...) is None:
            overrides["upload_rate"] = RatePolicy(rate=1000, burst=1000)
        settings = Settings(home=tmp_path / f"home{len(started)}", port=0, **overrides)
        runtime = bootstrap(settings, plugin_manager(*plugins))
        runner = BackgroundServer(make_server(runtime)).start()
        admin = admin_store(settings)
        started.append((runner, runtime, admin))
        return Gateway(
            f"http://127.0.0.1:{runner.port}", settings, admin, runner, runtime
        )

    yield start
    for runner, runtime, admin in started:
        runner.stop()
        runtime.close()
        admin.close()


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway whose upload throttle is loose enough for functional tests."""
    return start_gateway(**FAST)


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    """A real HTTP client."""
    pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(10, 30))
    yield pool
    pool.clear()

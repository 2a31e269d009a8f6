"""Wire adapters to the core: the one place that builds live objects."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import pluggy

from dais_adapters.cache import (
    SERVICES_PREFIX,
    BatchRecorder,
    CachedKeyStore,
    CachedRegistry,
)
from dais_adapters.hooks import ForwarderOptions, StorageContext, plugin_manager
from dais_core.admin import AdminSession, AuditRecord
from dais_core.errors import InvalidData
from dais_core.policies import (
    ChainedLocks,
    ConcurrencyCap,
    KeyedLocks,
    ServerCap,
    Throttler,
)
from dais_core.ports import (
    Clock,
    CommitLocks,
    Forwarder,
    Inspector,
    KeyStore,
    ServiceRegistry,
    StagedWrite,
    Storage,
)
from dais_core.values import (
    ApiKey,
    Credential,
    DataType,
    Grant,
    Permission,
    ServiceEndpoint,
)
from dais_wsgi.settings import Settings

__all__ = ["AdminStore", "Inspectors", "Runtime", "admin_store", "bootstrap"]


class AdminStore(Protocol):
    """What the admin commands need from a store, beyond the key-store port."""

    def add_key(self, key: ApiKey) -> None: ...
    def revoke(self, key_id: str, now: float) -> None: ...
    def list_keys(self, project: str | None = None) -> list[Credential]: ...
    def keys_reaching(self, project: str) -> list[Credential]: ...
    def add_permission(self, key_id: str, permission: Permission) -> None: ...
    def add_grant(self, key_id: str, grant: Grant) -> None: ...
    def add_service(self, endpoint: ServiceEndpoint) -> None: ...
    def remove_service(
        self, project: str, lineage_version: int, service: str
    ) -> None: ...
    def load(self, key_id: str) -> Credential | None: ...
    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]: ...
    def revoke_admin(self, admin_id: str, now: float) -> None: ...
    def record_audit(self, record: AuditRecord) -> None: ...
    def add_session(self, session: AdminSession) -> None: ...
    def end_session(self, session_id: str) -> None: ...


class Inspectors:
    """Run every installed inspector in turn."""

    def __init__(self, inspectors: Sequence[Inspector]) -> None:
        self.inspectors = tuple(inspectors)

    def scratch_for(
        self, data_type: DataType, staged: Sequence[StagedWrite]
    ) -> StagedWrite | None:
        """Return the private copy the first inspector asks for, if any."""
        for inspector in self.inspectors:
            scratch = inspector.scratch_for(data_type, staged)
            if scratch is not None:
                return scratch
        return None

    def inspect(self, data_type: DataType, staged: Sequence[StagedWrite]) -> None:
        """Pass the staged copies to each inspector; the first to object wins."""
        for inspector in self.inspectors:
            inspector.inspect(data_type, staged)


@attrs.frozen
class Runtime:
    """The live adapters and policies of one gateway process."""

    settings: Settings
    keys: KeyStore
    registry: ServiceRegistry
    storages: Mapping[str, Storage]
    forwarder: Forwarder
    clock: Clock
    upload_throttle: Throttler
    gateway_throttle: Throttler | None
    uploads_in_flight: ConcurrencyCap
    gateway_in_flight: ConcurrencyCap
    slow_requests: ServerCap
    inspector: Inspector
    commit_locks: CommitLocks
    hooks: Any
    records: BatchRecorder
    admin: Any = None
    listener: Any = None

    def close(self) -> None:
        """Stop background work, write the records still queued, drop connections."""
        if self.listener is not None:
            self.listener.stop()
        self.records.stop()
        for part in (self.forwarder, self.admin):
            # The store last: the records just written went through it.
            close = getattr(part, "close", None)
            if callable(close):
                close()


def _commit_locks(store: Any) -> CommitLocks:
    # In-process locks first, so threads of one process queue here rather
    # than on the database; then the store's own, if it spans processes.
    shared = getattr(store, "commit_locks", None)
    if callable(shared):
        return ChainedLocks(KeyedLocks(), shared())
    return KeyedLocks()


class _Changes:
    """Route change notifications to the key cache or the registry cache."""

    def __init__(self, keys: CachedKeyStore, registry: CachedRegistry) -> None:
        self.keys = keys
        self.registry = registry

    def changed(self, payload: str) -> None:
        project = payload.removeprefix(SERVICES_PREFIX)
        if project != payload:
            self.registry.invalidate(project)
        else:
            self.keys.invalidate(payload)

    def notifications(self, flowing: bool) -> None:
        self.keys.notifications(flowing)
        self.registry.notifications(flowing)


def _redacted(url: str) -> str:
    """Return ``url`` without its user information (it may hold a password)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _first(found: Any, what: str, url: str) -> Any:
    if found is None:
        raise InvalidData(f"no installed plugin serves the {what} {_redacted(url)!r}")
    return found


def _manager(manager: pluggy.PluginManager | None) -> pluggy.PluginManager:
    return manager if manager is not None else plugin_manager()


def admin_store(
    settings: Settings, manager: pluggy.PluginManager | None = None
) -> AdminStore:
    """Return the store behind the admin commands."""
    url = settings.resolved_store_url
    store: AdminStore = _first(
        _manager(manager).hook.dais_key_store(url=url), "key store", url
    )
    return store


def build_storages(
    settings: Settings, manager: pluggy.PluginManager | None = None
) -> dict[str, Storage]:
    """Return the storages the installed plugins contribute, by URI scheme."""
    storages: dict[str, Storage] = {}
    context = StorageContext(settings.resolved_filemanager_root)
    for contributed in _manager(manager).hook.dais_storages(context=context):
        storages.update(contributed)
    return storages


def _inspectors(hook: Any, settings: Settings) -> Inspectors:
    context = StorageContext(settings.resolved_filemanager_root)
    return Inspectors(
        [i for found in hook.dais_inspectors(context=context) for i in found]
    )


def bootstrap(
    settings: Settings,
    manager: pluggy.PluginManager | None = None,
    clock: Clock = time.time,
) -> Runtime:
    """Build every adapter the settings name, through the plugin manager.

    Raises:
        InvalidData: No installed plugin serves one of the URLs.
    """
    hook = _manager(manager).hook
    store_url = settings.resolved_store_url
    throttle = _first(
        hook.dais_throttle_state(url=settings.throttle_url),
        "throttle state",
        settings.throttle_url,
    )
    storages = build_storages(settings, manager)
    options = ForwarderOptions(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        body_timeout=settings.gateway_body_timeout,
        client=settings.forwarder,
    )
    store = _first(hook.dais_key_store(url=store_url), "key store", store_url)
    records = BatchRecorder(store, settings.record_interval).start()
    keys = CachedKeyStore(
        store,
        records,
        ttl=settings.key_cache_ttl,
        degraded_ttl=settings.key_cache_degraded_ttl,
    )
    registry = CachedRegistry(
        _first(
            hook.dais_service_registry(url=store_url), "service registry", store_url
        ),
        ttl=settings.key_cache_ttl,
        degraded_ttl=settings.key_cache_degraded_ttl,
    )
    listener = None
    if callable(getattr(store, "listener", None)):
        changes = _Changes(keys, registry)
        listener = store.listener(changes.changed, changes.notifications).start()
    gateway_throttle = None
    if settings.gateway_rate is not None:
        gateway_throttle = Throttler(throttle, clock, settings.gateway_rate, "gateway")
    return Runtime(
        settings=settings,
        keys=keys,
        registry=registry,
        storages=storages,
        forwarder=_first(
            hook.dais_forwarder(options=options), "forwarder", settings.forwarder
        ),
        clock=clock,
        upload_throttle=Throttler(throttle, clock, settings.upload_rate, "upload"),
        gateway_throttle=gateway_throttle,
        uploads_in_flight=ConcurrencyCap(settings.uploads_in_flight, "uploads"),
        gateway_in_flight=ConcurrencyCap(settings.gateway_in_flight, "webhook calls"),
        slow_requests=ServerCap(settings.slow_request_cap, settings.busy_wait),
        inspector=_inspectors(hook, settings),
        commit_locks=_commit_locks(store),
        hooks=hook,
        records=records,
        admin=store,
        listener=listener,
    )

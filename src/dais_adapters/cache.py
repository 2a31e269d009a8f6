"""An in-process cache of verified keys, and a write-behind record buffer.

:class:`CachedKeyStore` answers ``load`` from memory so that the hot path
makes no network call. Entries (misses included, so that a spray of unknown
key ids does not reach the database) live for a short TTL; a store that can
announce changes (PostgreSQL ``LISTEN``) invalidates them at once, and while
it cannot, the cache forgets everything and falls back to the short TTL.

:class:`BatchRecorder` queues publish and forward records and writes them,
with each key's last use, in one transaction per interval, never per
request.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from dais_core.errors import DaisError
from dais_core.ports import KeyStore, ServiceRegistry
from dais_core.values import Credential, ForwardRecord, PublishRecord, ServiceEndpoint

__all__ = [
    "SERVICES_PREFIX",
    "BatchRecorder",
    "CacheStats",
    "CachedKeyStore",
    "CachedRegistry",
    "cause_of",
]

log = logging.getLogger(__name__)

#: Change notifications carry a key id, or this prefix and a project whose
#: services changed.
SERVICES_PREFIX = "services:"


class Recorder(Protocol):
    """Where records go."""

    def record_publish(self, record: PublishRecord) -> None: ...
    def record_forward(self, record: ForwardRecord) -> None: ...


@attrs.define
class CacheStats:
    """Counters of a key cache, for metrics."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0


class CachedKeyStore:
    """A ``KeyStore`` that remembers what ``load`` returned, for a while.

    Args:
        store: The store to read through to.
        recorder: Where records go (usually a :class:`BatchRecorder`).
        ttl: Seconds an entry lives while change notifications flow.
        degraded_ttl: Seconds an entry lives while they may be missed.
        max_entries: Entries kept at most; the least recently used go first.
        clock: A monotonic clock.
    """

    def __init__(
        self,
        store: KeyStore,
        recorder: Recorder,
        *,
        ttl: float = 1.0,
        degraded_ttl: float = 1.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.ttl = ttl
        self.degraded_ttl = degraded_ttl
        self.notified = False
        self.max_entries = max_entries
        self.clock = clock
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, tuple[float, Credential | None]] = (
            collections.OrderedDict()
        )
        # Counts what was forgotten: a store read that a change overtook
        # (the change announced while the read was under way) is not kept.
        self._changes = 0

    def load(self, key_id: str) -> Credential | None:
        """Return the credential of ``key_id``, from memory when fresh."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None and entry[0] > now:
                self._entries.move_to_end(key_id)
                self.stats.hits += 1
                return entry[1]
            self.stats.misses += 1
            changes = self._changes
        found = self.store.load(key_id)
        ttl = self.ttl if self.notified else self.degraded_ttl
        with self._lock:
            if changes != self._changes:
                return found
            self._entries[key_id] = (now + ttl, found)
            self._entries.move_to_end(key_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return found

    def cached(self, key_id: str) -> tuple[Credential | None] | None:
        """Return ``(credential,)`` if memory holds a fresh answer, else ``None``.

        The credential is ``None`` for a key the store did not know. The
        store is never read: callers that must not wait use this.
        """
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is None or entry[0] <= now:
                return None
            self._entries.move_to_end(key_id)
            self.stats.hits += 1
            return (entry[1],)

    def invalidate(self, key_id: str) -> None:
        """Forget one key (it changed somewhere); the store is told ids only."""
        with self._lock:
            self._entries.pop(key_id, None)
            self._changes += 1
            self.stats.invalidations += 1

    def clear(self) -> None:
        """Forget every key (changes may have been missed)."""
        with self._lock:
            self._entries.clear()
            self._changes += 1

    def notifications(self, flowing: bool) -> None:
        """Say whether change notifications reach this cache."""
        self.notified = flowing
        self.clear()

    def record_publish(self, record: PublishRecord) -> None:
        """Pass a publish record on."""
        self.recorder.record_publish(record)

    def record_forward(self, record: ForwardRecord) -> None:
        """Pass a forward record on."""
        self.recorder.record_forward(record)


class CachedRegistry:
    """A ``ServiceRegistry`` that remembers each project's endpoints, briefly.

    Args:
        registry: The registry to read through to.
        ttl: Seconds an entry lives while change notifications flow.
        degraded_ttl: Seconds an entry lives while they may be missed.
        clock: A monotonic clock.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        *,
        ttl: float = 1.0,
        degraded_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ttl = ttl
        self.degraded_ttl = degraded_ttl
        self.notified = False
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Sequence[ServiceEndpoint]]] = {}
        self._changes = 0

    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]:
        """Return every endpoint of a project, from memory when fresh."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(project)
            changes = self._changes
        if entry is not None and entry[0] > now:
            return entry[1]
        found = tuple(self.registry.endpoints(project))
        ttl = self.ttl if self.notified else self.degraded_ttl
        with self._lock:
            # Not kept if a change was announced while the read was under way.
            if changes == self._changes:
                self._entries[project] = (now + ttl, found)
        return found

    def cached(self, project: str) -> Sequence[ServiceEndpoint] | None:
        """Return a project's endpoints if memory holds them fresh, else ``None``.

        The registry is never read: callers that must not wait use this.
        """
        with self._lock:
            entry = self._entries.get(project)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    def invalidate(self, project: str) -> None:
        """Forget one project's endpoints."""
        with self._lock:
            self._entries.pop(project, None)
            self._changes += 1

    def notifications(self, flowing: bool) -> None:
        """Say whether change notifications reach this cache."""
        self.notified = flowing
        with self._lock:
            self._entries.clear()
            self._changes += 1


class BatchWriter(Protocol):
    """A store that keeps many records in one go."""

    def record_batch(
        self, publishes: Sequence[PublishRecord], forwards: Sequence[ForwardRecord]
    ) -> None: ...


#: Seconds between two warnings of records not written, while it lasts.
WARN_EVERY = 60.0


def cause_of(error: BaseException) -> str:
    """Name the driver error behind a domain error, for a log line.

    Returns:
        `` (Type: first line of its message)``, or nothing without a cause.
    """
    cause = error.__cause__
    if cause is None:
        return ""
    first_line = str(cause).strip().partition("\n")[0]
    return f" ({type(cause).__name__}: {first_line})"


class BatchRecorder:
    """Queue records and write them in batches from a thread of its own.

    Args:
        store: Where batches are written.
        interval: Seconds between two writes.
        max_queued: Records kept while the store is down; beyond that the
            oldest are dropped, with a warning.
    """

    def __init__(
        self, store: BatchWriter, interval: float = 0.5, max_queued: int = 100_000
    ) -> None:
        self.store = store
        self.interval = interval
        self._publishes: collections.deque[PublishRecord] = collections.deque(
            maxlen=max_queued
        )
        self._forwards: collections.deque[ForwardRecord] = collections.deque(
            maxlen=max_queued
        )
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="dais-records"
        )
        # When the last warning of records not written was given, while the
        # store keeps failing.
        self._warned_at: float | None = None

    def start(self) -> BatchRecorder:
        """Start writing in the background; return ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Write what is queued and stop."""
        self._stopping.set()
        self._thread.join(10)
        self.flush()

    def record_publish(self, record: PublishRecord) -> None:
        """Queue a publish record."""
        with self._lock:
            self._publishes.append(record)

    def record_forward(self, record: ForwardRecord) -> None:
        """Queue a forward record."""
        with self._lock:
            self._forwards.append(record)

    def flush(self) -> None:
        """Write everything queued now (kept queued if the store is down)."""
        with self._write_lock:
            with self._lock:
                publishes, forwards = list(self._publishes), list(self._forwards)
                self._publishes.clear()
                self._forwards.clear()
            if not publishes and not forwards:
                return
            try:
                self.store.record_batch(publishes, forwards)
            except DaisError as exc:
                self._failed(len(publishes) + len(forwards), exc)
                with self._lock:
                    self._publishes.extendleft(reversed(publishes))
                    self._forwards.extendleft(reversed(forwards))
            else:
                if self._warned_at is not None:
                    log.warning("the key store takes records again")
                    self._warned_at = None

    def _failed(self, count: int, exc: DaisError) -> None:
        """Warn of records not written: at once, then once a minute at most."""
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warning(
            "could not write %d records, kept to retry: %s%s", count, exc, cause_of(exc)
        )

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.flush()

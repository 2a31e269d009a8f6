"""In-memory implementations of the ports, for unit tests of the core.

They keep everything in dictionaries and lists, and are as strict as the
real adapters about the contract: a staged copy is invisible until commit.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dais_core.admin import AdminSession, AdminToken
from dais_core.errors import LocationConflict, PublishFailed
from dais_core.policies import Decision, RatePolicy, gcra
from dais_core.rules import Location
from dais_core.values import Credential, ForwardRecord, PublishRecord, ServiceEndpoint

__all__ = [
    "FakeClock",
    "MemoryAdminStore",
    "MemoryKeyStore",
    "MemoryRegistry",
    "MemoryStorage",
    "MemoryThrottleState",
]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


class MemoryKeyStore:
    """Credentials by key id, and the records written."""

    def __init__(self, *credentials: Credential) -> None:
        self.credentials = {c.key.id: c for c in credentials}
        self.publishes: list[PublishRecord] = []
        self.forwards: list[ForwardRecord] = []

    def load(self, key_id: str) -> Credential | None:
        return self.credentials.get(key_id)

    def record_publish(self, record: PublishRecord) -> None:
        self.publishes.append(record)

    def record_forward(self, record: ForwardRecord) -> None:
        self.forwards.append(record)


class MemoryAdminStore:
    """Admin tokens and browser sessions by id."""

    def __init__(self) -> None:
        self.admins: dict[str, AdminToken] = {}
        self.sessions: dict[str, AdminSession] = {}

    def load_admin(self, admin_id: str) -> AdminToken | None:
        return self.admins.get(admin_id)

    def load_session(self, session_id: str) -> AdminSession | None:
        return self.sessions.get(session_id)


class MemoryRegistry:
    """Service endpoints in a list."""

    def __init__(self, *endpoints: ServiceEndpoint) -> None:
        self.all = list(endpoints)

    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]:
        return [e for e in self.all if e.project == project]


class _MemoryStaged:
    def __init__(self, storage: MemoryStorage, location: Location) -> None:
        self.storage = storage
        self.location = location
        self.parts: list[bytes] = []
        self.previous: bytes | None = None

    def write(self, chunk: bytes) -> None:
        if self.location.uri in self.storage.fail_on_write:
            raise PublishFailed("write refused")
        self.parts.append(bytes(chunk))

    def commit(self) -> None:
        if self.location.uri in self.storage.fail_on_commit:
            raise PublishFailed("commit refused")
        self.previous = self.storage.files.get(self.location.uri)
        self.storage.files[self.location.uri] = b"".join(self.parts)
        self.storage.staged.discard(self)

    def abort(self) -> None:
        self.storage.staged.discard(self)

    def rollback(self) -> None:
        if self.previous is None:
            self.storage.files.pop(self.location.uri, None)
        else:
            self.storage.files[self.location.uri] = self.previous

    def release(self) -> None:
        self.previous = None


class MemoryStorage:
    """Files by location URI; staged copies are kept apart until commit."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.staged: set[_MemoryStaged] = set()
        self.fail_on_write: set[str] = set()
        self.fail_on_commit: set[str] = set()
        self.clash_on_stage: set[str] = set()

    def stage(self, location: Location) -> _MemoryStaged:
        if location.uri in self.clash_on_stage:
            raise LocationConflict(f"{location.uri} is a folder")
        staged = _MemoryStaged(self, location)
        self.staged.add(staged)
        return staged


class MemoryThrottleState:
    """Arrival times in a dictionary, under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}

    def take(self, key: str, policy: RatePolicy, now: float) -> Decision:
        with self._lock:
            tat, decision = gcra(self._tat.get(key), now, policy)
            self._tat[key] = tat
            return decision

"""The ports: what the core needs from the outside world, and nothing more.

Each is a small :class:`typing.Protocol`. Adapters implement them without
inheriting from them; the in-memory versions in :mod:`dais_core.testing`
serve the core's unit tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import attrs

from dais_core.values import (
    Credential,
    DataType,
    ForwardRecord,
    PublishRecord,
    ServiceEndpoint,
)

if TYPE_CHECKING:
    from dais_core.policies import Decision, RatePolicy
    from dais_core.rules import Location

__all__ = [
    "Clock",
    "CommitLocks",
    "ForwardRequest",
    "Forwarder",
    "Inspector",
    "KeyStore",
    "Readable",
    "ServiceRegistry",
    "StagedWrite",
    "Storage",
    "ThrottleState",
]


class Clock(Protocol):
    """Return the current time in seconds since the epoch."""

    def __call__(self) -> float: ...


class Readable(Protocol):
    """A byte stream read in chunks."""

    def read(self, size: int = -1, /) -> bytes: ...


class KeyStore(Protocol):
    """Keys with their permissions and grants, and the records of their use."""

    def load(self, key_id: str) -> Credential | None:
        """Return the key with its permissions and grants, or ``None``."""
        ...

    def record_publish(self, record: PublishRecord) -> None:
        """Keep a publish attempt and mark the key as used."""
        ...

    def record_forward(self, record: ForwardRecord) -> None:
        """Keep a forwarded webhook call and mark the key as used."""
        ...


class ServiceRegistry(Protocol):
    """Where each project's persistent services run."""

    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]:
        """Return every endpoint of a project, all lineage versions."""
        ...


class StagedWrite(Protocol):
    """A copy being written that no reader sees until it is committed."""

    def write(self, chunk: bytes) -> None:
        """Append bytes to the staged copy."""
        ...

    def commit(self) -> None:
        """Make the staged copy the location's content, all at once."""
        ...

    def abort(self) -> None:
        """Drop the staged copy; the location keeps what it had."""
        ...

    def rollback(self) -> None:
        """After a commit, put back what the location held before it."""
        ...

    def release(self) -> None:
        """After every location committed, forget what rollback would need."""
        ...


class CommitLocks(Protocol):
    """Locks by name, held while a publish commits its locations."""

    def hold(self, names: Iterable[str]) -> AbstractContextManager[None]:
        """Hold the locks of ``names`` for the duration of the block."""
        ...


class Inspector(Protocol):
    """A check of the staged copies that needs more than the byte stream."""

    def scratch_for(
        self, data_type: DataType, staged: Sequence[StagedWrite]
    ) -> StagedWrite | None:
        """Return a private copy to write the file to as well, or ``None``.

        For a check that needs a kind of copy none of the staged ones is
        (a local file, say, when every location is remote). The copy is
        passed to :meth:`inspect` with the others, then aborted, never
        committed.
        """
        ...

    def inspect(self, data_type: DataType, staged: Sequence[StagedWrite]) -> None:
        """Raise :class:`~dais_core.errors.CorruptData` if the file is damaged."""
        ...


class Storage(Protocol):
    """One storage scheme (``filemanager``, ``s3``, ...)."""

    def stage(self, location: Location) -> StagedWrite:
        """Start a staged copy for ``location``."""
        ...


@attrs.frozen
class ForwardRequest:
    """A request to send to an upstream service."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: Readable | None
    content_length: int | None


class Forwarder(Protocol):
    """Send a request upstream and return its status."""

    def forward(self, request: ForwardRequest) -> int:
        """Send ``request`` and return the upstream's status code."""
        ...


class ThrottleState(Protocol):
    """Theoretical arrival times per key, updated atomically."""

    def take(self, key: str, policy: RatePolicy, now: float) -> Decision:
        """Run one GCRA step for ``key`` at ``now`` and keep the result."""
        ...

"""Frozen value types shared by the core, the adapters and the web layer.

Times are seconds since the Unix epoch (``float``), as the injected clock
gives them; presentation layers turn them into ISO 8601.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "ApiKey",
    "Credential",
    "DataType",
    "ForwardRecord",
    "Grant",
    "KeyRequest",
    "Permission",
    "PublishRecord",
    "ServiceEndpoint",
]


class DataType(enum.Enum):
    """What a grant declares its resource to be; checked on upload."""

    BINARY = "binary"
    SQLITE = "sqlite"
    CSV = "csv"


@attrs.frozen
class KeyRequest:
    """Who asked for a key, who approved it, and why."""

    requestor: str = ""
    approver: str = ""
    app_ids: tuple[str, ...] = ()
    case_code: str = ""
    lighthouse: bool = False
    business_case: str = ""


@attrs.frozen
class ApiKey:
    """An integration API key as stored: the secret only as a hash."""

    id: str
    secret_hash: str = attrs.field(repr=False)
    project: str
    label: str = ""
    request: KeyRequest = KeyRequest()
    created: float = 0.0
    expires: float | None = None
    revoked: float | None = None
    last_used: float | None = None

    def is_usable(self, now: float) -> bool:
        """Return whether the key is neither revoked nor expired at ``now``."""
        return self.state(now) == "active"

    def state(self, now: float) -> str:
        """Return what a call with the key meets at ``now``.

        Returns:
            ``revoked``, ``expired`` or ``active``.
        """
        if self.revoked is not None and self.revoked <= now:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


@attrs.frozen
class Permission:
    """A gateway permission: a project, a service and a canonical route prefix.

    An empty ``methods`` set covers every HTTP method.
    """

    project: str
    service: str
    prefix: str
    methods: frozenset[str] = frozenset()


@attrs.frozen
class Grant:
    """A resource (or a prefix, ending in ``/``) and the locations it maps to."""

    resource: str
    locations: tuple[str, ...]
    data_type: DataType = DataType.BINARY

    @property
    def is_prefix(self) -> bool:
        """Whether the grant covers every resource under ``resource``."""
        return self.resource.endswith("/")


@attrs.frozen
class ServiceEndpoint:
    """A persistent service of a project at one lineage version."""

    project: str
    lineage_version: int
    service: str
    base_url: str


@attrs.frozen
class Credential:
    """A verified key with everything it may reach."""

    key: ApiKey
    permissions: tuple[Permission, ...] = ()
    grants: tuple[Grant, ...] = ()


@attrs.frozen
class PublishRecord:
    """One publish attempt, successful or not."""

    key_id: str
    resource: str
    size: int
    sha256: str
    locations: tuple[str, ...]
    outcome: str
    duration: float
    request_id: str
    at: float


@attrs.frozen
class ForwardRecord:
    """One webhook call forwarded (or refused by the upstream)."""

    key_id: str
    project: str
    service: str
    lineage_version: int
    method: str
    route: str
    status: int
    latency: float
    bytes_in: int
    request_id: str
    at: float

"""Use cases: authenticate a key, publish a resource, forward a webhook.

Each takes its ports as arguments, so another service can embed the core
with its own adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping

import attrs

from dais_core.checks import check_for
from dais_core.errors import (
    DaisError,
    Forbidden,
    InvalidData,
    PublishFailed,
    TooLarge,
    Unauthenticated,
)
from dais_core.gateway import GatewayCall, upstream_url
from dais_core.keys import parse_token, secret_matches
from dais_core.policies import Target, require_permission, resolve_endpoint
from dais_core.ports import KeyStore, ServiceRegistry, StagedWrite, Storage
from dais_core.rules import Location
from dais_core.values import Credential, Permission, ServiceEndpoint

__all__ = [
    "PublishResult",
    "Route",
    "authenticate",
    "authorise_call",
    "publish",
]


def authenticate(store: KeyStore, authorization: str | None, now: float) -> Credential:
    """Verify the bearer key of a request.

    Args:
        store: Where keys are kept.
        authorization: The ``Authorization`` header, if any.
        now: The current time.

    Returns:
        The key with its permissions and grants.

    Raises:
        Unauthenticated: The header is missing or not ``Bearer``, or the key
            is malformed, unknown, revoked or expired.
    """
    if not authorization:
        raise Unauthenticated("an 'Authorization: Bearer <api key>' header is required")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <api key>'")
    key_id, secret = parse_token(token.strip())

    credential = store.load(key_id)
    if credential is None or not secret_matches(secret, credential.key.secret_hash):
        raise Unauthenticated("the API key is not known")
    key = credential.key
    if key.revoked is not None and key.revoked <= now:
        raise Unauthenticated("the API key has been revoked")
    if key.expires is not None and key.expires <= now:
        raise Unauthenticated("the API key has expired")
    return credential


@attrs.frozen
class Route:
    """Where a gateway call goes, and the permission that lets it."""

    endpoint: ServiceEndpoint
    permission: Permission
    url: str


def authorise_call(
    credential: Credential,
    call: GatewayCall,
    method: str,
    query: str,
    registry: ServiceRegistry,
) -> Route:
    """Resolve a gateway call to its upstream and check the key may make it.

    The registry is asked only for projects the key has some permission in,
    so a key learns nothing about other projects; within its own project it
    can tell an unknown service (404) from a route it may not call (403).

    Raises:
        Forbidden: No permission of the key covers the call.
        NotFound: No such project, lineage version or service.
    """
    if not any(p.project == call.project for p in credential.permissions):
        raise Forbidden("this key has no permission for that project")
    endpoint = resolve_endpoint(
        registry.endpoints(call.project),
        call.project,
        call.lineage_version,
        call.service,
    )
    permission = require_permission(
        credential.permissions, call.project, call.service, call.route, method
    )
    url = upstream_url(endpoint.base_url, call.route, query)
    return Route(endpoint, permission, url)


@attrs.frozen
class PublishResult:
    """A resource published to every location."""

    resource: str
    size: int
    sha256: str
    locations: tuple[str, ...]


def _outcomes(
    locations: tuple[Location, ...], states: list[str], failure: DaisError
) -> list[dict[str, str]]:
    shown = {"pending": "aborted", "staged": "aborted"}
    return [
        {"location": loc.uri, "outcome": shown.get(state, state)}
        | ({"reason": failure.message} if state == "failed" else {})
        for loc, state in zip(locations, states, strict=True)
    ]


def _storage(storages: Mapping[str, Storage], location: Location) -> Storage:
    try:
        return storages[location.scheme]
    except KeyError:
        raise PublishFailed(f"no storage for scheme {location.scheme!r}") from None


def _abort(staged: list[StagedWrite]) -> None:
    for copy in staged:
        # A copy that fails to abort was never visible; the start-up sweep
        # clears it.
        with contextlib.suppress(DaisError):
            copy.abort()


def publish(
    resource_id: str,
    target: Target,
    chunks: Iterable[bytes],
    storages: Mapping[str, Storage],
    *,
    max_size: int,
    expected_sha256: str | None = None,
) -> PublishResult:
    """Stream a file into a staged copy at every location, then commit all.

    The chunks are read once; each is hashed, checked against the declared
    type and written to every staged copy. Only when the whole file is in,
    valid and of the expected digest is any copy committed. Any failure
    before that aborts every copy, so each location keeps its previous file.

    Args:
        resource_id: The checked resource id.
        target: The grant and locations from :func:`map_resource`.
        chunks: The file's bytes; an error raised by the iterator (a
            malformed body, a client gone) aborts the publish.
        storages: A storage per URI scheme.
        max_size: The largest file accepted, in bytes.
        expected_sha256: A hex SHA-256 the client announced, if any.

    Raises:
        TooLarge: The file is over ``max_size``.
        UnsupportedType: The file is not of its declared type.
        CorruptData: The file is of its type but damaged.
        InvalidData: The digest does not match.
        PublishFailed: A location failed; the body lists each outcome.
    """
    locations = target.locations
    states = ["pending"] * len(locations)
    staged: list[StagedWrite] = []
    try:
        for index, location in enumerate(locations):
            staged.append(_storage(storages, location).stage(location))
            states[index] = "staged"
    except DaisError as exc:
        _abort(staged)
        states[len(staged)] = "failed"
        raise PublishFailed(
            "a storage location failed; nothing was changed",
            locations=_outcomes(locations, states, exc),
        ) from exc

    size, digest = _stream(chunks, staged, target, max_size, expected_sha256, states)
    _commit(staged, locations, states)
    return PublishResult(resource_id, size, digest, tuple(loc.uri for loc in locations))


def _stream(
    chunks: Iterable[bytes],
    staged: list[StagedWrite],
    target: Target,
    max_size: int,
    expected_sha256: str | None,
    states: list[str],
) -> tuple[int, str]:
    # Hot path: every byte of every upload passes through this loop once.
    hasher = hashlib.sha256()
    check = check_for(target.grant.data_type)
    size = 0
    index = 0
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > max_size:
                raise TooLarge(f"the file is over the limit of {max_size} bytes")
            hasher.update(chunk)
            check.feed(chunk)
            # ``index`` names the failing copy in the handler below.
            for index, copy in enumerate(staged):  # noqa: B007
                copy.write(chunk)
        check.finish(size)
        digest = hasher.hexdigest()
        if expected_sha256 is not None and expected_sha256 != digest:
            raise InvalidData(
                "the file's SHA-256 does not match the digest sent with it",
                sha256=digest,
            )
    except PublishFailed as exc:
        _abort(staged)
        states[index] = "failed"
        raise PublishFailed(
            "a storage location failed; nothing was changed",
            locations=_outcomes(target.locations, states, exc),
        ) from exc
    except BaseException:
        _abort(staged)
        raise
    return size, digest


def _commit(
    staged: list[StagedWrite], locations: tuple[Location, ...], states: list[str]
) -> None:
    for index, copy in enumerate(staged):
        try:
            copy.commit()
        except DaisError as exc:
            states[index] = "failed"
            _abort(staged[index + 1 :])
            raise PublishFailed(
                "a storage location failed while committing",
                locations=_outcomes(locations, states, exc),
            ) from exc
        states[index] = "committed"

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
    LocationConflict,
    NotFound,
    PublishFailed,
    TooLarge,
    Unauthenticated,
    status_for,
)
from dais_core.gateway import (
    GatewayCall,
    parse_gateway_path,
    routed_to_gateway,
    split_target,
    upstream_url,
)
from dais_core.keys import parse_token, secret_matches, shown
from dais_core.policies import (
    Target,
    require_permission,
    resolve_endpoint,
)
from dais_core.ports import (
    CommitLocks,
    Inspector,
    KeyStore,
    ServiceRegistry,
    StagedWrite,
    Storage,
)
from dais_core.rules import Location, check_methods, is_under
from dais_core.values import Credential, Permission, ServiceEndpoint

__all__ = [
    "Explanation",
    "PublishResult",
    "Route",
    "authenticate",
    "authorise_call",
    "explain",
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
    _check_live(credential, now)
    return credential


def _check_live(credential: Credential, now: float) -> None:
    """Refuse a key that is revoked or expired at ``now``."""
    key = credential.key
    if key.revoked is not None and key.revoked <= now:
        raise Unauthenticated("the API key has been revoked")
    if key.expires is not None and key.expires <= now:
        raise Unauthenticated("the API key has expired")


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
    query: str | None,
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
class Explanation:
    """Why a gateway call would pass or be refused, for admins."""

    allowed: bool
    status: int
    reason: str
    route: str | None = None
    lineage_version: int | None = None
    permission: Permission | None = None
    upstream: str | None = None
    considered: tuple[str, ...] = ()


def _why_not(permission: Permission, call: GatewayCall, method: str) -> str:
    methods = ",".join(sorted(permission.methods)) or "any method"
    name = f"{permission.project} {permission.service} {permission.prefix} ({methods})"
    if (permission.project, permission.service) != (call.project, call.service):
        return f"{name}: another project or service"
    if permission.methods and method not in permission.methods:
        return f"{name}: method {method} not allowed"
    if not is_under(call.route, permission.prefix):
        return f"{name}: route not at or under the prefix"
    return f"{name}: matches"


def explain(
    credential: Credential,
    method: str,
    target: str,
    registry: ServiceRegistry,
    now: float,
) -> Explanation:
    """Say whether a key could make a gateway call, and why, without making it.

    Args:
        credential: The key to explain for (its secret is not needed).
        method: The HTTP method, as the call would send it.
        target: The request target, as the call would send it: a path and
            query, or an absolute ``http(s)://`` URL.
        registry: Where services are registered.
        now: The current time: a key revoked or expired by then gets the
            401 its call would get.

    Raises:
        InvalidData: The method is no HTTP method the gateway takes (it
            would never have received the call).
    """
    if method != method.upper():
        # Methods are case-sensitive (RFC 9110, section 9.1): the server
        # refuses a lower-case one with the request line, before any key.
        raise InvalidData(f"{shown(method)} is not an HTTP method the gateway takes")
    (method,) = check_methods([method])
    try:
        path, query = split_target(target)
        if not routed_to_gateway(path):
            raise NotFound("no gateway endpoint at that path")
        _check_live(credential, now)
        call = parse_gateway_path(path)
    except DaisError as exc:
        return Explanation(False, status_for(exc), exc.message)
    considered = tuple(_why_not(p, call, method) for p in credential.permissions)
    try:
        found = authorise_call(credential, call, method, query, registry)
    except DaisError as exc:
        return Explanation(
            False, status_for(exc), exc.message, call.route, considered=considered
        )
    return Explanation(
        True,
        200,
        "allowed",
        call.route,
        found.endpoint.lineage_version,
        found.permission,
        found.url,
        considered,
    )


@attrs.frozen
class PublishResult:
    """A resource published to every location."""

    resource: str
    size: int
    sha256: str
    locations: tuple[str, ...]


def _storage(storages: Mapping[str, Storage], location: Location) -> Storage:
    try:
        return storages[location.scheme]
    except KeyError:
        raise PublishFailed(f"no storage for scheme {location.scheme!r}") from None


class _Publication:
    """The staged copies of one publish, and what happened to each."""

    def __init__(self, target: Target, storages: Mapping[str, Storage]) -> None:
        self.target = target
        self.storages = storages
        self.staged: list[StagedWrite] = []
        self.states = ["pending"] * len(target.locations)
        # A private copy an inspector asked for: written, looked at, dropped.
        self.scratch: StagedWrite | None = None

    def fail(self, index: int, error: DaisError, message: str) -> PublishFailed:
        """Record ``index`` as failed and build the error with every outcome.

        A clash of names at the failing location (:class:`LocationConflict`)
        stays one, so that the caller sees 409; any other failure is 500.
        """
        self.states[index] = "failed"
        shown = {"pending": "aborted", "staged": "aborted"}
        outcomes = [
            {"location": location.uri, "outcome": shown.get(state, state)}
            | ({"reason": error.message} if state == "failed" else {})
            for location, state in zip(self.target.locations, self.states, strict=True)
        ]
        if isinstance(error, LocationConflict):
            clash = "a location holds something else under that name"
            return LocationConflict(
                message.replace("a storage location failed", clash, 1),
                locations=outcomes,
            )
        return PublishFailed(message, locations=outcomes)

    def abort(self) -> None:
        """Drop every staged copy that is not committed, and the scratch copy."""
        self.drop_scratch()
        for copy, state in zip(self.staged, self.states, strict=False):
            if state == "staged":
                # A copy that fails to abort was never visible; the start-up
                # sweep clears it.
                with contextlib.suppress(DaisError):
                    copy.abort()

    def add_scratch(self, inspector: Inspector | None) -> None:
        """Open the private copy the inspector needs, if it needs one.

        Raises:
            DaisError: The copy cannot be opened; every staged copy is aborted.
        """
        if inspector is None:
            return
        try:
            self.scratch = inspector.scratch_for(
                self.target.grant.data_type, self.staged
            )
        except PublishFailed as exc:
            self.abort()
            raise self.scratch_failed(exc) from exc
        except DaisError:
            self.abort()
            raise

    def scratch_failed(self, error: DaisError) -> PublishFailed:
        """Build the 500 for a failed scratch copy: every location aborted."""
        outcomes = [
            {"location": location.uri, "outcome": "aborted"}
            for location in self.target.locations
        ]
        return PublishFailed(
            f"the copy kept to check the file failed ({error.message}); "
            "nothing was changed",
            locations=outcomes,
        )

    def drop_scratch(self) -> None:
        """Abort the private copy, if any."""
        scratch, self.scratch = self.scratch, None
        if scratch is not None:
            with contextlib.suppress(DaisError):
                scratch.abort()

    def stage(self) -> None:
        """Open a staged copy at every location.

        Raises:
            PublishFailed: A location refused; the others are aborted.
        """
        for index, location in enumerate(self.target.locations):
            try:
                self.staged.append(_storage(self.storages, location).stage(location))
            except DaisError as exc:
                self.abort()
                raise self.fail(index, exc, _NOTHING_CHANGED) from exc
            self.states[index] = "staged"

    def stream(
        self,
        chunks: Iterable[bytes],
        max_size: int,
        expected_sha256: str | None,
        inspector: Inspector | None,
    ) -> tuple[int, str]:
        """Write every chunk to every staged copy, then check the whole file.

        Raises:
            DaisError: The body, its type, its digest or a location failed;
                every staged copy is aborted.
        """
        # Hot path: every byte of every upload passes through this loop once.
        hasher = hashlib.sha256()
        check = check_for(self.target.grant.data_type)
        size = index = 0
        scratch = self.scratch
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > max_size:
                    raise TooLarge(f"the file is over the limit of {max_size} bytes")
                hasher.update(chunk)
                check.feed(chunk)
                # ``index`` names the failing copy in the handler below.
                for index, copy in enumerate(self.staged):  # noqa: B007
                    copy.write(chunk)
                if scratch is not None:
                    index = -1
                    scratch.write(chunk)
            check.finish(size)
            digest = hasher.hexdigest()
            if expected_sha256 is not None and expected_sha256 != digest:
                raise InvalidData(
                    "the file's SHA-256 does not match the digest sent with it",
                    size=size,
                    sha256=digest,
                )
            if inspector is not None:
                looked_at = self.staged if scratch is None else [*self.staged, scratch]
                inspector.inspect(self.target.grant.data_type, looked_at)
            self.drop_scratch()
        except PublishFailed as exc:
            self.abort()
            if index < 0:  # the scratch copy failed, not a location
                raise self.scratch_failed(exc) from exc
            raise self.fail(index, exc, _NOTHING_CHANGED) from exc
        except BaseException:
            self.abort()
            raise
        return size, digest

    def commit(self) -> None:
        """Commit every copy; on a failure, put back what was committed.

        Raises:
            PublishFailed: A commit failed; earlier copies were rolled back
                to their previous content and later ones aborted.
        """
        for index, copy in enumerate(self.staged):
            try:
                copy.commit()
            except DaisError as exc:
                with contextlib.suppress(DaisError):
                    copy.abort()
                self.states[index] = "failed"
                self.abort()
                self.rollback(index)
                message = (
                    "a storage location failed while committing; the locations "
                    "committed before it were rolled back"
                    if index
                    else _NOTHING_CHANGED
                )
                raise self.fail(index, exc, message) from exc
            self.states[index] = "committed"
        for copy in self.staged:
            with contextlib.suppress(DaisError):
                copy.release()

    def rollback(self, failed: int) -> None:
        """Restore the previous content of the copies committed before ``failed``."""
        for index in reversed(range(failed)):
            try:
                self.staged[index].rollback()
                self.states[index] = "rolled_back"
            except DaisError:
                self.states[index] = "rollback_failed"


_NOTHING_CHANGED = "a storage location failed; nothing was changed"


def publish(
    resource_id: str,
    target: Target,
    chunks: Iterable[bytes],
    storages: Mapping[str, Storage],
    *,
    max_size: int,
    expected_sha256: str | None = None,
    inspector: Inspector | None = None,
    locks: CommitLocks | None = None,
) -> PublishResult:
    """Stream a file into a staged copy at every location, then commit all.

    The chunks are read once; each is hashed, checked against the declared
    type and written to every staged copy. Only when the whole file is in,
    valid and of the expected digest is any copy committed. Any failure
    before that aborts every copy, so each location keeps its previous file;
    a failure while committing rolls the committed copies back.

    Args:
        resource_id: The checked resource id.
        target: The grant and locations from :func:`map_resource`.
        chunks: The file's bytes; an error raised by the iterator (a
            malformed body, a client gone) aborts the publish.
        storages: A storage per URI scheme.
        max_size: The largest file accepted, in bytes.
        expected_sha256: A hex SHA-256 the client announced, if any.
        inspector: A deeper check of the staged copies (SQLite integrity).
        locks: Serialises commits to the same locations, so that of two
            concurrent uploads one wins at every location.

    Raises:
        TooLarge: The file is over ``max_size``.
        UnsupportedType: The file is not of its declared type.
        CorruptData: The file is of its type but damaged.
        InvalidData: The digest does not match.
        PublishFailed: A location failed; the body lists each outcome.
    """
    run = _Publication(target, storages)
    run.stage()
    run.add_scratch(inspector)
    size, digest = run.stream(chunks, max_size, expected_sha256, inspector)
    uris = tuple(location.uri for location in target.locations)
    try:
        with locks.hold(uris) if locks is not None else contextlib.nullcontext():
            run.commit()
    except DaisError:
        # The locks could not be had (a shared lock service down): nothing
        # was committed, so every staged copy goes.
        run.abort()
        raise
    return PublishResult(resource_id, size, digest, uris)

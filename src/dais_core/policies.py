"""Decisions: which permission matches, where a resource goes, who may pass.

All of it is pure. The throttler's state and clock are ports, so the same
GCRA arithmetic runs in-process or on a shared store.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import attrs

from dais_core.errors import (
    Busy,
    Forbidden,
    NotFound,
    Throttled,
    UnauthorisedPublish,
)
from dais_core.ports import Clock, CommitLocks, ThrottleState
from dais_core.rules import Location, is_under, parse_location
from dais_core.values import Credential, Grant, Permission, ServiceEndpoint

__all__ = [
    "ChainedLocks",
    "ConcurrencyCap",
    "Decision",
    "KeyedLocks",
    "RatePolicy",
    "ServerCap",
    "Target",
    "Throttler",
    "gcra",
    "in_project_folder",
    "map_resource",
    "match_permission",
    "reaches",
    "resolve_endpoint",
]


def in_project_folder(location: str, project: str) -> bool:
    """Return whether a location URI lies in ``project``'s File Manager."""
    return location.startswith(f"filemanager://{project}/")


def reaches(credential: Credential, project: str) -> bool:
    """Return whether a key can act in ``project``.

    It can when it is the project's own key, or holds a gateway permission
    in it or a grant to its File Manager.
    """
    return (
        credential.key.project == project
        or any(p.project == project for p in credential.permissions)
        or any(
            in_project_folder(location, project)
            for grant in credential.grants
            for location in grant.locations
        )
    )


def match_permission(
    permissions: Iterable[Permission],
    project: str,
    service: str,
    route: str,
    method: str,
) -> Permission | None:
    """Return the first permission covering the request, if any.

    Args:
        permissions: The key's permissions, prefixes in canonical form.
        project: The project of the request.
        service: The service name of the request.
        route: The canonical route.
        method: The HTTP method, upper case.
    """
    for permission in permissions:
        if permission.project != project or permission.service != service:
            continue
        if permission.methods and method not in permission.methods:
            continue
        if is_under(route, permission.prefix):
            return permission
    return None


def require_permission(
    permissions: Iterable[Permission],
    project: str,
    service: str,
    route: str,
    method: str,
) -> Permission:
    """Return the permission covering the request.

    Raises:
        Forbidden: No permission of the key covers it.
    """
    found = match_permission(permissions, project, service, route, method)
    if found is None:
        raise Forbidden(
            "this key has no permission for that project, service and route"
        )
    return found


@attrs.frozen
class Target:
    """Where one resource goes: its grant and the concrete locations."""

    grant: Grant
    locations: tuple[Location, ...]


def _grant_covers(grant: Grant, resource_id: str) -> bool:
    if grant.is_prefix:
        return resource_id.startswith(grant.resource)
    return resource_id == grant.resource


def _place(grant: Grant, resource_id: str, location: Location) -> Location:
    if grant.is_prefix:
        return location.join(resource_id[len(grant.resource) :])
    if location.is_folder:
        return location.join(resource_id.rsplit("/", 1)[-1])
    return location


def map_resource(grants: Sequence[Grant], resource_id: str) -> Target:
    """Map a checked resource id to the concrete locations of its best grant.

    An exact grant beats a prefix grant; among prefix grants the longest wins.

    Raises:
        UnauthorisedPublish: No grant covers the resource.
    """
    covering = [g for g in grants if _grant_covers(g, resource_id)]
    if not covering:
        raise UnauthorisedPublish("this key may not publish that resource")
    grant = max(covering, key=lambda g: (not g.is_prefix, len(g.resource)))
    locations = tuple(
        _place(grant, resource_id, parse_location(uri)) for uri in grant.locations
    )
    return Target(grant, locations)


def resolve_endpoint(
    endpoints: Sequence[ServiceEndpoint],
    project: str,
    lineage_version: int | None,
    service: str,
) -> ServiceEndpoint:
    """Pick the endpoint of a service at a lineage version, or the latest.

    Args:
        endpoints: Every endpoint registered for ``project``.
        project: The project, for messages.
        lineage_version: A positive version, or ``None`` for the highest
            version that has the service.
        service: The service name.

    Raises:
        NotFound: No such project, lineage version or service.
    """
    if not endpoints:
        raise NotFound(f"no project {project!r}")
    if lineage_version is not None:
        endpoints = [e for e in endpoints if e.lineage_version == lineage_version]
        if not endpoints:
            raise NotFound(f"no lineage version {lineage_version} in {project!r}")
    named = [e for e in endpoints if e.service == service]
    if not named:
        raise NotFound(f"no service {service!r} at that lineage version")
    return max(named, key=lambda e: e.lineage_version)


#: The longest period a rate may count over: a year, in seconds.
MAX_PERIOD = 365 * 86400.0


@attrs.frozen
class RatePolicy:
    """A GCRA policy: ``rate`` requests per ``period`` seconds, ``burst`` at once.

    The defaults admit one request per second with no burst.
    """

    rate: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    period: float = attrs.field(default=1.0)
    burst: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    @period.validator
    def _check_period(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 < value <= MAX_PERIOD:
            raise ValueError(
                f"the period must be above 0 and at most a year, not {value!r}"
            )

    @property
    def interval(self) -> float:
        """Seconds between two requests at the sustained rate."""
        return self.period / self.rate

    @property
    def tolerance(self) -> float:
        """How far ahead of the schedule a burst may run, in seconds."""
        return self.interval * (self.burst - 1)


_SLACK = 1e-6


@attrs.frozen
class Decision:
    """The outcome of one throttle check."""

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


def gcra(tat: float | None, now: float, policy: RatePolicy) -> tuple[float, Decision]:
    """Run one step of the generic cell rate algorithm.

    Args:
        tat: The stored theoretical arrival time, or ``None`` for a new key.
        now: The current time in seconds.
        policy: The rate policy.

    Returns:
        The arrival time to store and the decision.
    """
    interval, tolerance = policy.interval, policy.tolerance
    tat = now if tat is None else max(tat, now)
    # Times are floats: a microsecond of slack keeps rounding from refusing
    # a request the policy admits.
    if now < tat - tolerance - _SLACK:
        retry = tat - tolerance - now
        return tat, Decision(False, 0, retry, tat - now)
    new_tat = tat + interval
    remaining = math.floor((tolerance - (new_tat - now) + interval + _SLACK) / interval)
    return new_tat, Decision(True, max(remaining, 0), 0.0, new_tat - now)


class Throttler:
    """Admit or refuse requests per key under one rate policy.

    Args:
        state: Where arrival times are kept.
        clock: The time source.
        policy: The rate policy.
        scope: A namespace, so several policies can share one state.
    """

    def __init__(
        self, state: ThrottleState, clock: Clock, policy: RatePolicy, scope: str
    ) -> None:
        self.state = state
        self.clock = clock
        self.policy = policy
        self.scope = scope

    def check(self, key_id: str) -> Decision:
        """Take one request from the key's allowance.

        Raises:
            Throttled: The key is over its rate.
        """
        decision = self.state.take(f"{self.scope}:{key_id}", self.policy, self.clock())
        if not decision.allowed:
            raise Throttled(
                "too many requests for this key",
                retry_after=decision.retry_after,
                decision=decision,
            )
        return decision


class KeyedLocks:
    """In-process locks by name, taken in a fixed order to avoid deadlock.

    Publishes to the same locations commit one at a time, so the last to
    commit wins at every location. Locks that nobody holds are dropped.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the locks of ``names`` for the duration of the block."""
        ordered = sorted(set(names))
        locks = [self._checkout(name) for name in ordered]
        taken: list[threading.Lock] = []
        try:
            for lock in locks:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            for name in ordered:
                self._checkin(name)

    def _checkout(self, name: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(name, (threading.Lock(), 0))
            self._locks[name] = (lock, users + 1)
            return lock

    def _checkin(self, name: str) -> None:
        with self._guard:
            lock, users = self._locks[name]
            if users > 1:
                self._locks[name] = (lock, users - 1)
            else:
                del self._locks[name]


class ChainedLocks:
    """Hold several lock services' locks, in order (in-process first).

    Args:
        *chain: Lock services, each with ``hold(names)``.
    """

    def __init__(self, *chain: CommitLocks) -> None:
        self.chain = chain

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        """Hold ``names`` in every lock service of the chain."""
        ordered = sorted(set(names))
        with contextlib.ExitStack() as stack:
            for locks in self.chain:
                stack.enter_context(locks.hold(ordered))
            yield


class ConcurrencyCap:
    """Cap the number of requests a key has in flight in this process.

    Args:
        limit: Requests in flight per key; 0 means no cap.
        what: What the requests are, for the refusal's message.
    """

    def __init__(self, limit: int, what: str = "requests") -> None:
        self.limit = limit
        self.what = what
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def acquire(self, key_id: str) -> None:
        """Count one more request in flight.

        Raises:
            Throttled: The key already has ``limit`` requests in flight.
        """
        with self._lock:
            count = self._counts.get(key_id, 0)
            if self.limit and count >= self.limit:
                raise Throttled(
                    f"this key already has {count} {self.what} in flight",
                    retry_after=1.0,
                )
            self._counts[key_id] = count + 1

    @contextlib.contextmanager
    def held(self, key_id: str) -> Iterator[None]:
        """Count one request of ``key_id`` in flight while the block runs."""
        self.acquire(key_id)
        try:
            yield
        finally:
            self.release(key_id)

    def release(self, key_id: str) -> None:
        """Count one request in flight fewer."""
        with self._lock:
            count = self._counts.get(key_id, 0) - 1
            if count > 0:
                self._counts[key_id] = count
            else:
                self._counts.pop(key_id, None)


class ServerCap:
    """Cap the slow requests (webhook calls, uploads) one process holds at once.

    Each holds a worker thread while it waits on an upstream or a client.
    Past the cap one waits a moment for another to end (under a load of
    quick calls, one does), then is refused, so the workers left still
    answer health checks and admin calls, whatever the callers do.

    Args:
        limit: Requests held at once; 0 means no cap.
        wait: Seconds a request past the cap waits for a place (real
            time: the wait is a thread's).
    """

    def __init__(self, limit: int, wait: float = 0.0) -> None:
        self.limit = limit
        self.wait = wait
        self._cond = threading.Condition()
        self._count = 0

    def acquire(self) -> None:
        """Count one more request held, once there is room for it.

        Raises:
            Busy: ``limit`` requests were held for all of ``wait``.
        """
        with self._cond:
            deadline = time.monotonic() + self.wait
            while self.limit and self._count >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(
                        "the server is busy with other webhook calls and "
                        "uploads; retry shortly",
                        retry_after=1.0,
                    )
                self._cond.wait(left)
            self._count += 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Count one more request held while the block runs."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Count one request held fewer; let one that waits in."""
        with self._cond:
            self._count = max(0, self._count - 1)
            self._cond.notify()

"""Redis throttle state: one schedule per key, shared by every gateway.

Selected with ``redis://host:port/db`` or ``rediss://host:port/db``. The
query may carry ``on_error=open`` (the default) or ``on_error=closed``; every
other query parameter goes to :meth:`redis.Redis.from_url` as usual (so
``?socket_timeout=2`` overrides the short default).

**Atomicity.** Each decision is one Lua script run with ``EVALSHA``: it reads
the key's theoretical arrival time, runs the GCRA step and stores the new
arrival time, all inside Redis, in one round trip. Gateways sharing the
Redis therefore share one schedule per key, and concurrent requests cannot
both spend the last unit of a burst.

**Same arithmetic as the core.** The script repeats
:func:`dais_core.policies.gcra` operation for operation on IEEE doubles.
Numbers cross the wire as decimal strings that round-trip a double
(``repr`` one way, ``%.17g`` the other), and the policy's interval and
tolerance are computed in Python, so a decision is equal, to the last bit,
to the one :func:`~dais_core.policies.gcra` and
:class:`~dais_adapters.memory.MemoryThrottleState` make, float slack and
rounding included. The price of one round trip is that the arithmetic
exists twice: a change to ``gcra`` must be repeated in ``_GCRA_SCRIPT``, and
the contract suite (``tests/contract/test_throttle_state.py``) fails until
it is.

**Clock.** The script uses the ``now`` the core passes in (the gateway's
clock), not Redis ``TIME``. That keeps the port's contract ("one GCRA step
at ``now``"), makes Redis and memory state interchangeable and testable with
a fake clock. The cost: when gateway clocks differ, the schedule of a key
shifts by the skew. A request through a gateway whose clock runs ``d``
seconds ahead stores an arrival time ``d`` seconds later than the others
expect, so they refuse that key up to ``d`` seconds early (and a gateway
whose clock lags admits up to ``d`` seconds early). With NTP, skew is a few
milliseconds against intervals of a second or more, which is noise. A wildly
wrong clock does bounded harm: the key's TTL is a duration measured by Redis,
so a far-future arrival time written by such a gateway still expires after
about one schedule's length. Redis ``TIME`` would remove the skew but break
the port's contract, make the adapters disagree, and still jump when a
failover moves the primary to another machine's clock.

**Expiry.** Every write sets a TTL of ``ceil(tat - now)`` plus
``ttl_margin`` seconds. Once the arrival time has passed a stored value
decides nothing a missing one would not (``gcra`` treats both alike), so idle
keys vanish on their own. A refused request writes nothing.

**Failures.** Redis errors never cross the port. With ``on_error="open"``
the request is admitted as if the key were new, the decision is counted in
:attr:`RedisThrottleState.degraded_decisions` for a metrics layer to read,
and a WARNING is logged at most once every ``warn_every`` seconds. With
``on_error="closed"``, :class:`~dais_core.errors.Unavailable` (503) is raised
from the driver's error. Connections time out after 0.5 s and are not
retried, so a dead Redis costs a request at most a connect and a read
timeout. Each request still pays that while Redis is down: a short circuit
breaker (skip Redis for a second after a failure) would spare the timeouts
when Redis is unreachable rather than refusing connections.

The ``redis`` package is an optional extra: this module imports without it
and the hook says what to install when a Redis URL is configured.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Final, Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dais_adapters.hooks import hookimpl
from dais_core.errors import InvalidData, Unavailable
from dais_core.policies import Decision, RatePolicy, gcra

try:
    import redis
    import redis.backoff
    import redis.retry
except ImportError:  # the redis extra is not installed; the hook says so
    redis = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL_MARGIN",
    "DEFAULT_WARN_EVERY",
    "OnError",
    "RedisThrottleState",
    "from_url",
]

log = logging.getLogger(__name__)

OnError = Literal["open", "closed"]

#: Prepended to every throttled key.
DEFAULT_KEY_PREFIX: Final = "dais:throttle:"
#: Seconds to wait for a connection to Redis, and for each reply.
DEFAULT_TIMEOUT: Final = 0.5
#: Seconds a key outlives its arrival time, for clock skew between gateways.
DEFAULT_TTL_MARGIN: Final = 2
#: Least seconds between two warnings about degraded decisions.
DEFAULT_WARN_EVERY: Final = 5.0

_SCHEMES = frozenset({"redis", "rediss"})
_ON_ERROR = "on_error"

# KEYS[1]: the key. ARGV: now, interval, tolerance (decimal strings that
# round-trip a double), TTL margin in seconds. Returns allowed (0/1),
# remaining, retry_after and reset_after, the floats as "%.17g" strings
# (a Lua number would reach the client truncated to an integer). Mirrors
# dais_core.policies.gcra operation by operation, in the same order, with
# its slack of 1e-6 s (policies._SLACK); keep the two in lockstep.
_GCRA_SCRIPT: Final = """
local slack = 1e-6
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if now > tat then
  tat = now
end
if now < tat - tolerance - slack then
  return {0, 0, string.format('%.17g', tat - tolerance - now),
          string.format('%.17g', tat - now)}
end
local new_tat = tat + interval
local remaining = math.floor((tolerance - (new_tat - now) + interval + slack) / interval)
if remaining < 0 then
  remaining = 0
end
local ttl = math.ceil(new_tat - now) + tonumber(ARGV[4])
if ttl < 1 then
  ttl = 1
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'EX', ttl)
return {1, remaining, '0', string.format('%.17g', new_tat - now)}
"""


class RedisThrottleState:
    """GCRA arrival times in Redis, updated atomically by a Lua script.

    Args:
        client: The Redis client; its connection pool is shared by threads.
        on_error: ``"open"`` admits a request Redis cannot decide and counts
            it; ``"closed"`` raises :class:`~dais_core.errors.Unavailable`.
        key_prefix: Prepended to every key, to share a database safely.
        ttl_margin: Whole seconds a key outlives its arrival time.
        warn_every: Least seconds between two warnings when failing open.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        on_error: OnError = "open",
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_margin: int = DEFAULT_TTL_MARGIN,
        warn_every: float = DEFAULT_WARN_EVERY,
    ) -> None:
        self.client = client
        self.on_error = on_error
        self.key_prefix = key_prefix
        self.ttl_margin = ttl_margin
        self.warn_every = warn_every
        #: Decisions made without Redis since start-up (``on_error="open"``).
        self.degraded_decisions = 0
        self._script = client.register_script(_GCRA_SCRIPT)
        self._lock = threading.Lock()
        self._warned_at: float | None = None

    def take(self, key: str, policy: RatePolicy, now: float) -> Decision:
        """Run one GCRA step for ``key`` at ``now`` and keep the result.

        Raises:
            Unavailable: Redis failed and ``on_error`` is ``"closed"``.
        """
        args = (repr(now), repr(policy.interval), repr(policy.tolerance))
        try:
            reply = self._script(
                keys=[self.key_prefix + key], args=[*args, self.ttl_margin]
            )
        except redis.RedisError as exc:
            return self._degraded(exc, policy, now)
        allowed, remaining, retry_after, reset_after = reply
        return Decision(
            bool(allowed), int(remaining), float(retry_after), float(reset_after)
        )

    def ping(self) -> None:
        """Check Redis answers (for readiness, whatever ``on_error`` says).

        Raises:
            Unavailable: It does not.
        """
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise Unavailable("the shared throttle state is unavailable") from exc

    def _degraded(
        self, exc: redis.RedisError, policy: RatePolicy, now: float
    ) -> Decision:
        if self.on_error == "closed":
            raise Unavailable("the shared throttle state is unavailable") from exc

        self._count_degraded(exc)
        _, decision = gcra(None, now, policy)
        return decision

    def _count_degraded(self, exc: redis.RedisError) -> None:
        with self._lock:
            self.degraded_decisions += 1
            count = self.degraded_decisions
            moment = time.monotonic()
            due = self._warned_at is None or moment - self._warned_at >= self.warn_every
            if due:
                self._warned_at = moment

        if due:
            log.warning(
                "Redis throttle state failed (%s: %s); admitting requests "
                "unthrottled, %s degraded decisions so far",
                type(exc).__name__,
                exc,
                count,
            )


def from_url(url: str) -> RedisThrottleState:
    """Build Redis throttle state from a ``redis://`` or ``rediss://`` URL.

    The client gets a connection pool, 0.5 s connect and read timeouts and no
    retries, unless the URL's query says otherwise.

    Args:
        url: The Redis URL, optionally with ``on_error=open|closed``.

    Raises:
        InvalidData: The ``redis`` extra is missing, the URL is malformed,
            or Redis refuses it (a database it does not have, say).
    """
    if redis is None:
        raise InvalidData(
            "Redis throttle state needs the redis extra: "
            "pip install 'dais-integration[redis]'"
        )

    redis_url, on_error = _split_on_error(url)
    try:
        client = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=DEFAULT_TIMEOUT,
            socket_timeout=DEFAULT_TIMEOUT,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
    except ValueError as exc:
        raise InvalidData(f"malformed Redis throttle URL: {exc}") from exc
    _check_refusal(client)

    parts = urlsplit(redis_url)
    log.debug(
        "throttle state in Redis at %s:%s%s, on_error=%s",
        parts.hostname,
        parts.port,
        parts.path,
        on_error,
    )
    return RedisThrottleState(client, on_error=on_error)


def _check_refusal(client: redis.Redis) -> None:
    """Refuse a URL that Redis itself refuses; leave an unreachable one be.

    A database Redis does not have, or credentials it refuses, would fail
    every decision; a Redis that is down at start is left to ``on_error``.

    Raises:
        InvalidData: Redis answered, and refused.
    """
    try:
        client.ping()
    except (redis.ResponseError, redis.AuthenticationError) as exc:
        raise InvalidData(f"Redis refuses the throttle URL: {exc}") from exc
    except redis.RedisError:
        return  # not reachable now: each decision meets on_error, and logs it


#: The path of a Redis URL: none, or the database number.
_DATABASE = re.compile(r"/?|/[0-9]{1,5}")


def _split_on_error(url: str) -> tuple[str, OnError]:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsed on access: a bad port raises here)
    except ValueError as exc:
        raise InvalidData(f"malformed Redis throttle URL: {exc}") from exc
    if not _DATABASE.fullmatch(parts.path):
        raise InvalidData("a Redis throttle URL names its database as /N, N a number")
    query = parse_qsl(parts.query, keep_blank_values=True)
    chosen = [value for name, value in query if name == _ON_ERROR]
    if len(chosen) > 1 or not set(chosen) <= {"open", "closed"}:
        raise InvalidData("on_error must be given once, as 'open' or 'closed'")

    rest = urlencode([(name, value) for name, value in query if name != _ON_ERROR])
    on_error = cast(OnError, chosen[0] if chosen else "open")
    return urlunsplit(parts._replace(query=rest)), on_error


@hookimpl
def dais_throttle_state(url: str) -> RedisThrottleState | None:
    """Serve ``redis://`` and ``rediss://`` throttle state."""
    # A URL too malformed to split (``redis://[::1/0``) is still ours to refuse.
    if url.partition(":")[0].lower() not in _SCHEMES:
        return None
    return from_url(url)

"""The ThrottleState port: one contract, run over every adapter.

``memory`` is :class:`dais_adapters.memory.MemoryThrottleState`; ``redis`` is
:class:`dais_adapters.redis_throttle.RedisThrottleState` against the Redis at
127.0.0.1:6379, which these tests need: if it is down they fail, they do not
skip. Redis keys live under a prefix unique to the run and are deleted at the
end; every test takes fresh keys, so tests and examples never share state.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from dais_adapters import redis_throttle
from dais_adapters.hooks import plugin_manager
from dais_adapters.memory import MemoryThrottleState
from dais_adapters.redis_throttle import RedisThrottleState, dais_throttle_state
from dais_core.errors import InvalidData, Unavailable, status_for
from dais_core.policies import Decision, RatePolicy, gcra
from dais_core.ports import ThrottleState
from tests import strategies

REDIS_URL = "redis://127.0.0.1:6379/0"
NOW = 1_000_000.0
LOGGER = "dais_adapters.redis_throttle"


@attrs.frozen
class RedisSandbox:
    """A client of the test Redis and a key prefix no one else uses."""

    client: redis.Redis
    prefix: str

    def state(self, **options: Any) -> RedisThrottleState:
        """Return Redis throttle state under this sandbox's prefix."""
        return RedisThrottleState(self.client, key_prefix=self.prefix, **options)

    def clean(self) -> None:
        """Delete every key under the prefix."""
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            self.client.delete(*keys)


@pytest.fixture(scope="module")
def redis_sandbox() -> Iterator[RedisSandbox]:
    """The Redis at 127.0.0.1:6379, or a failure (never a skip) if it is down."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(
            f"Redis at {REDIS_URL} is unreachable ({exc}); start it with "
            "redis-server --bind 127.0.0.1 --port 6379",
            pytrace=False,
        )
    sandbox = RedisSandbox(client, f"dais:throttle:test-{uuid.uuid4().hex}:")
    yield sandbox
    sandbox.clean()
    client.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> ThrottleState:
    """Each adapter of the port; Redis fails closed so its errors show."""
    if request.param == "memory":
        return MemoryThrottleState()
    sandbox: RedisSandbox = request.getfixturevalue("redis_sandbox")
    return sandbox.state(on_error="closed")


@pytest.fixture
def served() -> Iterator[Callable[[str], RedisThrottleState | None]]:
    """Build states through the hook, and close their clients afterwards."""
    built: list[RedisThrottleState] = []

    def build(url: str) -> RedisThrottleState | None:
        found = dais_throttle_state(url)
        if found is not None:
            built.append(found)
        return found

    yield build
    for found in built:
        found.client.close()


def _fresh_key() -> str:
    return f"k:{uuid.uuid4().hex}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _unreachable(query: str = "") -> str:
    return f"redis://127.0.0.1:{_closed_port()}/0{query}"


def _replay(
    state: ThrottleState, policy: RatePolicy, times: list[float]
) -> tuple[list[Decision], list[Decision]]:
    """Take one key at each time; return the adapter's and gcra's decisions."""
    key, tat = _fresh_key(), None
    got, expected = [], []
    for now in times:
        got.append(state.take(key, policy, now))
        tat, decision = gcra(tat, now, policy)
        expected.append(decision)
    return got, expected


def _any_policies() -> st.SearchStrategy[RatePolicy]:
    """Policies with intervals that are rarely exact in binary."""
    return st.builds(
        RatePolicy,
        rate=st.integers(1, 1000),
        period=st.floats(1e-3, 3600.0),
        burst=st.integers(1, 20),
    )


def _skewed_times(policy: RatePolicy) -> st.SearchStrategy[list[float]]:
    """Request times on any float clock, now and then stepping back a little.

    A step back is what a request through a gateway with a slower clock
    looks like to the shared state.
    """
    gap = st.one_of(
        st.just(0.0),
        st.floats(0.0, 2 * policy.interval),
        st.floats(0.0, policy.interval * policy.burst + policy.period),
        st.floats(-policy.interval, 0.0),
    )

    def times(start: float, gaps: list[float]) -> list[float]:
        out = [start]
        for step in gaps:
            out.append(out[-1] + step)
        return out

    return st.builds(times, st.floats(0.0, 4e9), st.lists(gap, max_size=40))


class TestThrottleStateContract:
    @given(st.data())
    def test_decisions_equal_gcra_on_tick_schedules(self, state, data):
        """On schedules of whole 1/64 s ticks every decision equals gcra's."""
        policy = data.draw(strategies.dyadic_rate_policies(), label="policy")
        gaps = data.draw(strategies.request_gaps(policy), label="gaps")
        times = [NOW]
        for gap in gaps:
            times.append(times[-1] + gap)
        got, expected = _replay(state, policy, times)
        assert got == expected

    @given(st.data())
    def test_decisions_equal_gcra_to_the_last_bit_on_any_clock(self, state, data):
        """On arbitrary float times and policies the decisions are bit-identical."""
        policy = data.draw(_any_policies(), label="policy")
        times = data.draw(_skewed_times(policy), label="times")
        got, expected = _replay(state, policy, times)
        assert got == expected

    @given(now=st.floats(0.0, 4e9))
    @example(now=NOW)
    def test_an_inexact_interval_gives_gcra_s_decisions(self, state, now):
        """Where 1/rate has no exact binary form, decisions still equal gcra's."""
        policy = RatePolicy(rate=3, period=1.0, burst=3)
        got, expected = _replay(state, policy, [now] * 5)
        assert got == expected

    def test_a_new_key_is_admitted_with_its_burst_left(self, state):
        """A key's first request passes; remaining and reset count that request."""
        policy = RatePolicy(rate=1, period=1.0, burst=3)
        decision = state.take(_fresh_key(), policy, 100.0)
        assert decision == Decision(True, 2, 0.0, 1.0)

    def test_a_burst_passes_at_once_then_refusals_say_when(self, state):
        """A burst at one instant passes with remaining counting down, then stops."""
        policy = RatePolicy(rate=2, period=1.0, burst=4)
        key = _fresh_key()
        admitted = [state.take(key, policy, NOW) for _ in range(4)]
        refused = state.take(key, policy, NOW)
        assert [d.remaining for d in admitted] == [3, 2, 1, 0]
        assert [d.reset_after for d in admitted] == [0.5, 1.0, 1.5, 2.0]
        assert refused == Decision(False, 0, 0.5, 2.0)

    def test_a_retry_after_retry_after_is_admitted(self, state):
        """Coming back exactly retry_after later passes, with nothing to spare."""
        policy = RatePolicy()
        key = _fresh_key()
        state.take(key, policy, NOW)
        refused = state.take(key, policy, NOW + 0.25)
        assert refused == Decision(False, 0, 0.75, 0.75)
        later = state.take(key, policy, NOW + 0.25 + refused.retry_after)
        assert later == Decision(True, 0, 0.0, 1.0)

    def test_an_idle_key_starts_afresh(self, state):
        """Once its arrival time has passed, a key decides like a new one."""
        policy = RatePolicy(rate=1, period=1.0, burst=2)
        key = _fresh_key()
        state.take(key, policy, NOW)
        state.take(key, policy, NOW)
        assert state.take(key, policy, NOW + 60) == gcra(None, NOW + 60, policy)[1]

    def test_keys_are_throttled_apart(self, state):
        """Spending one key's allowance leaves other keys, even look-alikes, whole."""
        policy = RatePolicy()
        base = _fresh_key()
        assert state.take(base, policy, NOW).allowed
        assert not state.take(base, policy, NOW).allowed
        for other in (base + "1", base + ":x", base[:-1], "upload:" + base):
            assert state.take(other, policy, NOW).allowed

    def test_each_key_follows_its_own_policy(self, state):
        """Keys under different policies in one state do not interfere."""
        tight, loose = RatePolicy(), RatePolicy(rate=10, period=1.0, burst=5)
        a, b = _fresh_key(), _fresh_key()
        assert sum(state.take(a, tight, NOW).allowed for _ in range(6)) == 1
        assert sum(state.take(b, loose, NOW).allowed for _ in range(6)) == 5

    def test_concurrent_takes_at_one_instant_admit_exactly_the_burst(self, state):
        """Many threads taking one key at once admit exactly burst requests."""
        policy = RatePolicy(rate=1, period=60.0, burst=7)
        key, threads = _fresh_key(), 16
        barrier = threading.Barrier(threads, timeout=10)

        def worker() -> list[Decision]:
            barrier.wait()
            return [state.take(key, policy, NOW) for _ in range(4)]

        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(worker) for _ in range(threads)]
            decisions = [d for future in futures for d in future.result()]
        admitted = [d for d in decisions if d.allowed]
        assert sorted(d.remaining for d in admitted) == list(range(policy.burst))


class CountingRedis(redis.Redis):
    """A real client that notes the name of every command it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


class TestRedisThrottleState:
    def test_a_decision_is_one_evalsha(self, redis_sandbox):
        """After the script is loaded, each decision sends exactly one EVALSHA."""
        client = CountingRedis(host="127.0.0.1", port=6379, socket_timeout=2)
        try:
            state = RedisThrottleState(client, key_prefix=redis_sandbox.prefix)
            state.take(_fresh_key(), RatePolicy(), NOW)
            client.sent.clear()
            for _ in range(5):
                state.take(_fresh_key(), RatePolicy(), NOW)
            assert client.sent == ["EVALSHA"] * 5
        finally:
            client.close()

    def test_keys_live_under_the_prefix_with_a_ttl(self, redis_sandbox):
        """A written key carries a TTL: the time until its arrival time, plus margin."""
        state = redis_sandbox.state(ttl_margin=2, on_error="closed")
        policy = RatePolicy(rate=1, period=10.0, burst=3)
        key = _fresh_key()
        last = [state.take(key, policy, NOW) for _ in range(3)][-1]
        ttl = redis_sandbox.client.ttl(redis_sandbox.prefix + key)
        expected = math.ceil(last.reset_after) + 2
        assert expected - 1 <= ttl <= expected

    def test_a_refusal_does_not_extend_the_ttl(self, redis_sandbox):
        """A refused request writes nothing, so it cannot keep a key alive."""
        state = redis_sandbox.state(ttl_margin=100, on_error="closed")
        key = _fresh_key()
        state.take(key, RatePolicy(), NOW)
        redis_sandbox.client.expire(redis_sandbox.prefix + key, 50)
        assert not state.take(key, RatePolicy(), NOW).allowed
        assert redis_sandbox.client.ttl(redis_sandbox.prefix + key) <= 50

    def test_an_idle_key_expires(self, redis_sandbox):
        """With no margin a key is gone about a second after its arrival time."""
        state = redis_sandbox.state(ttl_margin=0, on_error="closed")
        key = _fresh_key()
        state.take(key, RatePolicy(rate=4, period=1.0), time.time())
        deadline = time.monotonic() + 3
        while redis_sandbox.client.exists(redis_sandbox.prefix + key):
            assert time.monotonic() < deadline, "the key outlived its TTL"
            time.sleep(0.05)

    def test_fail_open_admits_counts_and_warns(self, served, caplog):
        """With Redis unreachable a request is admitted as a new key, and counted."""
        caplog.set_level(logging.WARNING, logger=LOGGER)
        state = served(_unreachable())
        policy = RatePolicy(rate=1, period=1.0, burst=3)
        decisions = [state.take(_fresh_key(), policy, NOW) for _ in range(3)]
        assert decisions == [gcra(None, NOW, policy)[1]] * 3
        assert state.degraded_decisions == 3
        warnings = [r for r in caplog.records if r.name == LOGGER]
        assert [r.levelno for r in warnings] == [logging.WARNING]
        assert "1 degraded decisions so far" in warnings[0].getMessage()

    def test_fail_open_warns_again_once_the_interval_has_passed(self, served, caplog):
        """The warning is rate-limited by warn_every, not silenced for good."""
        caplog.set_level(logging.WARNING, logger=LOGGER)
        state = served(_unreachable())
        state.warn_every = 0.0
        for _ in range(3):
            state.take(_fresh_key(), RatePolicy(), NOW)
        assert len([r for r in caplog.records if r.name == LOGGER]) == 3

    def test_fail_closed_raises_unavailable(self, served):
        """With on_error=closed an unreachable Redis is a 503, from the driver's error."""
        state = served(_unreachable("?on_error=closed"))
        with pytest.raises(Unavailable) as caught:
            state.take(_fresh_key(), RatePolicy(), NOW)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        assert status_for(caught.value) == 503
        assert state.degraded_decisions == 0

    def test_a_silent_server_holds_a_request_for_the_timeouts_only(self, served):
        """A peer that accepts but never answers costs one short timeout, no retries."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            state = served(f"redis://127.0.0.1:{port}/0")
            started = time.monotonic()
            assert state.take(_fresh_key(), RatePolicy(), NOW).allowed
            elapsed = time.monotonic() - started
        assert state.degraded_decisions == 1
        assert elapsed < 2 * redis_throttle.DEFAULT_TIMEOUT + 0.5

    @pytest.mark.parametrize("on_error", ["open", "closed"])
    @pytest.mark.parametrize("cause", ["unreachable", "error_reply"])
    def test_no_redis_error_crosses_the_port(self, redis_sandbox, on_error, cause):
        """Refused connections and error replies alike end as a decision or a 503."""
        key = _fresh_key()
        if cause == "unreachable":
            client = redis.Redis.from_url(_unreachable())
        else:
            client = redis.Redis.from_url(REDIS_URL)
            # A hash where a number is kept: the script's GET gets WRONGTYPE.
            redis_sandbox.client.hset(redis_sandbox.prefix + key, "x", "1")
        state = RedisThrottleState(
            client, on_error=on_error, key_prefix=redis_sandbox.prefix
        )
        try:
            if on_error == "closed":
                with pytest.raises(Unavailable) as caught:
                    state.take(key, RatePolicy(), NOW)
                assert isinstance(caught.value.__cause__, redis.RedisError)
            else:
                assert state.take(key, RatePolicy(), NOW).allowed
                assert state.degraded_decisions == 1
        finally:
            client.close()


class TestRedisThrottleHook:
    @pytest.mark.parametrize(
        "url",
        [
            "memory://",
            "sqlite:///tmp/dais.sqlite3",
            "postgresql://127.0.0.1/dais",
            "unix:///tmp/redis.sock",
            "http://127.0.0.1:6379/0",
        ],
    )
    def test_other_schemes_are_left_to_other_plugins(self, served, url):
        """Only redis:// and rediss:// URLs are served."""
        assert served(url) is None

    @pytest.mark.parametrize("url", [REDIS_URL, "rediss://127.0.0.1:6380/1"])
    def test_redis_urls_are_served_failing_open(self, served, url):
        """A Redis URL gives Redis state, failing open, without connecting yet."""
        state = served(url)
        assert isinstance(state, RedisThrottleState)
        assert state.on_error == "open"
        assert state.key_prefix == "dais:throttle:"

    def test_on_error_is_taken_from_the_query_and_stripped(self, served):
        """on_error is ours; the rest of the query and short timeouts reach redis-py."""
        state = served(
            "redis://127.0.0.1:6379/3?on_error=closed&health_check_interval=7"
        )
        kwargs = state.client.connection_pool.connection_kwargs
        assert state.on_error == "closed"
        assert "on_error" not in kwargs
        assert (kwargs["db"], kwargs["health_check_interval"]) == (3, 7)
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5

    def test_the_query_may_lengthen_the_timeouts(self, served):
        """A socket_timeout in the URL wins over the short default."""
        state = served(f"{REDIS_URL}?socket_timeout=2")
        assert state.client.connection_pool.connection_kwargs["socket_timeout"] == 2.0

    @pytest.mark.parametrize(
        "query",
        ["?on_error=maybe", "?on_error=", "?on_error=open&on_error=closed"],
    )
    def test_a_bad_on_error_is_refused(self, served, query):
        """on_error is 'open' or 'closed', given at most once."""
        with pytest.raises(InvalidData):
            served(REDIS_URL + query)

    def test_a_malformed_url_is_invalid_data(self, served):
        """A query redis-py cannot read is a configuration error, not a crash."""
        with pytest.raises(InvalidData):
            served(f"{REDIS_URL}?socket_timeout=soon")

    def test_the_plugin_manager_finds_the_adapter(self):
        """The entry point registers the hook beside the built-in adapters."""
        hook = plugin_manager().hook
        state = hook.dais_throttle_state(url=REDIS_URL)
        try:
            assert isinstance(state, RedisThrottleState)
            assert isinstance(
                hook.dais_throttle_state(url="memory://"), MemoryThrottleState
            )
        finally:
            state.client.close()

    def test_without_the_redis_extra_the_hook_says_what_to_install(
        self, monkeypatch, served
    ):
        """A Redis URL without redis-py installed names the missing extra."""
        monkeypatch.setattr(redis_throttle, "redis", None)
        with pytest.raises(InvalidData, match=r"dais-integration\[redis\]"):
            served(REDIS_URL)

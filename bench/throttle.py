"""Benchmark the Redis throttle decision against a plain Redis round trip.

Run from the repository root, with Redis listening on 127.0.0.1::

    python bench/throttle.py                 # 20,000 calls of each operation
    python bench/throttle.py --calls 5000    # a quick check
    python bench/throttle.py --port 6380     # another local Redis

One process, one thread, one client built exactly as the ``redis://`` hook
builds it (connection pool, 0.5 s timeouts, no retries), so every operation
reuses the same open connection. The operations, timed call by call with
``perf_counter_ns``:

- ``PING``: the cheapest round trip Redis has;
- ``GET``: a round trip that looks up a (missing) key;
- ``take, admitted``: ``RedisThrottleState.take`` under a policy that admits
  every call, so the script reads, runs GCRA and writes the key with a TTL
  (the common case in production: most requests pass);
- ``take, refused``: ``take`` on a key whose allowance is spent, so the
  script reads and decides but writes nothing;
- ``take, memory``: ``MemoryThrottleState.take``, the in-process default,
  for scale.

The admitted takes cycle over ``--keys`` distinct keys (default 1,000). The
operations are interleaved in ``--rounds`` rounds (default 10) of
``calls / rounds`` calls each, so that drift over the run hits every
operation alike, after a warm-up of 1,000 calls each. The script prints
microseconds per call (mean, p50, p99) per operation, then the ratios of
the Redis takes to ``PING`` and ``GET``: the cost of the decision over the
network round trip it cannot avoid. The keys it writes live under a prefix
unique to the run and are deleted at the end (they carry a TTL anyway).

Bounds: only 127.0.0.1, a fixed number of calls, no process started.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import redis

from dais_adapters.memory import MemoryThrottleState
from dais_adapters.redis_throttle import RedisThrottleState, from_url
from dais_core.policies import RatePolicy

HOST = "127.0.0.1"
WARM_UP = 1_000
GENEROUS = RatePolicy(rate=1_000_000, period=1.0, burst=1_000_000)
STINGY = RatePolicy(rate=1, period=3600.0, burst=1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per operation")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--keys", type=int, default=1_000, help="keys admitted takes cycle over"
    )
    parser.add_argument(
        "--port", type=int, default=6379, help="Redis port on 127.0.0.1"
    )
    return parser.parse_args(argv)


def operations(
    state: RedisThrottleState, client: redis.Redis, keys: int
) -> dict[str, Callable[[int], object]]:
    """Return each timed operation as a function of the call's number."""
    memory = MemoryThrottleState()
    missing = state.key_prefix + "missing"
    spent = "spent"
    state.take(spent, STINGY, time.time())
    return {
        "PING": lambda i: client.ping(),
        "GET": lambda i: client.get(missing),
        "take, admitted": lambda i: state.take(f"k{i % keys}", GENEROUS, time.time()),
        "take, refused": lambda i: state.take(spent, STINGY, time.time()),
        "take, memory": lambda i: memory.take(f"k{i % keys}", GENEROUS, time.time()),
    }


def run(
    ops: dict[str, Callable[[int], object]], calls: int, rounds: int
) -> dict[str, list[float]]:
    """Time every call of every operation, interleaved; return microseconds."""
    for op in ops.values():
        for i in range(WARM_UP):
            op(i)

    timings: dict[str, list[float]] = {name: [] for name in ops}
    per_round = max(calls // rounds, 1)
    for _ in range(rounds):
        for name, op in ops.items():
            times = timings[name]
            start = len(times)
            for i in range(start, start + per_round):
                began = time.perf_counter_ns()
                op(i)
                times.append((time.perf_counter_ns() - began) / 1000)
    return timings


def percentile(values: list[float], share: float) -> float:
    """Return the value below which ``share`` of ``values`` lie."""
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def report(timings: dict[str, list[float]]) -> None:
    """Print microseconds per call, then the ratios to the plain round trips."""
    print(f"{'operation':<16}{'calls':>8}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, times in timings.items():
        print(
            f"{name:<16}{len(times):>8}{statistics.fmean(times):>10.1f}"
            f"{percentile(times, 0.5):>10.1f}{percentile(times, 0.99):>10.1f}"
        )

    print()
    for take in ("take, admitted", "take, refused"):
        for base in ("PING", "GET"):
            mean = statistics.fmean(timings[take]) / statistics.fmean(timings[base])
            p50 = percentile(timings[take], 0.5) / percentile(timings[base], 0.5)
            print(f"{take} / {base}: {mean:.2f} x (mean), {p50:.2f} x (p50)")


def clean(client: redis.Redis, prefix: str) -> None:
    """Delete every key the run wrote."""
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for at in range(0, len(keys), 1000):
        client.delete(*keys[at : at + 1000])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    print(
        f"dais throttle benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')},"
        f" {os.cpu_count()} CPUs, {platform.platform()},"
        f" Python {platform.python_version()}, redis-py {redis.__version__}"
    )
    built = from_url(f"redis://{HOST}:{args.port}/0?on_error=closed")
    client = built.client
    prefix = f"dais:throttle:bench-{uuid.uuid4().hex}:"
    state = RedisThrottleState(client, on_error="closed", key_prefix=prefix)
    try:
        server = client.info("server")
    except redis.RedisError as exc:
        print(f"Redis at {HOST}:{args.port} is unreachable: {exc}", file=sys.stderr)
        client.close()
        return 1

    print(f"Redis {server['redis_version']} at {HOST}:{args.port}\n")
    try:
        timings = run(operations(state, client, args.keys), args.calls, args.rounds)
        report(timings)
    finally:
        clean(client, prefix)
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

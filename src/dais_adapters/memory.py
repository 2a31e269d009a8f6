"""In-process throttle state: the embedded default.

Arrival times live in a dictionary under a lock, so the throttle holds across
the worker threads of one process, not across processes.
"""

from __future__ import annotations

import threading

from dais_adapters.hooks import hookimpl
from dais_core.policies import Decision, RatePolicy, gcra

__all__ = ["MemoryThrottleState"]

_SWEEP_EVERY = 10_000


class MemoryThrottleState:
    """GCRA arrival times per key, in memory.

    Entries whose arrival time has passed carry no information (a new key
    would get the same decision), so they are dropped now and then to keep
    memory bounded by the keys active in the last few seconds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self._calls = 0

    def take(self, key: str, policy: RatePolicy, now: float) -> Decision:
        """Run one GCRA step for ``key`` at ``now`` and keep the result."""
        with self._lock:
            tat, decision = gcra(self._tat.get(key), now, policy)
            self._tat[key] = tat
            self._calls += 1
            if self._calls % _SWEEP_EVERY == 0:
                self._tat = {k: t for k, t in self._tat.items() if t > now}
            return decision


@hookimpl
def dais_throttle_state(url: str) -> MemoryThrottleState | None:
    """Serve ``memory://`` throttle state."""
    return MemoryThrottleState() if url.startswith("memory:") else None

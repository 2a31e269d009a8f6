"""Keep a gateway process's threads on one CPU; let an upload spread out.

Why one CPU. A process runs its Python under one GIL, so it uses about one
CPU at a time, but its threads hand work to one another on every request:
the event loop wakes a worker, the worker waits for the upstream without the
GIL and takes it back, and the loop is woken to write the answer. When those
threads run on different CPUs, each hand-over is a wake-up across CPUs,
which on a virtual machine goes through the hypervisor and costs more than
the work handed over. Kept on one CPU, a webhook call took about 450 µs of
CPU instead of 730 µs, and the gateway passed half as many calls again
(docs/performance.md).

Why an upload spreads. Hashing an upload and waiting for the disk run
without the GIL, beside the event loop reading the socket: on one CPU they
would queue behind each other. So the thread serving an upload widens its
own affinity to every CPU the process may use while the body streams, and
narrows it again after (:func:`widened`). Threads it starts meanwhile (the
staged copies' writers) inherit the wide set.

Affinity is set per thread, and a new thread inherits its creator's, so
:func:`pin` is called by the main thread before the server starts any.
Where the system has no CPU affinity (not Linux), nothing is pinned.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from dais_core.errors import InvalidData

__all__ = ["allowed_cpus", "choose_cpu", "pin", "widened"]

_lock = threading.Lock()
_home: int | None = None
_wide: frozenset[int] = frozenset()


def allowed_cpus() -> list[int]:
    """Return the CPUs this thread may run on, in order (empty if unknown)."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter is not None else []


def choose_cpu(setting: str, worker: int | None = None) -> int | None:
    """Return the CPU a process should keep to, or ``None`` for no pinning.

    Args:
        setting: ``auto``, ``off``, or a CPU number.
        worker: This process's index among ``serve --workers`` processes.

    Raises:
        InvalidData: The setting names a CPU this process may not use.
    """
    cpus = allowed_cpus()
    if setting == "off" or len(cpus) < 2:
        return None
    if setting != "auto":
        cpu = int(setting)
        if cpu not in cpus:
            raise InvalidData(f"CPU {cpu} is not one this process may use: {cpus}")
        return cpu
    if worker is not None:
        return cpus[worker % len(cpus)]
    current = _current_cpu()
    return current if current in cpus else cpus[0]


def pin(cpu: int) -> None:
    """Keep the calling thread, and every thread it starts later, on ``cpu``."""
    global _home, _wide
    with _lock:
        _wide = frozenset(allowed_cpus())
        os.sched_setaffinity(0, {cpu})
        _home = cpu


@contextlib.contextmanager
def widened() -> Iterator[None]:
    """Let the calling thread use every allowed CPU for a while.

    Afterwards the thread gets back the CPUs it had, even if an operator
    moved it meanwhile. A change of CPUs the system refuses (a container's
    CPU set shrank, say) leaves the thread where it is: placement is a
    matter of speed, never a reason to fail a request.
    """
    if _home is None:
        yield
        return
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, _wide)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def _current_cpu() -> int | None:
    """The CPU this thread last ran on, from ``/proc`` (Linux)."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # Field 39 of the file is the CPU; ``fields`` starts at field 3.
    return int(fields[36]) if len(fields) > 36 else None

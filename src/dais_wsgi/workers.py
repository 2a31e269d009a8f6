"""``serve --workers N``: several gateway processes on one listening socket.

One process runs waitress, Falcon and the forwarder under one GIL, so it
uses one core. With ``--workers N`` the parent binds the socket, starts N
copies of ``serve`` that inherit it and accept from it, each kept to a CPU
of its own unless ``--cpu-affinity off`` (worker i on the i-th CPU the
parent may use, round the list), and stops them (by PID) when it is
stopped. The workers share keys, services and the throttle only
through the store and the throttle state, so several workers need a shared
throttle (Redis); the caps on requests in flight stay per worker, while
the store's commit lock (PostgreSQL's advisory locks, SQLite's lock file)
spans them.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from dais_core.errors import InvalidData
from dais_wsgi.affinity import choose_cpu
from dais_wsgi.settings import Settings

__all__ = ["serve_workers", "worker_argv"]

log = logging.getLogger(__name__)


def worker_argv(argv: Sequence[str], fd: int, cpu: int | None = None) -> list[str]:
    """Return the command line of one worker: ``argv`` with one worker and ``fd``.

    Args:
        argv: The arguments the parent was given (without the program name).
        fd: The inherited listening socket.
        cpu: The CPU the worker keeps to; ``None`` for none.
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        kept.append(arg)
    affinity = "off" if cpu is None else str(cpu)
    return [
        *(sys.executable, "-m", "dais_wsgi.cli", *kept),
        *("--listen-fd", str(fd), "--cpu-affinity", affinity),
    ]


def serve_workers(settings: Settings, argv: Sequence[str], workers: int) -> int:
    """Bind, start ``workers`` worker processes, and wait for them.

    Raises:
        InvalidData: The throttle is not shared, or the address is taken.
    """
    if settings.throttle_url.startswith("memory:"):
        raise InvalidData(
            "several workers need a shared throttle: --throttle redis://host:port/db"
        )
    if settings.cpu_affinity not in {"auto", "off"}:
        raise InvalidData("with --workers, --cpu-affinity is auto or off")
    try:
        listener = socket.create_server((settings.host, settings.port), backlog=1024)
    except OSError as exc:
        raise InvalidData(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from exc
    fd = listener.fileno()
    children = [
        subprocess.Popen(
            worker_argv(argv, fd, choose_cpu(settings.cpu_affinity, worker=index)),
            pass_fds=(fd,),
            stdout=subprocess.DEVNULL,
        )
        for index in range(workers)
    ]
    port = listener.getsockname()[1]

    stopped = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    # They are in place before the announcement, so a signal sent as soon
    # as the address is known stops every worker cleanly.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"dais gateway on http://{settings.host}:{port} ({workers} workers)", flush=True
    )
    try:
        for child in children:
            child.wait()
    finally:
        listener.close()
    return max(_exit_status(child.returncode, bool(stopped)) for child in children)


def _exit_status(returncode: int, stopped: bool) -> int:
    """A worker's exit as the parent's status: 0 if it stopped when told to.

    A worker still starting when it is told to stop has no handler yet and
    dies of the SIGTERM itself: that is the stop asked for. Another signal
    gives the shell's 128 + N.
    """
    if returncode == -signal.SIGTERM and stopped:
        return 0
    return 128 - returncode if returncode < 0 else returncode

"""``serve --workers N``: several gateway processes on one listening socket.

One process runs waitress, Falcon and the forwarder under one GIL, so it
uses one core. With ``--workers N`` the parent binds the socket, starts N
copies of ``serve`` that inherit it and accept from it, each kept to a CPU
of its own unless ``--cpu-affinity off`` (worker i on the i-th CPU the
parent may use, round the list), starts another in place of one that ends,
and stops them (by PID) when it is stopped; workers stop with a parent
killed outright (:func:`die_with_parent`). The workers share keys, services
and the throttle only through the store and the throttle state, so several
workers need a shared throttle (Redis); the caps on requests in flight stay
per worker, while the store's commit lock (PostgreSQL's advisory locks,
SQLite's lock file) spans them.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from dais_core.errors import InvalidData
from dais_wsgi.affinity import choose_cpu
from dais_wsgi.server import STOP_SIGNALS
from dais_wsgi.settings import Settings

__all__ = ["die_with_parent", "serve_workers", "worker_argv"]

#: Seconds between two looks at the workers.
SUPERVISE_EVERY = 0.2
#: Workers started again within :data:`RESTART_WINDOW` seconds before the
#: parent gives up and stops them all (exit status 1).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds past the shutdown grace a worker has to stop before it is killed.
STOP_MARGIN = 10.0
_PR_SET_PDEATHSIG = 1

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
        *("--parent-pid", str(os.getpid())),
    ]


def die_with_parent(parent: int) -> None:
    """Have this worker stopped (SIGTERM) when its parent process dies.

    A parent killed outright (SIGKILL) cannot stop its workers itself; left
    running, they would go on serving with its settings and hold the port.
    Linux delivers the signal (``PR_SET_PDEATHSIG``); a parent gone before
    that was asked for is caught by its process id. Elsewhere nothing is
    done.

    Args:
        parent: The parent's process id, as it started the worker.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the parent process")
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


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
    listener = _listen(settings)
    fd = listener.fileno()

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            worker_argv(argv, fd, choose_cpu(settings.cpu_affinity, worker=index)),
            pass_fds=(fd,),
            stdout=subprocess.DEVNULL,
        )

    children = [start(index) for index in range(workers)]
    port = listener.getsockname()[1]

    stopped = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        # Once the workers close theirs, the socket is gone: a new connection
        # is refused rather than left waiting in the queue.
        listener.close()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    # They are in place before the announcement, so a signal sent as soon
    # as the address is known stops every worker cleanly.
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    print(
        f"dais gateway on http://{settings.host}:{port} ({workers} workers)", flush=True
    )
    try:
        failed = _supervise(children, start, stopped)
        if failed is not None:
            stop(signal.SIGTERM, None)
        _wait_all(children, settings.shutdown_grace + STOP_MARGIN)
    finally:
        listener.close()
    if failed is not None:
        return failed
    return max(_exit_status(child.returncode, bool(stopped)) for child in children)


def _listen(settings: Settings) -> socket.socket:
    """Bind the socket every worker accepts from.

    Raises:
        InvalidData: The address is taken or cannot be had.
    """
    try:
        return socket.create_server((settings.host, settings.port), backlog=1024)
    except OSError as exc:
        raise InvalidData(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from exc


def _supervise(
    children: list[subprocess.Popen[bytes]],
    start: Callable[[int], subprocess.Popen[bytes]],
    stopped: list[int],
) -> int | None:
    """Start another worker for each that ends, until the parent is stopped.

    Returns:
        ``None`` once stopped; else the status to exit with: a worker's 2
        (it refused to start: a setting, or a store it cannot reach), or 1
        when workers keep ending (:data:`MAX_RESTARTS` within
        :data:`RESTART_WINDOW` seconds).
    """
    restarts: collections.deque[float] = collections.deque()
    while not stopped:
        for index, child in enumerate(children):
            if stopped or child.poll() is None:
                continue
            if child.returncode == 2:
                log.error("worker %d refused to start; stopping them all", index)
                return 2
            now = time.monotonic()
            while restarts and now - restarts[0] > RESTART_WINDOW:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS:
                log.error("workers keep ending; stopping them all")
                return 1
            restarts.append(now)
            log.warning(
                "worker %d (pid %d) ended with status %s; starting another",
                index,
                child.pid,
                child.returncode,
            )
            try:
                children[index] = start(index)
            except OSError:
                if stopped:  # the stop closed the socket meanwhile
                    return None
                raise
            if stopped:
                # The stop came while it started, and did not see it.
                children[index].send_signal(signal.SIGTERM)
        time.sleep(SUPERVISE_EVERY)
    return None


def _wait_all(children: list[subprocess.Popen[bytes]], limit: float) -> None:
    """Wait for every worker; kill one still there ``limit`` seconds on.

    A worker that cannot drain (stopped with SIGSTOP, stuck in the kernel)
    would otherwise keep the parent, and the port, forever.
    """
    deadline = time.monotonic() + limit
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker (pid %d) did not stop; killing it", child.pid)
            child.kill()
            child.wait()


def _exit_status(returncode: int, stopped: bool) -> int:
    """A worker's exit as the parent's status: 0 if it stopped when told to.

    A worker still starting when it is told to stop has no handler yet and
    dies of the SIGTERM itself: that is the stop asked for. Another signal
    gives the shell's 128 + N.
    """
    if returncode == -signal.SIGTERM and stopped:
        return 0
    return 128 - returncode if returncode < 0 else returncode

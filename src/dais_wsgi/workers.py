"""``serve --workers N``: several gateway processes on one listening socket.

One process runs waitress, Falcon and urllib3 under one GIL, so it uses one
core. With ``--workers N`` the parent binds the socket, starts N copies of
``serve`` that inherit it and accept from it, and stops them (by PID) when
it is stopped. The workers share keys, services and the throttle only
through the store and the throttle state, so several workers need a shared
throttle (Redis); the caps on requests in flight and the commit lock stay
per worker.
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
from dais_wsgi.settings import Settings

__all__ = ["serve_workers", "worker_argv"]

log = logging.getLogger(__name__)


def worker_argv(argv: Sequence[str], fd: int) -> list[str]:
    """Return the command line of one worker: ``argv`` with one worker and ``fd``.

    Args:
        argv: The arguments the parent was given (without the program name).
        fd: The inherited listening socket.
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
    return [sys.executable, "-m", "dais_wsgi.cli", *kept, "--listen-fd", str(fd)]


def serve_workers(settings: Settings, argv: Sequence[str], workers: int) -> int:
    """Bind, start ``workers`` worker processes, and wait for them.

    Raises:
        InvalidData: The throttle is not shared, or the address is taken.
    """
    if settings.throttle_url.startswith("memory:"):
        raise InvalidData(
            "several workers need a shared throttle: --throttle redis://host:port/db"
        )
    try:
        listener = socket.create_server((settings.host, settings.port), backlog=1024)
    except OSError as exc:
        raise InvalidData(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from exc
    fd = listener.fileno()
    children = [
        subprocess.Popen(
            worker_argv(argv, fd), pass_fds=(fd,), stdout=subprocess.DEVNULL
        )
        for _ in range(workers)
    ]
    port = listener.getsockname()[1]

    def stop(signum: int, frame: FrameType | None) -> None:
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
    return max(child.returncode or 0 for child in children)

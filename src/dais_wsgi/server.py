"""Serve the application with waitress."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server

from dais_wsgi.app import create_app
from dais_wsgi.bootstrap import Runtime
from dais_wsgi.lane import GatewayLane
from dais_wsgi.metrics import Metrics
from dais_wsgi.streaming import StreamingChannel

__all__ = [
    "BackgroundServer",
    "Sweeper",
    "make_server",
    "run_until",
    "stop_on_signals",
    "sweep_storages",
    "wake",
]

log = logging.getLogger(__name__)


def sweep_storages(runtime: Runtime) -> None:
    """Clear staged copies a killed process left behind, before serving.

    Only copies idle for longer than a request may last are swept, so the
    uploads in flight of other gateways sharing the storage are left alone.
    """
    for scheme, storage in runtime.storages.items():
        sweep = getattr(storage, "sweep", None)
        if callable(sweep):
            try:
                sweep(min_age=runtime.settings.request_timeout)
            except Exception as exc:  # a sweep that fails never stops serving
                log.warning("could not sweep %s:// staged copies: %s", scheme, exc)


class Sweeper:
    """Sweep the storages for stale staged copies, over and over, on a thread.

    The start-up sweep clears what this gateway's killed predecessor left;
    this one clears what another gateway sharing the storage left when it
    died, without waiting for a restart. A copy counts as stale once idle
    for ``request_timeout`` and no longer locked by a writer, so sweeping
    that often removes one within two request timeouts of its last write.
    The first of these sweeps comes soon after start: a killed upload's
    copy written to just before a quick restart is too fresh for the
    start-up sweep, and goes at this one.

    Args:
        runtime: The wired gateway.
        interval: Seconds between sweeps (the request timeout, by default;
            at least one).
        first: Seconds from start to the first of them.
    """

    def __init__(
        self, runtime: Runtime, interval: float | None = None, first: float = 5.0
    ) -> None:
        self.runtime = runtime
        self.interval = max(1.0, interval or runtime.settings.request_timeout)
        self.first = min(first, self.interval)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="dais-sweeper"
        )

    def start(self) -> Sweeper:
        """Start sweeping; return ``self``."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sweeping; wait up to ``timeout`` for a sweep under way."""
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        wait = self.first
        while not self._stopping.wait(wait):
            sweep_storages(self.runtime)
            wait = self.interval


def make_server(runtime: Runtime, **overrides: Any) -> Any:
    """Return a waitress server for the runtime, bound but not yet running.

    Args:
        runtime: The wired gateway.
        **overrides: Extra waitress adjustments (for tests).
    """
    settings = runtime.settings
    sweep_storages(runtime)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "threads": settings.threads,
        # waitress counts its own listening socket and wake-up pipe too.
        "connection_limit": settings.connection_limit + 2,
        # The application enforces every body limit itself, answering JSON;
        # waitress' own limit only guards against absurd sizes.
        "max_request_body_size": 2**62,
        # Read the socket in large blocks: uploads are few and large.
        "recv_bytes": 256 * 1024,
        "channel_timeout": 60,
        # poll(), not select(): select() cannot watch a descriptor numbered
        # 1024 or above, and the process would stop at the first one.
        "asyncore_use_poll": True,
        # The application decides about forwarding headers: it drops the
        # caller's, or extends X-Forwarded-For when told to trust the proxy in
        # front, which waitress would otherwise strip before it sees them.
        "clear_untrusted_proxy_headers": not settings.trust_forwarded,
        "ident": "dais",
    }
    options.update(overrides)
    if options.get("sockets"):
        # An inherited listening socket (serve --workers): no address to bind.
        del options["host"], options["port"]
    metrics = Metrics(runtime)
    server = create_server(create_app(runtime, metrics), **options)
    server.channel_class = StreamingChannel
    server.dais_lane = None
    if settings.gateway_lane and GatewayLane.fits(runtime):
        server.dais_lane = GatewayLane(runtime, metrics, server)
    server.dais_request_timeout = settings.request_timeout
    server.dais_gateway_timeout = settings.gateway_body_timeout
    log.info("listening on http://%s:%s", settings.host, server.effective_port)
    return server


class BackgroundServer:
    """Run a waitress server on a thread of its own, and stop it cleanly.

    The event loop runs one poll at a time so that the same thread that polls
    the sockets also closes them; closing them from another thread would pull
    a descriptor out from under ``select``.

    Args:
        server: A server from :func:`make_server` or waitress' ``create_server``.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="dais-server"
        )

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server.effective_port)

    def start(self) -> BackgroundServer:
        """Start serving; return ``self``."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection and wait for the workers."""
        self._stopping.set()
        wake(self.server)
        self._thread.join(timeout)

    def _run(self) -> None:
        run_until(self.server, self._stopping)


def wake(server: Any) -> None:
    """Wake the event loop so that it sees a stop at once."""
    # The loop may have seen the stop already and closed the trigger.
    with contextlib.suppress(OSError):
        server.pull_trigger()


#: Signals that stop a server cleanly: SIGHUP too, since a closed terminal
#: would otherwise end it with no drain and no clean-up.
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP")
    if hasattr(signal, name)
)


def stop_on_signals(server: Any) -> threading.Event:
    """Make SIGTERM, SIGINT and SIGHUP stop ``server``; return the event they set.

    Call it before announcing the server, so that a signal sent as soon as
    the address is known stops it cleanly; then :func:`run_until` the event.
    """
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        wake(server)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    return stopping


def run_until(server: Any, stopping: threading.Event, grace: float = 0.0) -> None:
    """Serve until ``stopping`` is set, then drain for up to ``grace`` seconds.

    Set ``stopping`` and :func:`wake` the server to stop: that is safe
    from a signal handler, where raising is not (waitress catches whatever a
    connection's handler raises, so an exception from a signal landing there
    would be swallowed and the server would go on).

    On a stop the listening sockets close first, so no connection is taken
    any more. For up to ``grace`` seconds the requests already in flight
    (being read, waiting for a worker, or running) go on and are answered,
    and each connection is closed as soon as it holds no request; then
    every connection left is closed, and running requests get up to 5 s
    more to finish.
    """
    while not stopping.is_set():
        _loop_once(server)
    for dispatcher in list(server._map.values()):
        if isinstance(dispatcher, BaseWSGIServer):
            # Not the server's own close(): that would close the trigger too.
            wasyncore.dispatcher.close(dispatcher)
    deadline = time.monotonic() + grace
    while _close_idle(server._map) and time.monotonic() < deadline:
        _loop_once(server, timeout=min(0.1, grace))
    lane = getattr(server, "dais_lane", None)
    if lane is not None:
        lane.close()
    for dispatcher in list(server._map.values()):
        dispatcher.close()
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)


def _loop_once(server: Any, timeout: float | None = None) -> None:
    longest = server.adj.asyncore_loop_timeout if timeout is None else timeout
    lane = getattr(server, "dais_lane", None)
    server.asyncore.loop(
        timeout=longest if lane is None else lane.timeout(longest),
        map=server._map,
        use_poll=server.adj.asyncore_use_poll,
        count=1,
    )
    if lane is not None:
        lane.tick()


def _close_idle(channels: dict[int, Any]) -> int:
    """Close each connection holding no request; return how many are left."""
    busy = 0
    for channel in list(channels.values()):
        if not isinstance(channel, HTTPChannel):
            continue
        if channel.requests or channel.request is not None or channel.total_outbufs_len:
            busy += 1
        else:
            channel.close()
    return busy

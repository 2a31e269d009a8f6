"""HTTP forwarder on urllib3: pooled connections, bounded waits, pure Python.

Bodies are streamed: urllib3 reads the caller's body in blocks and sends them
as they come. The upstream's answer is drained and dropped, since the caller
gets only the status.

urllib3's read timeout bounds each wait for a byte, not the answer: an
upstream that sends one byte a second would hold the worker for as long as
it likes. So each call also has a whole-call cap, as with libcurl (connect +
read, + the body's own deadline when there is a body): a timer shuts the
call's socket when it is up, and the call fails as a timeout. The timer is a
thread per call, which this forwarder's cost per call can carry.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    HTTPError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.exceptions import (
    TimeoutError as Urllib3Timeout,
)
from urllib3.util import SKIP_HEADER, parse_url

from dais_adapters.hooks import ForwarderOptions, hookimpl
from dais_core.errors import UpstreamTimeout, UpstreamUnreachable
from dais_core.ports import ForwardRequest

__all__ = ["Urllib3Forwarder"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _translated(deadline: _Deadline) -> Iterator[None]:
    try:
        yield
    except (NewConnectionError, NameResolutionError) as exc:
        raise UpstreamUnreachable("the upstream service is unreachable") from exc
    except (HTTPError, OSError) as exc:
        if deadline.expired or _timed_out(exc):
            # Past the whole-call cap, the cut connection fails however it
            # fails: it is a timeout all the same.
            raise UpstreamTimeout(
                "the upstream service did not answer in time"
            ) from exc
        raise UpstreamUnreachable("the upstream service broke the connection") from exc


def _timed_out(exc: BaseException) -> bool:
    # urllib3 wraps a send that timed out (an upstream that stopped reading
    # the body) in a ProtocolError; a read that timed out is its own error.
    return isinstance(exc, (Urllib3Timeout, TimeoutError)) or any(
        isinstance(arg, TimeoutError) for arg in getattr(exc, "args", ())
    )


#: Headers urllib3 adds on its own unless the caller sent them.
_CLIENT_DEFAULTS = ("User-Agent", "Accept-Encoding")

#: Response bodies up to this size are read and dropped so the connection can
#: be reused; longer or unsized ones close the connection instead, so a slow
#: upstream cannot hold a worker by dripping a body nobody will read.
MAX_DRAINED = 64 * 1024


def _discard(
    response: urllib3.BaseHTTPResponse, reuse: bool, deadline: _Deadline
) -> None:
    remaining = response.length_remaining
    if reuse and remaining is not None and remaining <= MAX_DRAINED:
        response.drain_conn()
        # The call ends here: a connection drained in time goes back to the
        # pool, where no late cut can reach it; a cut one never does.
        if deadline.finish():
            response.release_conn()
            return
    response.close()
    if response.connection is not None:
        response.connection.close()
    response.release_conn()


#: The deadline of the call this thread is making, if any.
_calls = threading.local()


class _Deadline:
    """Shut the connection of one call once its time is up."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._connection: HTTPConnection | None = None
        self._finished = False
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _calls.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
        _calls.deadline = None

    def finish(self) -> bool:
        """End the watch; return whether the call ended in time."""
        self._timer.cancel()
        with self._lock:
            self._finished = True
            return not self.expired

    def watch(self, connection: HTTPConnection) -> None:
        """Note the connection the call goes on (from the call's thread)."""
        with self._lock:
            self._connection = connection
            if self.expired:
                _cut(connection)

    def _expire(self) -> None:
        # Under the lock, so that no cut lands after finish(): by then the
        # connection may be back in the pool, carrying another call.
        with self._lock:
            if self._finished:
                return
            self.expired = True
            if self._connection is not None:
                _cut(self._connection)


def _cut(connection: HTTPConnection) -> None:
    # Shutting (not closing) the socket wakes the call's blocked read, in its
    # own thread, which then fails and discards the connection.
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(HTTPConnection):
    """A connection that tells the call's deadline it carries the call."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = getattr(_calls, "deadline", None)
        if deadline is not None:
            deadline.watch(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class Urllib3Forwarder:
    """Forward requests through one urllib3 pool manager.

    Args:
        options: Timeouts and pool size.
    """

    def __init__(self, options: ForwarderOptions) -> None:
        self.options = options
        self.pool = urllib3.PoolManager(
            # Each idle connection holds a file descriptor: bounded in all.
            num_pools=16,
            maxsize=options.pool_size,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(
                connect=options.connect_timeout, read=options.read_timeout
            ),
        )
        self.pool.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }

    def forward(self, request: ForwardRequest) -> int:
        """Send ``request`` upstream and return the status.

        Raises:
            UpstreamUnreachable: No connection, or it broke.
            UpstreamTimeout: The upstream was too slow.
        """
        headers = urllib3.HTTPHeaderDict()
        for name, value in request.headers:
            headers.add(name, value)
        for name in _CLIENT_DEFAULTS:
            # Only what the caller sent: urllib3 would name itself.
            headers.setdefault(name, SKIP_HEADER)
        chunked = request.body is not None and request.content_length is None
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        limit = self.options.connect_timeout + self.options.read_timeout
        if request.body is not None:
            limit += self.options.body_timeout
        with _Deadline(limit) as deadline, _translated(deadline):
            # Straight to the host's pool: the manager's own urlopen would
            # parse the URL again and handle redirects we never follow.
            url = parse_url(request.url)
            pool = self.pool.connection_from_host(url.host, url.port, url.scheme)
            response = pool.urlopen(
                request.method,
                url.request_uri,
                body=request.body,  # type: ignore[arg-type]  # any .read() will do
                headers=headers,
                chunked=chunked,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
            # An upstream may send a body after a HEAD answer anyway, and
            # http.client returns an interim (1xx) answer as if it were the
            # last: the bytes that follow would be read as the next call's
            # answer, so the connection goes.
            reuse = request.method != "HEAD" and response.status >= 200
            _discard(response, reuse, deadline)
        if deadline.expired:
            # The cut came while the head was read: http.client takes the
            # end of the stream for the end of the head, so the status it
            # read came with a head that never arrived whole.
            raise UpstreamTimeout("the upstream service did not answer in time")
        # The query may carry the caller's data: the log gets the path only.
        log.debug("%s %s -> %d", request.method, url.path, response.status)
        return response.status


@hookimpl
def dais_forwarder(options: ForwarderOptions) -> Urllib3Forwarder | None:
    """Forward gateway calls with urllib3, when it is the client asked for."""
    return Urllib3Forwarder(options) if options.client == "urllib3" else None

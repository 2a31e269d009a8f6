"""Stream request bodies to the application while they arrive.

Stock waitress reads a whole request body before the application runs,
spooling it to a temporary file past 512 KiB, and answers
``Expect: 100-continue`` by itself. For uploads of up to 4 GiB that writes
every byte to disk twice, and a request refused on its headers (a bad key, an
over-limit ``Content-Length``) is read in full before it is refused.

:class:`StreamingChannel` hands a request with a body to a worker thread as
soon as its headers are parsed. The body flows through a bounded
:class:`BodyPipe`: the event loop appends what it receives and stops reading
the socket while the pipe is full; the application reads from it. ``100
Continue`` is sent only when the application first reads the body, so a
request refused on its headers never has its body invited. A request whose
whole body came in the same read as its head skips the pipe: waitress
buffers it in memory as usual. Only webhook calls and uploads stream
(:data:`STREAMED_PATHS`); the small bodies of the other endpoints are read
whole by waitress before the request goes to a worker. When the
application answers without reading the whole body, the connection is not
read further: the response is flushed, the sending side shut, and what the
client still sends is drained for a short while (bounded in bytes and time)
before the socket is closed, so that the client sees the answer rather than
a reset.

This relies on waitress internals (``HTTPChannel.received``, ``readable``,
``service``, the parser's ``body_rcv`` and the buffer interface of its
receivers), so ``pyproject.toml`` pins waitress to the 3.0 series and
``tests/integration/test_streaming.py`` covers the behaviour.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import socket
import threading
import time
from typing import Any

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError, get_header_lines
from waitress.receiver import ChunkedReceiver
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import BadRequest
from waitress.utilities import Error as WaitressError

from dais_core.errors import DaisError, IncompleteBody, RequestTimeout, TooLarge
from dais_core.gateway import valid_host
from dais_wsgi.bodies import MAX_SMALL_BODY

__all__ = [
    "BodyPipe",
    "JsonErrorTask",
    "KeepAliveTask",
    "StreamingChannel",
    "StreamingParser",
    "asks_to_close",
]

#: Bytes a pipe holds before the event loop stops reading the socket.
PIPE_HIGH_WATER = 4 * 2**20
#: Bytes below which a worker wakes the event loop to read again.
PIPE_LOW_WATER = 2 * 2**20
#: What a refused request's client may still send before the socket closes.
LINGER_BYTES = 4 * 2**20
LINGER_SECONDS = 2.0
DEFAULT_REQUEST_TIMEOUT = 300.0
GATEWAY_PATH = "/project-gateway/"
#: The endpoints whose bodies stream: webhook calls and uploads. Every other
#: body (admin API, login form) is small: waitress reads it whole, within
#: :data:`~dais_wsgi.bodies.MAX_SMALL_BODY`, before a worker sees the
#: request, so a client that sends its body slowly holds no worker.
STREAMED_PATHS = (GATEWAY_PATH, "/integration/")
#: Bytes on the wire a small chunked body may take, framing included (the
#: framing allowance below keeps it well under this).
SMALL_CHUNKED_WIRE = 2 * MAX_SMALL_BODY
#: The longest chunk-size line (size and extensions) of a chunked body.
#: waitress keeps an unfinished line in memory, however long it grows.
MAX_CHUNK_LINE = 4096
#: Chunk framing (size lines, line ends, extensions) a body may carry beyond
#: half its decoded bytes. Decoding costs the event loop a few microseconds
#: a chunk, so a body of one-byte chunks, or of empty lines, would make it
#: parse megabytes for nothing; a client that sends a chunk per short line
#: (twelve bytes and up) stays within it.
FRAMING_ALLOWANCE = 64 * 1024
#: Requests read ahead on one connection (pipelined) and not yet answered.
#: The last one read is answered with ``Connection: close`` and nothing more
#: is read: a client that pipelines answers it never reads would otherwise
#: hold a worker, blocked on a full output buffer, for as long as it likes.
MAX_PIPELINED = 16
#: Bytes of a chunked body handed to waitress' decoder at once: it copies
#: what is left of its input after every chunk, so its cost grows with the
#: input's length times the number of chunks in it.
CHUNKED_SLICE = 8 * 1024


class BodyPipe:
    """A bounded, thread-safe byte queue between the event loop and a worker.

    It stands in for waitress' body buffer (``append``, ``__len__``,
    ``getfile``, ``close``) on the event-loop side and is the ``wsgi.input``
    file (``read``, ``readline``, iteration) on the worker side.

    Args:
        channel: The channel, to send ``100 Continue`` and wake the loop.
        request: The request whose body this is.
        deadline: ``time.monotonic()`` value by which the body must be in.
    """

    def __init__(
        self, channel: StreamingChannel, request: Any, deadline: float
    ) -> None:
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._total = 0
        self._done = False
        self._error: DaisError | None = None
        self._channel = channel
        self._request = request
        self._deadline = deadline
        self._invited = False
        self._offset = 0
        # Set when the pipe filled up (the loop stops reading the socket);
        # cleared when a reader wakes the loop again.
        self._stalled = False

    # -- event-loop side ----------------------------------------------------

    def append(self, data: bytes) -> None:
        """Queue bytes received from the socket."""
        with self._cond:
            self._chunks.append(data)
            self._buffered += len(data)
            self._total += len(data)
            if self._buffered >= PIPE_HIGH_WATER:
                self._stalled = True
            self._cond.notify()

    def __len__(self) -> int:
        return self._total

    @property
    def full(self) -> bool:
        """Whether the loop should stop reading until the worker catches up.

        Once the pipe reaches the high-water mark it counts as full until a
        reader drains it to the low-water mark, and that reader wakes the
        loop: one wake-up per couple of MiB, not one per read.
        """
        return self._stalled

    def finish(self) -> None:
        """Mark the end of the body."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: DaisError) -> None:
        """End the body with an error the reader will raise."""
        with self._cond:
            if not self._done and self._error is None:
                self._error = error
            self._cond.notify_all()

    def getfile(self) -> BodyPipe:
        """Return the reader side: the pipe itself."""
        return self

    def close(self) -> None:
        """Drop what is queued; later reads fail."""
        with self._cond:
            self._chunks.clear()
            self._buffered = 0
            self._offset = 0
        self.fail(IncompleteBody("the request body was not read to its end"))

    # -- worker side --------------------------------------------------------

    def read(self, size: int | None = -1) -> bytes:
        """Return up to ``size`` bytes (all the rest if negative); ``b""`` at the end.

        Raises:
            IncompleteBody: The client went away before the body was complete.
            RequestTimeout: The request's deadline passed.
            TooLarge: The chunked body ran over the server's limit.
        """
        if size is not None and size >= 0:
            return self._take(size)
        parts = []
        while chunk := self._take(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        """Return one line, up to ``size`` bytes."""
        line = b""
        while not line.endswith(b"\n") and (
            size is None or size < 0 or len(line) < size
        ):
            want = 8192 if size is None or size < 0 else size - len(line)
            chunk = self._take(want)
            if not chunk:
                break
            cut = chunk.find(b"\n") + 1
            if 0 < cut < len(chunk):
                self._unread(chunk[cut:])
                chunk = chunk[:cut]
            line += chunk
        return line

    def readlines(self, hint: int = -1) -> list[bytes]:
        """Return the remaining lines."""
        return list(iter(self.readline, b""))

    def __iter__(self) -> BodyPipe:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _unread(self, data: bytes) -> None:
        with self._cond:
            if self._offset:
                self._chunks[0] = self._chunks[0][self._offset :]
                self._offset = 0
            self._chunks.appendleft(data)
            self._buffered += len(data)

    def _take(self, size: int) -> bytes:
        if not self._invited:
            self._invited = True
            self._channel.invite(self._request)
        with self._cond:
            while not self._chunks:
                if self._error is not None:
                    raise self._error
                if self._done:
                    return b""
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeout(
                        "the request did not finish within its deadline"
                    )
                self._cond.wait(min(remaining, 1.0))
            data = self._pop(size)
            # Wake the loop once there is room for many reads, not per read.
            wake = self._stalled and self._buffered <= PIPE_LOW_WATER
            if wake:
                self._stalled = False
        if wake:
            self._channel.server.pull_trigger()
        return data

    def _pop(self, size: int) -> bytes:
        # Caller holds the lock. A whole chunk is returned without a copy;
        # a part of one is sliced once, from an offset, never re-sliced.
        first, offset = self._chunks[0], self._offset
        left = len(first) - offset
        if left <= size:
            self._chunks.popleft()
            self._offset = 0
            self._buffered -= left
            return first if offset == 0 else first[offset:]
        self._offset = offset + size
        self._buffered -= size
        return first[offset : offset + size]


class StreamingParser(HTTPRequestParser):  # type: ignore[misc]
    """waitress' request parser, remembering when the request began.

    A request that declares both ``Content-Length`` and a chunked
    ``Transfer-Encoding`` is refused (400) and its connection closed: the
    two framings disagree, and passing either on is how requests are
    smuggled past a proxy (RFC 9112, section 6.1).

    waitress keeps a chunked body's unfinished chunk-size line, and its
    unfinished trailer, in memory with no bound, even where the body itself
    has none (a streamed upload): a line still unfinished past
    :data:`MAX_CHUNK_LINE` bytes (one that ends within the slice the decoder
    is handed may run to about three times that), a trailer over the header
    limit, or framing beyond
    :data:`FRAMING_ALLOWANCE`, ends the request as malformed. A chunked
    body is decoded :data:`CHUNKED_SLICE` bytes at a time.
    """

    adj: Any
    body_bytes_received: int
    completed: bool
    error: Any
    proxy_scheme: str
    proxy_netloc: str
    request_uri: str
    pipe: BodyPipe | None = None
    wants_continue = False
    streamed = False
    timed_out = False

    def __init__(self, adj: Any) -> None:
        super().__init__(adj)
        self.started = time.monotonic()

    def received(self, data: bytes) -> int:
        """Parse bytes of the request; return how many were used."""
        chunks = self.body_rcv
        if not isinstance(chunks, ChunkedReceiver):
            return self._parse(data)
        consumed = 0
        while consumed < len(data) and not self.completed:
            # The rest of a large chunk goes in one piece: it is copied once.
            size = max(CHUNKED_SLICE, chunks.chunk_remainder)
            piece = (
                data
                if size >= len(data) and not consumed
                else data[consumed : consumed + size]
            )
            used = self._parse(piece)
            consumed += used
            if used < len(piece):
                break
        return consumed

    def _parse(self, data: bytes) -> int:
        """Parse with waitress; refuse chunk framing that runs away."""
        consumed: int = super().received(data)
        chunks = self.body_rcv
        if isinstance(chunks, ChunkedReceiver) and not self.completed:
            framing = self.body_bytes_received - len(chunks)
            if len(chunks.control_line) > MAX_CHUNK_LINE:
                self._refuse(f"a chunk-size line is over {MAX_CHUNK_LINE} bytes")
            elif len(chunks.trailer) > self.adj.max_request_header_size:
                self._refuse("the chunked body's trailer is too large")
            elif framing > FRAMING_ALLOWANCE + len(chunks) // 2:
                self._refuse(
                    "the chunked body's framing outweighs its content; "
                    "send larger chunks"
                )
        return consumed

    def _refuse(self, message: str) -> None:
        self.error = BadRequest(message)
        self.completed = True

    def parse_header(self, header_plus: bytes) -> None:
        """Parse the head; note whether the body streams; refuse bad framing.

        Refused: a request framed two ways at once, a body chunked twice, an
        HTTP/1.0 request with a ``Transfer-Encoding``, an unreadable
        ``Content-Length``, two ``Content-Type`` lines, a ``#`` in the target
        or a control character in an absolute one, an HTTP/1.1 request with
        no ``Host``, a ``Host`` that is not one host[:port], and a target in
        absolute form that is not ``http`` or ``https`` with such a host.
        An absolute target's host is the request's host (RFC 9112, section
        3.3), whatever ``Host`` says.
        """
        try:
            super().parse_header(header_plus)
        except ValueError:
            # int() refuses a Content-Length of thousands of digits.
            self.connection_close = True
            raise ParsingError("Content-Length is invalid") from None
        self._check_framing(header_plus)
        self.streamed = str(self.path).startswith(STREAMED_PATHS)
        if not self.streamed:
            self.adj = _small_bodies(self.adj, bool(self.chunked))
        self._check_target(header_plus)
        self._check_host()

    def _check_framing(self, header_plus: bytes) -> None:
        """Refuse a body whose length two parsers could read differently."""
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            self.connection_close = True
            raise ParsingError("both Content-Length and Transfer-Encoding were sent")
        if self.chunked and _transfer_codings(header_plus) != [b"chunked"]:
            # waitress decodes once however often "chunked" is named; a
            # server in front that decodes twice frames the body otherwise.
            self.connection_close = True
            raise ParsingError("a body is chunked once (RFC 9112, section 6.1)")
        if "TRANSFER_ENCODING" in self.headers:
            # waitress decodes chunks for HTTP/1.1 only, and leaves the header
            # of an HTTP/1.0 request, whose framing is then faulty whatever
            # else it says (RFC 9112, section 6.1).
            self.connection_close = True
            raise ParsingError(
                f"an HTTP/{self.version} request cannot have a Transfer-Encoding"
            )

    def _check_target(self, header_plus: bytes) -> None:
        """Refuse a target, or a Content-Type, that parsers read two ways."""
        if "#" in self.request_uri:
            # A request target has no fragment (RFC 9112, 3.2); parsers cut
            # one off at different places, and a query may hide behind it.
            raise ParsingError("a request target cannot hold a fragment ('#')")
        absolute = not str(self.request_uri).startswith("/")
        if absolute and any(ch < "\x21" or ch == "\x7f" for ch in self.request_uri):
            # waitress lets a tab through, and the URL parser it uses for an
            # absolute target drops it: another path than the one sent. (The
            # application refuses one in an origin-form target itself.)
            raise ParsingError("a request target holds no control characters")
        if _field_count(header_plus, b"content-type") > 1:
            # Joined into one by waitress: parsers that keep the first line
            # or read the joined value would see different bodies.
            raise ParsingError("a request has one Content-Type")

    def _check_host(self) -> None:
        """Take an absolute target's host as the host; refuse a bad one."""
        if self.proxy_scheme or self.proxy_netloc:
            authority = str(self.proxy_netloc)
            if str(self.proxy_scheme).lower() not in {"http", "https"} or not (
                authority and valid_host(authority)
            ):
                raise ParsingError(
                    "an absolute request target must be http(s)://host[:port]/path"
                )
            self.headers["HOST"] = authority
        host = self.headers.get("HOST")
        if host is None:
            if self.version == "1.1":
                raise ParsingError("an HTTP/1.1 request needs a Host header")
        elif not valid_host(host):
            # RFC 9112, section 3.2: also two Host lines, joined by waitress.
            raise ParsingError("the Host header must be one host[:port]")


def _field_count(header_plus: bytes, name: bytes) -> int:
    """Return how many lines of a request head are the field ``name``."""
    lines = get_header_lines(header_plus.partition(b"\r\n")[2])
    return sum(line.partition(b":")[0].lower() == name for line in lines)


def _transfer_codings(header_plus: bytes) -> list[bytes]:
    """Return the transfer codings a request head names, in order.

    Every ``Transfer-Encoding`` line counts, folded lines joined, and empty
    list elements are skipped (RFC 9110, section 5.6.1).
    """
    codings: list[bytes] = []
    for line in get_header_lines(header_plus.partition(b"\r\n")[2]):
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding":
            elements = (element.strip(b" \t").lower() for element in value.split(b","))
            codings += [element for element in elements if element]
    return codings


@functools.lru_cache(maxsize=8)
def _small_bodies(adj: Any, chunked: bool) -> Any:
    """The server's settings, with a body limit for small bodies.

    waitress refuses a body of ``max_request_body_size`` bytes or more, and
    counts a chunked body's framing too (a body sent a byte a chunk takes
    six bytes on the wire): a chunked one gets room for framing here, and
    the application holds its decoded bytes to the limit
    (:func:`dais_wsgi.bodies.whole_body`).
    """
    small = copy.copy(adj)
    small.max_request_body_size = (
        SMALL_CHUNKED_WIRE + 1 if chunked else MAX_SMALL_BODY + 1
    )
    return small


class _Timeout(WaitressError):  # type: ignore[misc]
    """A request whose body did not arrive within its deadline."""

    code = 408
    reason = "Request Timeout"


_ERROR_CODES = {
    400: "invalid_data",
    408: "request_timeout",
    413: "too_large",
    431: "headers_too_large",
}
# waitress answers an unknown transfer coding with 501; for this service it
# is a malformed request like any other, so it is a 400.
_AS_BAD_REQUEST = {501}
# Status names as RFC 9110 gives them, where waitress uses older ones.
_REASONS = {413: "Content Too Large"}


class JsonErrorTask(ErrorTask):  # type: ignore[misc]
    """Answer the requests waitress refuses itself (bad framing, huge headers)
    with the same small JSON error body as the application's own errors."""

    def execute(self) -> None:
        """Write the error as JSON and close the connection after it."""
        error = self.request.error
        code, reason = error.code, error.reason
        if code in _AS_BAD_REQUEST:
            code, reason = 400, "Bad Request"
        reason = _REASONS.get(code, reason)
        body = json.dumps(
            {
                "error": _ERROR_CODES.get(code, "internal_error"),
                "message": self._message(code, f"{reason}: {error.body}"),
            }
        ).encode()
        self.status = f"{code} {reason}"
        # The version this server speaks (RFC 9110, section 2.5), also for
        # a request refused before its request line was read (headers too
        # large), which waitress would answer as HTTP/1.0.
        self.version = "1.1"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)

    def _message(self, code: int, said: str) -> str:
        if code == 413 and not self.request.streamed:
            # waitress counts "this many bytes or more", framing included:
            # name the limit the body is held to.
            return f"the body is over the limit of {MAX_SMALL_BODY} bytes"
        if code == 413:
            # A length past what the server takes at all (2**62 bytes): the
            # endpoint's own limit, far lower, is in its error otherwise.
            return "the body is over the server's limit"
        if isinstance(self.request.error, _Timeout):
            return str(self.request.error.body)
        return said


class KeepAliveTask(WSGITask):  # type: ignore[misc]
    """Keep the connection open after an answer that cannot have a body.

    waitress 3.0 closes the connection after every answer without a
    ``Content-Length``, 204 and 304 included, although those have no body by
    definition (RFC 9110, section 6.4.1) and must not carry a length. A
    caller whose service answers 204 would pay a new connection for every
    webhook call (an open pull request upstream, Pylons/waitress#502).
    """

    _bodiless_keep = False

    def build_response_header(self) -> bytes:
        """Build the header; a 1xx, 204 or 304 on HTTP/1.1 keeps the connection.

        An answer given while the request's body is still coming (a refusal
        on the headers) closes the connection, and says so: the rest of the
        body is not read, only drained for a moment (see
        :meth:`StreamingChannel.service`), and a client that took the
        connection as kept would send its next request into the close. So
        does an answer to a body whose framing broke (a bad chunk, one cut
        off over the limit): where it ended is unknown, so what follows it
        is never read as a request (RFC 9112, section 6.3).
        """
        request = self.request
        if _body_unfinished(request):
            # Before the answer can be flushed: see StreamingChannel.handle_close.
            self.channel.linger_pending = True
            self.set_close_on_finish()
        if asks_to_close(request.headers.get("CONNECTION", "")):
            # waitress closes for "close" alone; RFC 9112, section 9.6, for
            # a "close" option anywhere in the list ("close, x-trace").
            self.set_close_on_finish()
        self._bodiless_keep = (
            not self.close_on_finish and not self.has_body and self.version == "1.1"
        )
        try:
            header: bytes = super().build_response_header()
        finally:
            self._bodiless_keep = False
        return header

    def set_close_on_finish(self) -> None:
        """Close after this answer, unless it is a bodiless one being kept."""
        # Inside build_response_header, waitress closes a kept-alive HTTP/1.1
        # connection for one reason only: the answer has no length.
        if not self._bodiless_keep:
            super().set_close_on_finish()


def _body_unfinished(request: Any) -> bool:
    """Whether a streamed body is still coming, or broke off."""
    return getattr(request, "pipe", None) is not None and (
        not request.completed or request.error is not None
    )


def asks_to_close(connection: str) -> bool:
    """Whether a ``Connection`` header's options include ``close``."""
    return "close" in (option.strip().lower() for option in connection.split(","))


def _whole_body_in(request: StreamingParser, received: int) -> bool:
    """Whether the bytes in hand already hold the request's whole body.

    Such a request (a small webhook call, sent in one piece with its head)
    gains nothing from streaming: waitress buffers it in memory as usual
    and the request goes to a worker complete, without a pipe.
    """
    return (
        not request.chunked
        and not request.expect_continue
        and request.content_length <= received
    )


class StreamingChannel(HTTPChannel):  # type: ignore[misc]
    """A waitress channel that streams request bodies to the application."""

    parser_class = StreamingParser
    error_task_class = JsonErrorTask
    task_class = KeepAliveTask
    request: StreamingParser | None
    requests: list[StreamingParser]
    will_close: bool
    close_when_flushed: bool
    linger_until = 0.0
    linger_budget = 0
    linger_shut = False
    #: An answer is on its way while the client may still be sending: once
    #: it is flushed, drain before closing (see :meth:`handle_close`).
    linger_pending = False
    pipeline_full = False

    @property
    def request_timeout(self) -> float:
        """Seconds a whole request may take (the server's setting)."""
        return float(
            getattr(self.server, "dais_request_timeout", DEFAULT_REQUEST_TIMEOUT)
        )

    def received(self, data: bytes) -> bool:
        """Parse incoming bytes; dispatch a request as soon as its headers are in."""
        if not data:
            return False
        with self.requests_lock:
            if self.linger_until:
                self.linger_budget -= len(data)
                return True
            if self.will_close or self.close_when_flushed:
                return False
            if self.pipeline_full:
                return True
            while data:
                if self.request is None:
                    self.request = self.parser_class(self.adj)
                request = self.request
                consumed = request.received(data)
                if (
                    request.expect_continue
                    and request.headers_finished
                    and not request.streamed
                    and not request.completed
                    and not self.requests
                    and not self.sent_continue
                ):
                    # A small body is read here, not by the application: invite
                    # it at once, as stock waitress does (after the answers
                    # still owed, when there are some: see its service()).
                    self.send_continue()
                if (
                    request.headers_finished
                    and request.streamed
                    and not request.completed
                    and request.pipe is None
                    and request.body_rcv is not None
                    and not _whole_body_in(request, len(data) - consumed)
                ):
                    self._dispatch_streaming(request)
                if request.completed:
                    self._completed(request)
                    if len(self.requests) >= MAX_PIPELINED:
                        self._stop_reading_ahead()
                        break
                if consumed >= len(data):
                    break
                data = data[consumed:]
        return True

    def _stop_reading_ahead(self) -> None:
        # Caller holds requests_lock. The client learns from the last answer
        # that the connection closes, and sends the rest again elsewhere
        # (RFC 9112, section 9.3.2).
        self.requests[-1].headers["CONNECTION"] = "close"
        self.pipeline_full = True

    def _dispatch_streaming(self, request: StreamingParser) -> None:
        # Caller holds requests_lock.
        deadline = request.started + self.request_timeout
        if str(request.path).startswith(GATEWAY_PATH):
            gateway = getattr(self.server, "dais_gateway_timeout", self.request_timeout)
            deadline = request.started + min(float(gateway), self.request_timeout)
        pipe = BodyPipe(self, request, deadline)
        request.body_rcv.getbuf().close()
        request.body_rcv.buf = pipe
        request.pipe = pipe
        if request.chunked:
            # waitress drops the header once it has decoded the chunks; the
            # application, reading before the end, needs to know.
            request.headers["TRANSFER_ENCODING"] = "chunked"
        request.wants_continue = request.expect_continue
        request.expect_continue = False
        self.requests.append(request)
        if len(self.requests) == 1:
            self.server.add_task(self)

    def _completed(self, request: StreamingParser) -> None:
        # Caller holds requests_lock.
        self.sent_continue = False
        if request.pipe is not None:
            if request.error is None:
                request.pipe.finish()
            elif request.error.code == 413:
                request.pipe.fail(TooLarge("the body is over the server's limit"))
            else:
                said = request.error.body
                request.pipe.fail(
                    IncompleteBody(f"the body's framing is malformed: {said}")
                )
        elif not request.empty and not self._lane_took(request):
            self.requests.append(request)
            if len(self.requests) == 1:
                self.server.add_task(self)
        self.request = None

    def _lane_took(self, request: StreamingParser) -> bool:
        # Caller holds requests_lock. Only with no answer owed: answers go
        # out in the order the requests came.
        lane = getattr(self.server, "dais_lane", None)
        return (
            lane is not None
            and not self.requests
            and request.error is None
            and lane.take(self, request)
        )

    def invite(self, request: StreamingParser) -> None:
        """Send ``100 Continue`` if the client waits for it (from a worker)."""
        if request.wants_continue:
            request.wants_continue = False
            self.write_soon(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.server.pull_trigger()

    def readable(self) -> bool:
        """Read while a streamed body has room, or while lingering."""
        # The event loop asks every channel this on each turn, about twenty
        # times per request: an idle connection is answered first.
        if self.linger_until:
            if time.monotonic() > self.linger_until or self.linger_budget <= 0:
                self.will_close = True
                return False
            return True
        if self.pipeline_full:
            return False
        request = self.request
        if request is None:
            return bool(super().readable())
        if time.monotonic() - request.started > self.request_timeout:
            if request.pipe is None:
                self._time_out(request)
                return False
            request.pipe.fail(
                RequestTimeout("the request did not finish within its deadline")
            )
        if request.pipe is not None:
            return not (self.will_close or self.close_when_flushed or request.pipe.full)
        return bool(super().readable())

    def _time_out(self, request: StreamingParser) -> None:
        """End a request that is not streamed, past its deadline.

        Stalled headers close the connection. A small body too slow to
        arrive becomes a 408, answered after the answers still owed on this
        connection (a request before it may still be with a worker), and
        the connection then lingers and closes as after any refusal.
        """
        with self.requests_lock:
            if not request.headers_finished:
                self.will_close = True
                return
            request.error = _Timeout("the request did not finish within its deadline")
            request.completed = True
            request.timed_out = True
            self.linger_pending = True
            self._completed(request)

    def handle_read(self) -> None:
        """Read from the socket; a closed socket ends a streamed body."""
        super().handle_read()
        if not self.connected:
            self._fail_body()

    def handle_close(self) -> None:
        """Close the socket; a streamed body still coming ends with an error.

        When the answer to a request whose body was left unread has been
        flushed, the connection lingers first instead: closing a socket with
        unread input resets it, and the client may lose the answer. The
        worker that wrote the answer switches to lingering too, in
        :meth:`service`, but the event loop may flush and get here first.
        """
        if self.linger_pending and not self.linger_until and self.connected:
            with self.requests_lock:
                self._start_lingering()
            return
        self._fail_body()
        super().handle_close()

    def writable(self) -> bool:
        """Write while output is pending, or to shut the sending side."""
        return bool(super().writable()) or bool(
            self.linger_until and not self.linger_shut
        )

    def handle_write(self) -> None:
        """Flush output; when lingering, shut the sending side once flushed."""
        super().handle_write()
        if not self.connected:
            # Closed already: the client left, seen in the same turn of the
            # event loop as this write.
            return
        if self.linger_until and not self.linger_shut and not self.total_outbufs_len:
            self.linger_shut = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                self.will_close = True

    def service(self) -> None:
        """Serve one request; stop reading a body the application left unread."""
        request = self.requests[0]
        super().service()
        if _body_unfinished(request) or request.timed_out:
            with self.requests_lock:
                if not self.linger_until:
                    self._start_lingering()
            self.server.pull_trigger()

    def _start_lingering(self) -> None:
        # Caller holds requests_lock.
        self.request = None
        self.will_close = False
        self.close_when_flushed = False
        self.linger_until = time.monotonic() + LINGER_SECONDS
        self.linger_budget = LINGER_BYTES

    def _fail_body(self) -> None:
        request = self.request
        if request is not None and request.pipe is not None:
            request.pipe.fail(
                IncompleteBody(
                    "the client closed the connection before the body was complete"
                )
            )

"""HTTP forwarder on libcurl (pycurl): the default, and the cheapest per call.

A forward is one ``perform()``: libcurl sends the request, streams the body
from the caller's stream, reads the answer and keeps the connection, all
without the GIL. urllib3 does the same exchange in many small Python steps,
each taking the GIL back under contention; in the served gateway that costs
several times more CPU per call (docs/performance.md).

Each handle keeps at most one connection, and the forwarder lends handles
out one per call (a handle is never used by two threads at once). Idle
handles wait for another call to the same upstream (scheme, host and
port): at most ``pool_size`` per upstream and :data:`MAX_IDLE` in all, the
longest idle closed first, since each holds three file descriptors (its
socket and libcurl's two wake-up descriptors). Before a pooled connection
is used again the forwarder looks at its socket itself: one the upstream
closed, reset, or sent stray bytes on while idle is dropped, and the call
goes on a new connection. libcurl makes the same check at most once a
second per connection, so without ours a POST after an upstream's short
idle timeout would go on a dead connection, and could not be sent again.

:class:`CurlLoop` makes the same calls without a thread: libcurl's multi
interface, driven by the event loop that reads the callers' requests (see
:mod:`dais_wsgi.lane`). It takes bodies already in hand, and keeps each
pooled connection in a multi handle of its own, so that it can look at an
idle connection as the handles here do.

A body of known length up to 64 KiB (nearly every webhook call) is read
whole before the call and handed to libcurl at once: libcurl then needs no
Python callback to send it, or to send it again on a fresh connection, and
a caller that breaks off mid-body never leaves the upstream a partial one.
A longer or unsized body streams through a read callback.

Timeouts, in libcurl's terms: ``connect_timeout`` bounds the connection;
``read_timeout`` is libcurl's stall limit (under one byte a second for that
many whole seconds); and the whole exchange is capped at connect + read (+
the body's own deadline when there is a body), so an upstream that drips its
answer cannot hold a worker either. libcurl judges speed over a moving
window of about five seconds, so a stall right after a body was sent is
caught up to about five seconds late. Watching progress from Python instead
would be exact to a second, but its callback takes the GIL about ten times
a call, which cost a tenth of the gateway's throughput (docs/performance.md).
"""

from __future__ import annotations

import collections
import logging
import math
import re
import select
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pycurl

from dais_adapters.hooks import ForwarderOptions, hookimpl
from dais_core.errors import (
    DaisError,
    IncompleteBody,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from dais_core.ports import ForwardRequest, Readable

__all__ = ["CurlForwarder", "CurlLoop", "Outcome"]

log = logging.getLogger(__name__)

#: Response bodies up to this size are read and dropped so the connection can
#: be reused; a longer or unsized one is cut off once its headers are in, so a
#: slow upstream cannot hold a worker by dripping a body nobody will read.
MAX_DRAINED = 64 * 1024

#: Bytes of a body kept for sending it again on a fresh connection.
MAX_REPLAYED = 64 * 1024

#: A body of known length up to this size is read before the call and given
#: to libcurl whole.
MAX_WHOLE = 64 * 1024

#: Methods a request may be sent twice with (RFC 9110, section 9.2.2). libcurl
#: resends a request on a new connection when a reused one broke before any
#: answer; for any other method that could apply it twice (the upstream may
#: have read it before closing), so such a call fails with 502 instead.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: Methods that define a meaning for content: without a body they are sent
#: with ``Content-Length: 0`` (RFC 9110, section 8.6).
_CONTENT_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: Headers libcurl (and pycurl, naming every library version) would add on
#: their own (a body given whole would be labelled a form); an empty value
#: tells libcurl not to.
_CURL_DEFAULTS = ("Accept", "Content-Type", "Expect", "User-Agent")

_TIMED_OUT = {pycurl.E_OPERATION_TIMEDOUT}

#: Characters that would split or end a header line.
_LINE_BREAKERS = re.compile("[\r\n\0]")

#: Idle handles kept in all, whatever the upstream (the longest idle go).
MAX_IDLE = 32


class _Exchange:
    """One call's state, fed by libcurl's callbacks.

    libcurl hands over the answer's header lines one by one and allows no
    ``getinfo`` while it runs, so the status and the announced length are
    taken from those lines here.
    """

    def __init__(self, body: Readable | None, head: bool, resendable: bool) -> None:
        self.body = body
        self.head = head
        self.status = 0
        self.length: int | None = None
        self.at_start = True
        self.answered = False
        self.drained = 0
        self.failure: BaseException | None = None
        # What was read of the body, kept while small, so that libcurl can
        # send it again on a fresh connection when a reused one turns out
        # to have been closed by the upstream; only for a call it may resend.
        self.sent: bytearray | None = bytearray() if resendable else None
        self.replay = 0
        self.attempts = 0

    def once(self, *connection: object) -> int:
        """Let the request go out once; refuse libcurl's resend of it."""
        self.attempts += 1
        if self.attempts > 1:
            return pycurl.PREREQFUNC_ABORT
        return pycurl.PREREQFUNC_OK

    def seek(self, offset: int, origin: int) -> int:
        """Go back to the start of the body, if what was read is still kept."""
        if offset != 0 or origin != 0 or self.sent is None:
            return pycurl.SEEKFUNC_CANTSEEK
        self.replay = 0
        return pycurl.SEEKFUNC_OK

    def read(self, size: int) -> bytes | int:
        """Hand libcurl the next block of the caller's body."""
        assert self.body is not None
        sent = self.sent
        if sent is not None and self.replay < len(sent):
            block = bytes(sent[self.replay : self.replay + size])
            self.replay += len(block)
            return block
        try:
            block = self.body.read(size)
        except BaseException as exc:  # re-raised once perform() returns
            self.failure = exc
            return pycurl.READFUNC_ABORT
        if sent is not None:
            sent += block
            self.replay = len(sent)
            if len(sent) > MAX_REPLAYED:
                self.sent = None
        return block

    def header(self, line: bytes) -> int | None:
        """Note the status and length; cut off a body too long to drain."""
        if self.at_start:
            # The status line: "HTTP/1.1 200 OK", three digits.
            self.at_start = False
            code = line.split(None, 2)[1:2]
            valid = code and len(code[0]) == 3 and code[0].isdigit()
            self.status = int(code[0]) if valid else 0
            self.length = None
            return None
        if line.strip() == b"":
            # The end of one answer's head; an interim (1xx) one is followed
            # by another.
            if self.status == 101:
                return -1  # no upgrade was asked for: no final answer follows
            self.at_start = self.status < 200
            self.answered = not self.at_start
            if self.answered and self._too_long():
                return -1
            return None
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            self.length = int(value.strip()) if value.strip().isdigit() else None
        return None

    def write(self, data: bytes) -> int | None:
        """Drop the body's bytes; stop if it runs past what may be drained."""
        self.drained += len(data)
        if self.drained > MAX_DRAINED:
            return -1
        return None

    def _too_long(self) -> bool:
        if self.head or self.status in (204, 304):
            return False
        return self.length is None or self.length > MAX_DRAINED


def _header_lines(request: ForwardRequest) -> list[bytes]:
    # WSGI gives header values as latin-1 text (PEP 3333): they go back out
    # as the same bytes, which pycurl would otherwise encode as ASCII.
    lines = []
    present = set()
    for name, value in request.headers:
        if _LINE_BREAKERS.search(name) or _LINE_BREAKERS.search(value):
            # waitress refuses these on the way in; never let one split a line.
            continue
        present.add(name.lower())
        # libcurl drops "Name:" (empty value) unless it is written "Name;".
        line = f"{name}: {value}" if value else f"{name};"
        lines.append(line.encode("latin-1"))
    lines += [
        f"{name}:".encode() for name in _CURL_DEFAULTS if name.lower() not in present
    ]
    if request.body is None and request.method in _CONTENT_METHODS:
        lines.append(b"Content-Length: 0")
    return lines


class CurlForwarder:
    """Forward requests through pooled libcurl handles.

    Args:
        options: Timeouts and the connections each handle keeps.
    """

    def __init__(self, options: ForwarderOptions) -> None:
        self.options = options
        # Idle handles and their upstreams, the longest idle first.
        self._idle: collections.OrderedDict[int, tuple[str, pycurl.Curl]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def forward(self, request: ForwardRequest) -> int:
        """Send ``request`` upstream and return the status.

        Raises:
            UpstreamUnreachable: No connection, or it broke.
            UpstreamTimeout: The upstream was too slow.
            DaisError: Reading the caller's body failed (too large, cut off).
        """
        whole = _whole_body(request)
        upstream = _upstream_of(request.url)
        handle = self._borrow(upstream)
        try:
            exchange = _Exchange(
                None if whole is not None else request.body,
                head=request.method == "HEAD",
                resendable=request.method in _IDEMPOTENT,
            )
            _prepare(handle, self.options, request, exchange, whole)
            self._perform(handle, exchange)
        except BaseException:
            handle.close()
            raise
        self._give_back(upstream, handle)
        # The query may carry the caller's data: the log gets the method only.
        log.debug("%s -> %d", request.method, exchange.status)
        return exchange.status

    def close(self) -> None:
        """Close every idle handle and its connections."""
        with self._lock:
            idle, self._idle = self._idle, collections.OrderedDict()
        for _, handle in idle.values():
            handle.close()

    def _borrow(self, upstream: str) -> pycurl.Curl:
        while True:
            with self._lock:
                handle = self._take_idle(upstream)
            if handle is None:
                return _new_handle(self.options)
            if _reusable(handle):
                return handle
            handle.close()

    def _take_idle(self, upstream: str) -> pycurl.Curl | None:
        # Caller holds the lock. The most recently used first: its
        # connection is the likeliest still open.
        for key in reversed(self._idle):
            if self._idle[key][0] == upstream:
                return self._idle.pop(key)[1]
        return None

    def _give_back(self, upstream: str, handle: pycurl.Curl) -> None:
        evicted: list[pycurl.Curl] = []
        with self._lock:
            same = [key for key, (up, _) in self._idle.items() if up == upstream]
            if len(same) >= self.options.pool_size:
                evicted.append(self._idle.pop(same[0])[1])
            self._idle[id(handle)] = (upstream, handle)
            while len(self._idle) > MAX_IDLE:
                evicted.append(self._idle.popitem(last=False)[1][1])
        for extra in evicted:
            extra.close()

    def _perform(self, handle: pycurl.Curl, exchange: _Exchange) -> None:
        try:
            handle.perform()
        except pycurl.error as exc:
            error: pycurl.error | None = exc
        else:
            error = None
        _settle(exchange, error)


#: What a call's callback is given: the upstream's status, or why it failed.
Outcome = int | DaisError


class _Slot:
    """One pooled connection: a libcurl handle in a multi handle of its own.

    A multi handle keeps its connections for every handle it runs; one per
    connection keeps each connection with one handle, as a handle of
    :class:`CurlForwarder` keeps its own, so the loop can look at an idle
    connection's socket before reusing it.
    """

    def __init__(
        self, options: ForwarderOptions, watch: Callable[[int, int, _Slot], None]
    ) -> None:
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._timer)
        self.multi.setopt(pycurl.M_MAXCONNECTS, 1)
        self.handle = _new_handle(options)
        self.deadline: float | None = None
        #: The idle connection's socket, from the end of the last call.
        self.kept = -1
        self.call: tuple[_Exchange, Callable[[Outcome], None]] | None = None
        #: The sockets libcurl asked the loop to watch for this slot.
        self.watched: set[int] = set()
        self._watch = watch

    def _socket(self, what: int, fd: int, multi: object, data: object) -> None:
        events = (
            0 if what == pycurl.POLL_REMOVE else what & (CurlLoop.READ | CurlLoop.WRITE)
        )
        self._watch(fd, events, self)

    def _timer(self, ms: int) -> None:
        self.deadline = None if ms < 0 else time.monotonic() + ms / 1000

    def close(self) -> None:
        """Close the handle and its connection."""
        if self.call is not None:
            self.multi.remove_handle(self.handle)
            self.call = None
        self.handle.close()
        self.multi.close()


class CurlLoop:
    """Forward calls from an event loop, with no thread held per call.

    libcurl's multi interface runs every call on the thread that drives it:
    the event loop owning the caller's connections. It says which sockets to
    watch through ``watch(fd, events)`` (``events`` is 0 to stop watching,
    else :data:`READ` and/or :data:`WRITE`); the loop reports each ready
    socket to :meth:`ready` and calls :meth:`expire` once :attr:`deadline`
    passes. Each call ends with its callback, on that same thread, given the
    status or the domain error. Calls go out exactly as
    :class:`CurlForwarder` sends them: the same options, headers, timeouts
    and resend rule, and connections pooled the same way, each looked at
    before it is used again. Nothing here is thread-safe: only the loop's
    thread may touch it.

    Args:
        options: Timeouts and pool sizes.
        watch: Called with a socket and the events to watch it for.
    """

    READ = 1
    WRITE = 2

    def __init__(
        self, options: ForwarderOptions, watch: Callable[[int, int], None]
    ) -> None:
        self.options = options
        self._watch = watch
        # Idle slots and their upstreams, the longest idle first.
        self._idle: collections.OrderedDict[int, tuple[str, _Slot]] = (
            collections.OrderedDict()
        )
        self._busy: dict[int, tuple[str, _Slot]] = {}
        self._owners: dict[int, _Slot] = {}

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` value by which :meth:`expire` is due, if any."""
        due = [slot.deadline for _, slot in self._busy.values() if slot.deadline]
        return min(due) if due else None

    def start(
        self, request: ForwardRequest, body: bytes, done: Callable[[Outcome], None]
    ) -> None:
        """Begin a call whose body is in hand; ``done`` gets its outcome later.

        It never runs before this returns: libcurl starts the call at the
        next :meth:`expire`, which it asks for at once.

        Raises:
            UpstreamUnreachable: libcurl could not set the call up (out of
                file descriptors, say); nothing was sent.
        """
        upstream = _upstream_of(request.url)
        exchange = _Exchange(
            None,
            head=request.method == "HEAD",
            resendable=request.method in _IDEMPOTENT,
        )
        whole = None if request.body is None or exchange.head else body
        try:
            slot = self._borrow(upstream)
        except pycurl.error as exc:
            raise UpstreamUnreachable("the call could not be started") from exc
        try:
            _prepare(slot.handle, self.options, request, exchange, whole)
            slot.multi.add_handle(slot.handle)
        except pycurl.error as exc:
            self._discard(slot)
            raise UpstreamUnreachable("the call could not be started") from exc
        slot.call = (exchange, done)
        self._busy[id(slot)] = (upstream, slot)

    def ready(self, fd: int, events: int) -> None:
        """Let libcurl act on a socket the loop found ready (READ and/or WRITE)."""
        slot = self._owners.get(fd)
        if slot is not None and slot.call is not None:
            self._act(slot, fd, events)

    def expire(self) -> None:
        """Let libcurl act on the timers that are due (start calls, time them out)."""
        now = time.monotonic()
        for _, slot in list(self._busy.values()):
            if slot.deadline is not None and slot.deadline <= now and slot.call:
                slot.deadline = None
                self._act(slot, pycurl.SOCKET_TIMEOUT, 0)

    def close(self) -> None:
        """Abandon every call under way and close every connection."""
        slots = [slot for _, slot in (*self._busy.values(), *self._idle.values())]
        self._busy.clear()
        self._idle.clear()
        for slot in slots:
            self._discard(slot)

    def _watch_for(self, fd: int, events: int, slot: _Slot) -> None:
        if events:
            self._owners[fd] = slot
            slot.watched.add(fd)
        else:
            slot.watched.discard(fd)
            if self._owners.get(fd) is slot:
                del self._owners[fd]
        self._watch(fd, events)

    def _discard(self, slot: _Slot) -> None:
        """Close a slot, its sockets unwatched first: their numbers are reused."""
        for fd in list(slot.watched):
            self._watch_for(fd, 0, slot)
        slot.close()

    def _borrow(self, upstream: str) -> _Slot:
        for key in reversed(self._idle):
            if self._idle[key][0] != upstream:
                continue
            slot = self._idle.pop(key)[1]
            if slot.kept == -1 or _open_and_quiet(slot.kept):
                return slot
            self._discard(slot)
            return _Slot(self.options, self._watch_for)
        return _Slot(self.options, self._watch_for)

    def _act(self, slot: _Slot, fd: int, events: int) -> None:
        multi = slot.multi
        while True:
            code, _ = multi.socket_action(fd, events)
            if code != pycurl.E_CALL_MULTI_PERFORM:
                break
        _, ended, failed = multi.info_read()
        if ended:
            self._end(slot, None)
        elif failed:
            _, code, message = failed[0]
            self._end(slot, pycurl.error(code, message))

    def _end(self, slot: _Slot, error: pycurl.error | None) -> None:
        upstream, _ = self._busy.pop(id(slot))
        assert slot.call is not None
        exchange, done = slot.call
        slot.call = None
        slot.kept = slot.handle.getinfo(pycurl.ACTIVESOCKET)
        slot.multi.remove_handle(slot.handle)
        outcome: Outcome
        try:
            _settle(exchange, error)
            outcome = exchange.status
        except DaisError as exc:
            outcome = exc
        if error is None:
            self._give_back(upstream, slot)
        else:
            self._discard(slot)
        done(outcome)

    def _give_back(self, upstream: str, slot: _Slot) -> None:
        same = [key for key, (up, _) in self._idle.items() if up == upstream]
        if len(same) >= self.options.pool_size:
            self._discard(self._idle.pop(same[0])[1])
        self._idle[id(slot)] = (upstream, slot)
        while len(self._idle) > MAX_IDLE:
            self._discard(self._idle.popitem(last=False)[1][1])


def _new_handle(options: ForwarderOptions) -> pycurl.Curl:
    """Return a libcurl handle set up for the gateway's calls."""
    handle = pycurl.Curl()
    settings: dict[int, Any] = {
        pycurl.NOSIGNAL: 1,
        # Only what the registry names: no proxy from the environment,
        # no other protocol, no redirect, and the path exactly as checked.
        pycurl.PROXY: "",
        pycurl.PROTOCOLS: pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS,
        pycurl.FOLLOWLOCATION: 0,
        pycurl.PATH_AS_IS: 1,
        # One connection per handle: the one _reusable() looks at.
        pycurl.MAXCONNECTS: 1,
        pycurl.CONNECTTIMEOUT_MS: _ms(options.connect_timeout),
        pycurl.LOW_SPEED_LIMIT: 1,
        pycurl.LOW_SPEED_TIME: max(1, math.ceil(options.read_timeout)),
    }
    for option, value in settings.items():
        handle.setopt(option, value)
    return handle


def _prepare(
    handle: pycurl.Curl,
    options: ForwarderOptions,
    request: ForwardRequest,
    exchange: _Exchange,
    whole: bytes | None,
) -> None:
    """Set a handle up for one call."""
    limit = options.connect_timeout + options.read_timeout
    sends = request.body is not None and not exchange.head and whole is None
    handle.setopt(pycurl.URL, request.url)
    handle.setopt(pycurl.HTTPHEADER, _header_lines(request))
    handle.setopt(pycurl.HEADERFUNCTION, exchange.header)
    handle.setopt(pycurl.WRITEFUNCTION, exchange.write)
    # A handle remembers its last call: UPLOAD first, since it resets the
    # method (to GET, where a body given whole earlier is not sent), then
    # NOBODY (HEAD waits for no body), the whole body, then the verb.
    handle.setopt(pycurl.UPLOAD, 1 if sends else 0)
    handle.setopt(pycurl.NOBODY, 1 if exchange.head else 0)
    if whole is not None:
        handle.setopt(pycurl.POSTFIELDSIZE_LARGE, len(whole))
        handle.setopt(pycurl.POSTFIELDS, whole)
    handle.setopt(pycurl.CUSTOMREQUEST, request.method)
    # An upstream may send a body after a HEAD answer anyway; those bytes
    # would be read as the next call's answer, so the connection goes.
    handle.setopt(pycurl.FORBID_REUSE, 1 if exchange.head else 0)
    resendable = exchange.sent is not None
    handle.setopt(pycurl.PREREQFUNCTION, None if resendable else exchange.once)
    if not sends:
        handle.setopt(pycurl.TIMEOUT_MS, _ms(limit))
        return
    handle.setopt(pycurl.SEEKFUNCTION, exchange.seek)
    handle.setopt(pycurl.READFUNCTION, exchange.read)
    # -1 (no length) makes libcurl send the body chunked.
    length = request.content_length
    handle.setopt(pycurl.INFILESIZE_LARGE, -1 if length is None else length)
    handle.setopt(pycurl.TIMEOUT_MS, _ms(limit + options.body_timeout))


def _settle(exchange: _Exchange, error: pycurl.error | None) -> None:
    """Turn how a call ended into its outcome: return, or a domain error.

    Raises:
        DaisError: Reading the caller's body failed.
        UpstreamUnreachable: No connection, it broke, or no answer came.
        UpstreamTimeout: The upstream was too slow.
    """
    failure = exchange.failure
    if failure is not None:
        # Reading the caller's body failed: that is the error to report.
        if isinstance(failure, DaisError):
            raise failure
        raise UpstreamUnreachable(
            "the caller's body could not be sent upstream"
        ) from failure
    if error is None or exchange.answered:
        # Done, or the answer's head was whole and only its body, which
        # nobody reads, was cut off or failed.
        if not exchange.answered:
            raise UpstreamUnreachable("the upstream service sent no answer")
        return
    code = error.args[0]
    if code in _TIMED_OUT:
        raise UpstreamTimeout("the upstream service did not answer in time") from error
    raise UpstreamUnreachable(_unreachable(code)) from error


def _upstream_of(url: str) -> str:
    """The pool a URL's connections belong to: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _reusable(handle: pycurl.Curl) -> bool:
    """Whether the connection a handle keeps, if any, may carry another call."""
    sock = handle.getinfo(pycurl.ACTIVESOCKET)
    if sock == -1:
        return True  # none kept: libcurl connects afresh
    return _open_and_quiet(sock)


def _open_and_quiet(sock: int) -> bool:
    """Whether an idle connection's socket may carry another call.

    An idle connection has nothing to read: readable means the upstream
    closed or reset it, or sent bytes nobody asked for.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def _whole_body(request: ForwardRequest) -> bytes | None:
    """Read a small body of known length before the call; ``None`` otherwise.

    Raises:
        DaisError: Reading the caller's body failed (cut off, too slow).
        UpstreamUnreachable: It failed in another way.
    """
    length = request.content_length
    body = request.body
    if body is None or length is None or length > MAX_WHOLE:
        return None
    if request.method == "HEAD":
        return None
    blocks = []
    left = length
    try:
        while left > 0 and (block := body.read(left)):
            blocks.append(block)
            left -= len(block)
    except DaisError:
        raise
    except Exception as exc:
        raise UpstreamUnreachable(
            "the caller's body could not be sent upstream"
        ) from exc
    if left > 0:
        raise IncompleteBody("the caller's body ended before its Content-Length")
    return b"".join(blocks)


def _unreachable(code: object) -> str:
    if code in (pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST):
        return "the upstream service is unreachable"
    return "the upstream service broke the connection"


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@hookimpl
def dais_forwarder(options: ForwarderOptions) -> CurlForwarder | None:
    """Forward gateway calls with libcurl, unless another client is asked for."""
    return CurlForwarder(options) if options.client == "curl" else None

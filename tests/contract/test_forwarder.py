"""The Forwarder port: one contract, run over every HTTP client.

``curl`` is :class:`dais_adapters.curl.CurlForwarder` (libcurl through
pycurl), ``curl-loop`` is :class:`dais_adapters.curl.CurlLoop` driven by a
poll loop (:class:`tests.loop.LoopForwarder`), ``urllib3`` is
:class:`dais_adapters.forwarder.Urllib3Forwarder`.
Each test sends real requests to a recording waitress upstream on loopback.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dais_adapters.curl import CurlForwarder
from dais_adapters.forwarder import Urllib3Forwarder
from dais_adapters.hooks import ForwarderOptions, plugin_manager
from dais_core.errors import (
    IncompleteBody,
    TooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from dais_core.ports import Forwarder, ForwardRequest
from tests.loop import LoopForwarder
from tests.upstream import RawUpstream, Upstream

CLIENTS = {
    "curl": CurlForwarder,
    "curl-loop": LoopForwarder,
    "urllib3": Urllib3Forwarder,
}
#: The clients on libcurl: in worker threads, and in the event loop.
CURL_CLIENTS = {"curl": CurlForwarder, "curl-loop": LoopForwarder}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

Make = Callable[..., Forwarder]


def _builder(client: str) -> Iterator[Make]:
    made: list[Any] = []

    def build(**options: Any) -> Forwarder:
        forwarder = CLIENTS[client](ForwarderOptions(**options))
        made.append(forwarder)
        return forwarder

    yield build
    for forwarder in made:
        close = getattr(forwarder, "close", None)
        if callable(close):
            close()


@pytest.fixture(params=sorted(CLIENTS))
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    """Build forwarders of one client with the given options."""
    yield from _builder(request.param)


@pytest.fixture(params=sorted(set(CLIENTS) - {"curl-loop"}))
def make_streaming(request: pytest.FixtureRequest) -> Iterator[Make]:
    """The same, for the clients that stream a body of unknown length.

    The event loop's client takes whole bodies only: the gateway hands it
    no other.
    """
    yield from _builder(request.param)


@pytest.fixture(params=sorted(CURL_CLIENTS))
def curl(request: pytest.FixtureRequest) -> Iterator[Forwarder]:
    """A forwarder on libcurl, in a worker's way or the event loop's."""
    forwarder = CURL_CLIENTS[request.param](ForwarderOptions())
    yield forwarder
    forwarder.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A recording upstream service on loopback."""
    service = Upstream()
    yield service
    service.close()


def send(
    forwarder: Forwarder,
    url: str,
    method: str = "POST",
    body: bytes | None = b"",
    *,
    chunked: bool = False,
    headers: tuple[tuple[str, str], ...] = (),
) -> int:
    stream = None if body is None else io.BytesIO(body)
    length = None if body is None or chunked else len(body)
    return forwarder.forward(ForwardRequest(method, url, headers, stream, length))


class _Failing:
    """A caller's body that breaks after its first block."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise TooLarge("the body is over the limit of 10 bytes")
        return b"0123456789"


class _Pausing:
    """A caller's body that pauses between its two blocks."""

    def __init__(self, pause: float) -> None:
        self.blocks = [b"first,", b"second"]
        self.pause = pause

    def read(self, size: int = -1) -> bytes:
        if len(self.blocks) == 1:
            time.sleep(self.pause)
        return self.blocks.pop(0) if self.blocks else b""


class TestFaithful:
    """What the caller sent is what the upstream gets."""

    @pytest.mark.parametrize(
        "method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]
    )
    def test_method_target_query_and_body_arrive_unchanged(
        self, make, upstream, method
    ):
        """Any method token goes with its raw target, query and body."""
        target = "/api/a%2Fb/~x?q=%7E&q=a%20b&empty="
        status = send(make(), upstream.url + target, method, b"payload\x00\xff")
        call = upstream.calls[-1]
        assert status == 200
        assert (call.method, call.target, call.body) == (
            method,
            target,
            b"payload\x00\xff",
        )

    def test_a_bare_question_mark_is_kept(self, make, upstream):
        """``/x?`` goes as ``/x?``: an empty query is not no query."""
        assert send(make(), upstream.url + "/x?") == 200
        assert upstream.calls[-1].target == "/x?"

    def test_the_upstream_status_comes_back(self, make, upstream):
        """A 503 from the upstream is what the forwarder returns."""
        upstream.status = "503 Service Unavailable"
        assert send(make(), upstream.url + "/x") == 503

    def test_head_is_forwarded(self, make, upstream):
        """HEAD goes as HEAD and its answer is not waited on for a body."""
        assert send(make(), upstream.url + "/x", "HEAD", None) == 200
        assert upstream.calls[-1].method == "HEAD"

    def test_one_connection_carries_calls_of_different_shapes(
        self, make_streaming, upstream
    ):
        """A HEAD, a GET, a POST and a chunked PUT in a row each go as sent."""
        forwarder = make_streaming()
        send(forwarder, upstream.url + "/1", "POST", b"one")
        send(forwarder, upstream.url + "/2", "HEAD", None)
        send(forwarder, upstream.url + "/3", "GET", None)
        send(forwarder, upstream.url + "/4", "PUT", b"four", chunked=True)
        send(forwarder, upstream.url + "/5", "HEAD", None)
        send(forwarder, upstream.url + "/6", "DELETE", None)
        got = [(c.method, c.target, c.body) for c in upstream.calls]
        assert got == [
            ("POST", "/1", b"one"),
            ("HEAD", "/2", b""),
            ("GET", "/3", b""),
            ("PUT", "/4", b"four"),
            ("HEAD", "/5", b""),
            ("DELETE", "/6", b""),
        ]

    def test_a_body_sent_after_a_head_answer_does_not_leak_into_the_next(
        self, make, upstream
    ):
        """An upstream that sends a body with its HEAD answer gets a new connection."""
        forwarder = make()
        for _ in range(5):
            assert send(forwarder, upstream.url + "/h", "HEAD", None) == 200
            time.sleep(0.05)  # the stray body is on the wire before the next call
            assert send(forwarder, upstream.url + "/p", body=b"x") == 200
        assert [c.method for c in upstream.calls] == ["HEAD", "POST"] * 5

    @pytest.mark.parametrize("size", [0, 1, 64 * 1024, 64 * 1024 + 1])
    def test_a_body_arrives_whole_on_either_side_of_the_small_body_limit(
        self, make, upstream, size
    ):
        """Bodies read before the call and bodies streamed arrive the same."""
        body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        forwarder = make()
        assert send(forwarder, upstream.url + "/x", "PATCH", body) == 200
        assert send(forwarder, upstream.url + "/y", "GET", None) == 200
        first, second = upstream.calls[-2:]
        assert (first.method, first.body) == ("PATCH", body)
        assert (second.method, second.body) == ("GET", b"")

    def test_the_client_labels_no_body_of_its_own(self, make, upstream):
        """A body without a Content-Type from the caller arrives without one."""
        assert send(make(), upstream.url + "/x", body=b"a=b") == 200
        assert "content-type" not in upstream.calls[-1].headers

    def test_a_body_of_unknown_length_goes_chunked(self, make_streaming, upstream):
        """Without a length the body is sent chunked and arrives whole."""
        body = bytes(range(256)) * 1000
        assert (
            send(make_streaming(), upstream.url + "/x", body=body, chunked=True) == 200
        )
        assert upstream.calls[-1].body == body

    def test_headers_arrive_in_order_including_empty_values(self, make, upstream):
        """Header values, empty ones too, reach the upstream as given."""
        headers = (("X-One", "1"), ("X-Empty", ""), ("Content-Type", "text/csv"))
        send(make(), upstream.url + "/x", headers=headers)
        got = upstream.calls[-1].headers
        assert (got["x-one"], got["x-empty"], got["content-type"]) == (
            "1",
            "",
            "text/csv",
        )

    def test_the_client_adds_no_accept_or_expect_of_its_own(self, make, upstream):
        """Only the gateway's headers and the framing ones reach the upstream."""
        send(make(), upstream.url + "/x", body=b"x" * (2 * 2**20))
        got = upstream.calls[-1].headers
        assert "expect" not in got
        assert got.get("accept") in (None, "*/*")

    def test_latin_1_header_values_go_as_the_same_bytes(self, make, upstream):
        """A value WSGI decoded as latin-1 reaches the upstream byte for byte."""
        send(make(), upstream.url + "/x", headers=(("X-Name", "caf\xe9 \xff"),))
        got = upstream.calls[-1].headers["x-name"]
        assert got.encode("latin-1") == b"caf\xe9 \xff"

    def test_the_client_names_itself_and_its_codings_nowhere(self, make, upstream):
        """No User-Agent or Accept-Encoding the caller did not send."""
        send(make(), upstream.url + "/x")
        got = upstream.calls[-1].headers
        assert "user-agent" not in got
        assert "accept-encoding" not in got

    def test_the_callers_user_agent_is_kept(self, make, upstream):
        """A caller's User-Agent goes through in place of the client's own."""
        send(make(), upstream.url + "/x", headers=(("User-Agent", "partner/1.0"),))
        assert upstream.calls[-1].headers["user-agent"] == "partner/1.0"


class TestCurlExactness:
    """libcurl sends the query byte for byte, which urllib3 does not."""

    def test_lower_case_escapes_in_the_query_are_kept(self, curl, upstream):
        """``%7e`` stays ``%7e`` (urllib3 would send ``%7E``)."""
        target = "/x?q=%7e%2f&r=%c3%a9"
        send(curl, upstream.url + target)
        assert upstream.calls[-1].target == target


class TestUrllib3Answers:
    """http.client stops at an interim answer, so its connection goes."""

    def test_a_connection_that_gave_an_interim_answer_is_not_used_again(self):
        """The final answer after a 103 never passes for the next call's."""
        upstream = RawUpstream(
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            first=b"HTTP/1.1 103 Early Hints\r\n\r\n",
            pace=0.005,
        )
        forwarder = Urllib3Forwarder(ForwarderOptions(client="urllib3"))
        try:
            statuses = [send(forwarder, upstream.url + f"/{n}") for n in range(3)]
        finally:
            upstream.close()
        assert statuses == [103, 103, 103]
        assert upstream.connections == 3


class TestCurlAnswers:
    """libcurl reads interim answers and odd head lines as HTTP means them."""

    def test_interim_answers_are_skipped_for_the_final_one(self, curl):
        """A 103 Early Hints before a 201 gives 201."""
        upstream = RawUpstream(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            assert send(curl, upstream.url + "/x") == 201
        finally:
            upstream.close()

    def test_a_header_line_that_looks_like_a_status_is_a_header(self, curl):
        """``HTTP/x 101 a: b`` inside a 200's head does not change its status."""
        upstream = RawUpstream(
            b"HTTP/1.1 200 OK\r\nHTTP/x 101 a: b\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            assert send(curl, upstream.url + "/x") == 200
        finally:
            upstream.close()

    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        ],
        ids=["four-digit-status", "unasked-101"],
    )
    def test_an_answer_with_no_final_status_fails_at_once(self, curl, answer):
        """A malformed status, or a 101 nobody asked for, is no answer."""
        upstream = RawUpstream(answer)
        started = time.monotonic()
        try:
            with pytest.raises(UpstreamUnreachable):
                send(curl, upstream.url + "/x")
        finally:
            upstream.close()
        assert time.monotonic() - started < 2.0

    def test_a_small_body_cut_short_never_reaches_the_upstream(self, upstream):
        """A body that ends before its Content-Length fails before any call."""
        forwarder = CurlForwarder(ForwarderOptions())
        request = ForwardRequest(
            "POST", upstream.url + "/x", (), io.BytesIO(b"only ten b"), 100
        )
        with pytest.raises(IncompleteBody):
            forwarder.forward(request)
        assert upstream.calls == []

    def test_a_head_cut_off_is_no_answer(self, curl):
        """An upstream closing halfway through its head gave no status to relay."""
        upstream = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Len", close_after=0)
        try:
            with pytest.raises(UpstreamUnreachable):
                send(curl, upstream.url + "/x")
        finally:
            upstream.close()


class TestConnections:
    """Connections to upstreams are pooled and reused."""

    def test_calls_in_a_row_share_one_connection(self, make, upstream):
        """Three calls in a row come from one client port."""
        forwarder = make()
        for _ in range(3):
            assert send(forwarder, upstream.url + "/x", body=b"hi") == 200
        assert len({call.peer for call in upstream.calls}) == 1

    def test_a_connection_the_upstream_closed_is_replaced(self, make):
        """A PUT's body is sent whole on a new connection when the pooled one died."""
        upstream = RawUpstream(OK, close_after=0.2)
        forwarder = make()
        try:
            for n in range(3):
                status = send(forwarder, upstream.url + f"/{n}", "PUT", b"b" * 100)
                assert status == 200
                time.sleep(0.5)
        finally:
            upstream.close()
        assert [r.endswith(b"b" * 100) for r in upstream.requests] == [True] * 3

    def test_idle_connections_to_many_upstreams_stay_few(self, make):
        """Calls to 80 upstreams in turn leave a bounded number of descriptors."""
        upstreams = [RawUpstream(OK) for _ in range(80)]
        forwarder = make()
        try:
            before = len(os.listdir("/proc/self/fd"))
            for upstream in upstreams:
                for n in range(2):
                    assert send(forwarder, upstream.url + f"/{n}") == 200
            time.sleep(0.2)  # each upstream closes its side of a dropped one
            grown = len(os.listdir("/proc/self/fd")) - before
        finally:
            for upstream in upstreams:
                upstream.close()
        # Both ends of each kept connection are in this process.
        assert grown <= 4 * 32

    @pytest.mark.parametrize("body", [None, b"x" * 10], ids=["no-body", "body"])
    def test_a_post_never_goes_on_a_connection_closed_while_idle(self, make, body):
        """A POST after the upstream closed the pooled connection is a 200, once."""
        upstream = RawUpstream(OK, close_after=0.1)
        forwarder = make()
        try:
            for n in range(4):
                assert send(forwarder, upstream.url + f"/{n}", body=body) == 200
                # Closed well before the next call, yet less than a second.
                time.sleep(0.4)
        finally:
            upstream.close()
        targets = [r.split(b" ", 2)[1] for r in upstream.requests]
        assert targets == [b"/0", b"/1", b"/2", b"/3"]

    def test_bytes_sent_after_an_answer_never_pass_for_the_next_one(self, make):
        """A connection the upstream wrote on while idle is not used again."""
        upstream = RawUpstream(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            late=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )
        forwarder = make()
        try:
            for n in range(3):
                assert send(forwarder, upstream.url + f"/{n}") == 204
                time.sleep(0.3)
        finally:
            upstream.close()
        assert upstream.connections == 3

    @pytest.mark.parametrize("body", [None, b"x" * 10], ids=["no-body", "body"])
    def test_a_post_is_never_sent_twice(self, make, body):
        """A POST the upstream read and then dropped unanswered is a 502, once."""
        upstream = RawUpstream(OK, answers=1)
        forwarder = make()
        try:
            assert send(forwarder, upstream.url + "/first", body=body) == 200
            with pytest.raises(UpstreamUnreachable):
                send(forwarder, upstream.url + "/second", body=body)
            time.sleep(0.2)  # a resend, if any, has arrived by now
        finally:
            upstream.close()
        targets = [r.split(b" ", 2)[1] for r in upstream.requests]
        assert targets == [b"/first", b"/second"]

    def test_an_unreachable_upstream_is_reported(self, make):
        """A closed port is UpstreamUnreachable."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        with pytest.raises(UpstreamUnreachable):
            send(make(), f"http://127.0.0.1:{closed}/x")

    @pytest.mark.parametrize(
        ("body", "delay"), [(None, 2.5), (b"hi", 7.5)], ids=["no-body", "body"]
    )
    def test_a_slow_upstream_times_out(self, make, upstream, body, delay):
        """An answer slower than the read timeout is UpstreamTimeout, body or not.

        After a body, libcurl's stall check (a moving window of about 5 s) may
        fire up to about 5 s late: still before this upstream answers.
        """
        upstream.delay = delay
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            send(make(read_timeout=1.0), upstream.url + "/x", body=body)
        assert time.monotonic() - started < delay - 0.1

    @pytest.mark.parametrize("body", [None, b"hi"], ids=["no-body", "body"])
    def test_an_answer_dripped_byte_by_byte_is_cut_at_the_whole_call_cap(
        self, make, body
    ):
        """A head that never stalls a second still cannot hold a worker for long."""
        # 38 bytes, one each 0.4 s: no read waits a second, the whole takes 15 s.
        raw = RawUpstream(OK, pace=0.4)
        try:
            forwarder = make(connect_timeout=1.0, read_timeout=1.0, body_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                send(forwarder, raw.url + "/x", body=body)
            # The cap is connect + read (+ body): 2 or 3 s, with slack.
            assert time.monotonic() - started < 5.0
        finally:
            raw.close()

    def test_an_upstream_that_stops_reading_the_body_is_a_timeout(self, make):
        """Its kernel takes the connection, nobody reads: 504, not unreachable."""
        with socket.create_server(("127.0.0.1", 0)) as deaf:
            url = f"http://127.0.0.1:{deaf.getsockname()[1]}/x"
            forwarder = make(connect_timeout=1.0, read_timeout=1.0, body_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                send(forwarder, url, body=b"x" * (32 * 1024 * 1024))
            assert time.monotonic() - started < 10.0

    def test_a_head_dripped_after_its_status_line_is_a_timeout(self, make):
        """The status came in time, the head did not: no status to relay."""
        raw = RawUpstream(
            b"X-Pad: " + b"a" * 40 + b"\r\nContent-Length: 0\r\n\r\n",
            first=b"HTTP/1.1 200 OK\r\n",
            pace=0.4,
        )
        try:
            forwarder = make(connect_timeout=1.0, read_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                send(forwarder, raw.url + "/x", body=None)
            # The cap is connect + read: 2 s, with slack; the head takes 24 s.
            assert time.monotonic() - started < 5.0
        finally:
            raw.close()

    def test_a_caller_pausing_mid_body_is_not_an_upstream_stall(
        self, make_streaming, upstream
    ):
        """Waiting for the caller's body does not count against the upstream."""
        request = ForwardRequest("POST", upstream.url + "/x", (), _Pausing(1.5), None)
        assert make_streaming(read_timeout=1.0).forward(request) == 200
        assert upstream.calls[-1].body == b"first,second"

    def test_a_dripping_answer_is_not_waited_for(self, make, upstream):
        """The status comes back before a slow, unsized body ends."""
        upstream.drip = 25
        started = time.monotonic()
        assert send(make(), upstream.url + "/x") == 200
        assert time.monotonic() - started < 2.0

    def test_a_failing_body_stops_the_call_with_its_own_error(
        self, make_streaming, upstream
    ):
        """An error reading the caller's body comes out as that error."""
        forwarder = make_streaming()
        request = ForwardRequest("POST", upstream.url + "/x", (), _Failing(), None)
        with pytest.raises(TooLarge):
            forwarder.forward(request)
        assert send(forwarder, upstream.url + "/after", body=b"ok") == 200
        assert upstream.calls[-1].target == "/after"


class TestPlugins:
    """Each client is a plugin chosen by name."""

    @pytest.mark.parametrize("client", ["curl", "urllib3"])
    def test_the_named_client_is_the_one_built(self, client):
        """``ForwarderOptions.client`` picks the plugin."""
        hook = plugin_manager().hook
        found = hook.dais_forwarder(options=ForwarderOptions(client=client))
        assert type(found) is CLIENTS[client]

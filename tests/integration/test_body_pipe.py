"""The body pipe between waitress' event loop and a worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dais_core.errors import IncompleteBody, RequestTimeout
from dais_wsgi.streaming import PIPE_HIGH_WATER, BodyPipe


class _Server:
    def __init__(self) -> None:
        self.wakes = 0

    def pull_trigger(self) -> None:
        self.wakes += 1


class _Channel:
    """Stands in for the channel: counts invitations and wake-ups."""

    def __init__(self) -> None:
        self.server = _Server()
        self.invited = 0

    def invite(self, request: Any) -> None:
        self.invited += 1


def pipe(deadline: float = 60.0) -> tuple[BodyPipe, _Channel]:
    channel = _Channel()
    return BodyPipe(channel, object(), time.monotonic() + deadline), channel  # type: ignore[arg-type]


class TestBodyPipe:
    """Reads see the bytes in order, whatever their sizes."""

    def test_reads_of_any_size_see_every_byte_in_order(self):
        """Chunks cut across reads come back whole and in order."""
        body, channel = pipe()
        data = bytes(range(256)) * 100
        for start in range(0, len(data), 777):
            body.append(data[start : start + 777])
        body.finish()
        got = b""
        for size in [1, 5000, 3, 64 * 1024, 10, 1]:
            got += body.read(size)
        got += body.read()
        assert got == data
        assert channel.invited == 1

    def test_readline_and_iteration(self):
        """Lines split across chunks are joined; the rest is kept for later."""
        body, _ = pipe()
        for piece in (b"first li", b"ne\nsecond line\nthi", b"rd"):
            body.append(piece)
        body.finish()
        assert body.readline() == b"first line\n"
        assert list(body) == [b"second line\n", b"third"]

    def test_a_reader_waits_for_bytes_from_another_thread(self):
        """A read blocks until the loop appends, then returns at once."""
        body, _ = pipe()
        threading.Timer(0.1, body.append, args=(b"late",)).start()
        assert body.read(10) == b"late"

    def test_a_full_pipe_wakes_the_loop_once_drained_below_low_water(self):
        """The loop is woken when there is room again, not on every read."""
        body, channel = pipe()
        chunk = b"x" * (256 * 1024)
        while not body.full:
            body.append(chunk)
        assert body.full and len(body) >= PIPE_HIGH_WATER
        for _ in range(4):
            body.read(256 * 1024)
        assert channel.server.wakes == 0
        while channel.server.wakes == 0:
            body.read(256 * 1024)
        assert channel.server.wakes == 1

    def test_a_failed_body_raises_its_error(self):
        """A client gone mid-body is an error for the reader."""
        body, _ = pipe()
        body.append(b"part")
        body.fail(IncompleteBody("gone"))
        assert body.read(4) == b"part"
        with pytest.raises(IncompleteBody):
            body.read(4)

    def test_the_deadline_ends_a_wait(self):
        """A body that does not come in time is a RequestTimeout."""
        body, _ = pipe(deadline=0.2)
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            body.read(10)
        assert time.monotonic() - started < 2.0

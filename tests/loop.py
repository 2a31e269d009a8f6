"""Drive :class:`~dais_adapters.curl.CurlLoop` from a poll loop of its own.

The gateway drives it from waitress' event loop; this driver does the same
with ``select.poll`` and waits for one call at a time, so the forwarder
contract can run over the event loop's client as over the others.
"""

from __future__ import annotations

import select
import time

from dais_adapters.curl import CurlLoop, Outcome
from dais_adapters.hooks import ForwarderOptions
from dais_core.errors import DaisError
from dais_core.ports import ForwardRequest

__all__ = ["LoopForwarder"]

_POLL = {CurlLoop.READ: select.POLLIN, CurlLoop.WRITE: select.POLLOUT}


class LoopForwarder:
    """A ``Forwarder`` whose calls run on :class:`CurlLoop`, one at a time.

    Args:
        options: Timeouts and pool sizes.
    """

    def __init__(self, options: ForwarderOptions) -> None:
        self.watched: dict[int, int] = {}
        self.loop = CurlLoop(options, self._watch)

    def forward(self, request: ForwardRequest) -> int:
        """Send ``request`` and return the status, as the gateway's loop would."""
        if request.body is not None and request.content_length is None:
            raise ValueError("the event loop forwards bodies of known length only")
        body = b"" if request.body is None else request.body.read()
        outcomes: list[Outcome] = []
        self.loop.start(request, body, outcomes.append)
        while not outcomes:
            self._turn()
        outcome = outcomes[0]
        if isinstance(outcome, DaisError):
            raise outcome
        return outcome

    def close(self) -> None:
        """Close every connection."""
        self.loop.close()

    def _watch(self, fd: int, events: int) -> None:
        if events:
            self.watched[fd] = events
        else:
            self.watched.pop(fd, None)

    def _turn(self) -> None:
        deadline = self.loop.deadline
        wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        poller = select.poll()
        for fd, events in self.watched.items():
            poller.register(
                fd, sum(flag for bit, flag in _POLL.items() if events & bit)
            )
        for fd, flags in poller.poll(wait * 1000):
            ready = CurlLoop.READ if flags & ~select.POLLOUT else 0
            ready |= CurlLoop.WRITE if flags & select.POLLOUT else 0
            if fd in self.watched:
                self.loop.ready(fd, ready)
        deadline = self.loop.deadline
        if deadline is not None and deadline <= time.monotonic():
            self.loop.expire()

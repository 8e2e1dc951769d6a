"""Connections that cost the server nothing they are not using: uvicorn's h11 protocol with the
deadlines and bounds it lacks.

uvicorn (0.54) times out only a keep-alive connection after a response: a fresh connection that
sends nothing or half a header (slowloris) waits forever, a request body may trickle in forever, and
a response whose reader stopped reading (a stalled SSE client: the send buffer full) waits for it
forever. And its `limit_concurrency` counts every open connection, idle ones too, so a few hundred
idle sockets turn every real request away with 503. Here:

- a request must arrive whole (its headers and its body) within `request_timeout` seconds of the
  connection being ready for it (opened, or done with the previous answer); else it is closed;
- a response that cannot be written for `write_timeout` seconds (the client reads nothing: the
  transport's buffer is past its high-water mark, or still holds the end of an answer) ends the
  connection: the request sees a disconnect, so its generation stops and its engine row frees;
- `limit_concurrency` bounds requests in progress (beyond it: 503, as uvicorn does), not connections;
- at most `max_connections` are open: one more closes the connection that has waited longest for a
  request, so idle sockets cannot crowd out clients that are sending.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gptcore.serve")

READING = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11 while its request is not all in


@dataclass(frozen=True)
class ConnectionLimits:
    request_timeout: float  # seconds for a request to arrive whole once the connection awaits it
    write_timeout: float  # seconds a response may wait for its reader to take more
    max_connections: int  # open at once; beyond: the longest idle one is closed
    max_requests: int  # in progress at once; beyond: 503


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a request deadline, a write deadline and bounds that idle sockets do not fill."""

    limits: ConnectionLimits  # set by `protocol_class`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own check counts idle connections: `admit` replaces it
        self.app = self.admit(self.app)
        self.read_deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None
        self.awaiting_since: float | None = None  # when it became ready for a request that has not begun

    def admit(self, app):
        tasks, max_requests = self.tasks, self.limits.max_requests

        async def bounded(scope, receive, send) -> None:
            if len(tasks) > max_requests:  # this request's own task is already counted
                log.warning("serve: %d requests in progress (at most %d): 503", len(tasks) - 1, max_requests)
                return await service_unavailable(scope, receive, send)
            return await app(scope, receive, send)

        return bounded

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch_request()
        self.make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch_request()
        # An answer all handed to the transport may still sit in its buffer, behind a reader that takes
        # nothing: closing then (keep-alive, the request deadline) would wait for it forever.
        if self.transport.get_write_buffer_size() and self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.limits.write_timeout, self.write_stalled)

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self.read_deadline, self.write_deadline):
            if deadline is not None:
                deadline.cancel()
        self.read_deadline = self.write_deadline = self.awaiting_since = None
        super().connection_lost(exc)

    def watch_request(self) -> None:
        """Arm the request deadline while a request is due or coming in; disarm it once it is all in."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        awaiting = state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if not awaiting:
            self.awaiting_since = None
        elif self.awaiting_since is None:
            self.awaiting_since = self.loop.time()
        if state in READING and self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.limits.request_timeout, self.request_too_slow)
        elif state not in READING and self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def request_too_slow(self) -> None:
        self.read_deadline = None
        log.debug("serve: %s sent no whole request in %s s: closed", self.client, self.limits.request_timeout)
        self.transport.close()

    def make_room(self) -> None:
        """Over max_connections: close the connection that has awaited a request longest (this one if
        every other is busy with a request)."""
        if len(self.connections) <= self.limits.max_connections:
            return
        idle = [c for c in self.connections if getattr(c, "awaiting_since", None) is not None]
        if idle:
            oldest = min(idle, key=lambda c: c.awaiting_since)
            log.debug("serve: %d connections open: closing the longest idle one", len(self.connections))
            oldest.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.limits.write_timeout, self.write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    def write_stalled(self) -> None:
        self.write_deadline = None
        if not self.transport.get_write_buffer_size():  # it drained meanwhile
            return
        log.info("serve: %s read nothing for %s s: connection dropped", self.client, self.limits.write_timeout)
        self.transport.abort()  # close() would wait for the full buffer to drain, which it never does


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (`uvicorn.Config(http=...)`), bound to `limits`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})

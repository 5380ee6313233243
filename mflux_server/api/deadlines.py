"""Slow clients: a request must arrive whole within a bounded time, or it is answered 408 and closed.

gunicorn's gevent worker holds a stalled connection on a greenlet, so it blocks no one, but it bounds
only the idle wait between requests (the keep-alive timeout) and lets a client that trickles one byte a
second hold its connection for as long as it likes. Here every read of a client socket runs against a
deadline that starts at the request's first byte: the headers must be in within --header-timeout, and the
whole body within --request-timeout.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

log = logging.getLogger("mflux_server")


class RequestArrivedTooSlowly(RequestTimeout):
    """Raised from a socket read past the deadline; an HTTP 408 wherever it surfaces (server or app)."""


class DeadlineSocket:
    """A client socket whose reads stop at the current request's deadline."""

    def __init__(self, sock: socket.socket, header_timeout: float, request_timeout: float):
        self._sock = sock
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        self.started: float | None = None  # monotonic time of the current request's first byte
        self.deadline: float | None = None
        self.timed_out = False  # a read hit the deadline: the rest of the request can never be told apart

    def recv(self, size: int) -> bytes:
        """Read, waiting no later than the deadline; between requests the keep-alive timeout governs."""
        if self.deadline is None:
            data = self._sock.recv(size)
            if data:
                self.started = time.monotonic()
                self.deadline = self.started + self.header_timeout
            return data
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestArrivedTooSlowly(self._late())
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size)
        except TimeoutError:
            raise RequestArrivedTooSlowly(self._late()) from None
        finally:
            self._sock.settimeout(None)

    def headers_done(self) -> None:
        """The headers are in: the body may take until request_timeout after the first byte."""
        if self.started is not None:
            self.deadline = self.started + self.request_timeout

    def request_done(self) -> None:
        """The response is sent: the next request's clock starts at its first byte."""
        self.started = self.deadline = None

    def _late(self) -> str:
        self.timed_out = True
        return (f"the request did not arrive whole within {self.header_timeout:g} s (headers) or "
                f"{self.request_timeout:g} s (body)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineGeventWorker(GeventWorker):
    """gunicorn's stock gevent worker, with read deadlines on every client connection."""

    # Set by serve() before gunicorn forks (gunicorn's config takes no settings of ours).
    header_timeout = 10.0
    request_timeout = 60.0

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        """Serve a connection through a DeadlineSocket."""
        super().handle(listener, DeadlineSocket(client, self.header_timeout, self.request_timeout), addr)

    def handle_request(self, listener_name: Any, req: Any, sock: DeadlineSocket, addr: Any) -> None:
        """Run one request with the body's deadline; reset the clock after it."""
        sock.headers_done()
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.request_done()
        if sock.timed_out:  # the app answered 408 mid-body: close, since what follows is the unread rest of it
            raise StopIteration("the request arrived too slowly")

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """A request that arrived too slowly gets a 408 (our JSON error) and the connection is closed."""
        if isinstance(exc, RequestArrivedTooSlowly):
            from gunicorn import util

            log.warning("closing a connection from %s: %s", addr[0] if addr else "?", exc.description)
            try:
                util.write_error(client, 408, "Request Timeout", exc.description or "")
            except OSError:
                pass
            return
        super().handle_error(req, client, addr, exc)

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
import sys
import time
import weakref
from typing import Any

from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from mflux_server.api import draining

log = logging.getLogger("mflux_server")

DRAIN_CHECK = 0.1  # seconds between checks of whether the process was told to stop (gunicorn sets a flag)


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
        self.closing = False  # the process is stopping and closed this connection between requests
        self.served = 0  # requests answered on this connection so far
        self.last_done = 0.0  # monotonic time the last one was answered

    def recv(self, size: int) -> bytes:
        """Read, waiting no later than the deadline; between requests the keep-alive timeout governs."""
        if self.deadline is None:
            try:
                data = self._sock.recv(size)
            except OSError:
                if self.closing:  # gevent cancels the read that close_if_idle's shutdown interrupts
                    return b""
                raise
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
        self.served += 1
        self.last_done = time.monotonic()

    def close_if_idle(self) -> None:
        """Between requests, end the connection (the process is stopping); a request in progress finishes first."""
        if self.started is None:
            self.closing = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # the keep-alive read returns at once, and the greenlet ends
            except OSError:
                pass

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
    quitting = False  # a quit signal was taken (handle_quit)

    def run(self) -> None:
        """Serve until told to stop, then let go of idle connections and event streams at once (api/draining.py)."""
        import gevent

        self._connections: weakref.WeakSet[DeadlineSocket] = weakref.WeakSet()

        def drain_when_stopping() -> None:
            while self.alive:
                gevent.sleep(DRAIN_CHECK)
            draining.drain()
            for connection in list(self._connections):
                connection.close_if_idle()

        gevent.spawn(drain_when_stopping)
        super().run()

    def init_process(self) -> None:
        """Boot and serve; a process told to stop while it boots (Ctrl-C right after start) exits quietly.

        gunicorn's master halts the whole server with "Worker failed to boot" (exit status 3) when a process fails
        before it has booted, and a stop signal that lands in the middle of the boot can make it fail.
        """
        try:
            super().init_process()
        except Exception:
            if self.alive and not self.quitting:
                raise
            log.debug("stopped while starting", exc_info=True)
            sys.exit(0)

    def handle_quit(self, sig: Any, frame: Any) -> None:
        """SIGINT or SIGQUIT: stop now; ignored once the process is already stopping.

        Ctrl-C on `make run` sends SIGINT to every process and then SIGTERM: the quit's sys.exit(0) then ran in
        a greenlet during the interpreter's shutdown, and gevent printed it as a traceback. The same happened when
        the master's SIGQUIT followed the SIGINT before the first quit's greenlet had run (gunicorn spawns one
        per signal), so the first quit is remembered here, in the signal handler itself.
        """
        if not self.alive or self.quitting:
            return
        self.quitting = True
        super().handle_quit(sig, frame)

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        """Serve a connection through a DeadlineSocket."""
        connection = DeadlineSocket(client, self.header_timeout, self.request_timeout)
        self._connections.add(connection)
        super().handle(listener, connection, addr)

    def handle_request(self, listener_name: Any, req: Any, sock: DeadlineSocket, addr: Any) -> None:
        """Run one request with the body's deadline; reset the clock after it."""
        sock.headers_done()
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.request_done()
        if sock.timed_out:  # the app answered 408 mid-body: close, since what follows is the unread rest of it
            raise StopIteration("the request arrived too slowly")
        if not self.alive:  # answered while stopping (an event stream that ended, a slow request): close now
            raise StopIteration("the server process is stopping")

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

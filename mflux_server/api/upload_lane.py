"""The upload lane: a server process hands large request bodies to a helper process of its own, niced, to handle.

A submit carrying input images is mostly CPU: JSON parsing, base64, image decoding and checks, and a long write
of the blobs. Threads do not take that off the event loop, since their Python parts hold the GIL the loop needs
(docs/benchmarks.md, "The event loop beside heavy work"). The helper runs the same app in its own interpreter
with a lower CPU priority, on a Unix socket only its parent can reach; the server process only reads the body
(under the client's deadlines, as before) and copies bytes both ways. Small requests never leave the process.

The helper starts with the first large request (which waits for it, as do the others meanwhile) and is started
again if it dies (while it cannot be, large requests are handled in the process as before). A server process that
stops tells its helper to stop too: the helper answers its open waits the way a server process does
(api/draining.py), and the answers go back to the clients.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import io
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from flask import Flask

from mflux_server.api import draining
from mflux_server.core.settings import Settings

log = logging.getLogger("mflux_server")

# Bodies at least this large go to the helper: JSON this size is parsed off the loop already (request_body.py),
# and anything smaller carries no image worth decoding elsewhere.
UPLOAD_BYTES = 256 << 10
# The helper's niceness: when cores are few, the kernel runs the server processes' event loops first.
HELPER_NICENESS = 10
# Seconds between starts of a helper that keeps dying; meanwhile large requests are handled in the process.
RESTART_AFTER = 5.0
# Seconds a large request waits for a starting helper (about 1 s on an idle 2-core machine) before it is handled
# in the process instead, and between looks at whether it listens.
START_WAIT = 10.0
START_POLL = 0.02
# Seconds the helper waits for its open requests when told to stop (gunicorn's graceful timeout is 10 s).
HELPER_GRACE = 9.0
# Headers that describe one connection, not the request: the relay's connections have their own. The request's
# length is set again for the body as read; the answer's Date and Server are gunicorn's.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "expect"})
NOT_RELAYED = HOP_BY_HOP | {"content-length"}
NOT_ANSWERED = HOP_BY_HOP | {"date", "server"}
CHUNK = 1 << 16
LOST_MESSAGE = ("the process handling this upload stopped before answering, so the request may or may not have "
                "been carried out: send it again with the same Idempotency-Key header to get the task it created, "
                "if it did")


class UploadLane:
    """This server process's helper: started on demand, told to stop with the process."""

    def __init__(self, settings: Settings, limit: int):
        self.settings = settings
        self.limit = limit  # bodies over it are refused in the process, cheaply, before any is read
        self.path = ""  # the socket, in a folder of this process's own made at the first start, removed at exit
        self.helper: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.started_at = -RESTART_AFTER
        draining.on_drain(self.stop)

    def takes(self, environ: dict[str, Any]) -> bool:
        """Whether a request goes to the helper: a large POST with a length, while this process is not stopping."""
        if environ.get("REQUEST_METHOD") != "POST" or draining.draining():
            return False
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return False
        return UPLOAD_BYTES <= length <= self.limit

    def available(self) -> bool:
        """Whether the helper is up; starts it when it is not (unless it was started moments ago and died) and
        waits for it up to START_WAIT: requests handled in the process while it started kept the process's
        decode pool busy for seconds after it was ready."""
        if self.helper is None or self.helper.poll() is not None:
            if time.monotonic() - self.started_at < RESTART_AFTER:
                return False
            self.start()
        deadline = time.monotonic() + START_WAIT
        while not self.ready:
            assert self.helper is not None
            self.ready = os.path.exists(self.path)
            if self.ready:
                log.info("upload lane: helper process %d ready %.1f s after its start", self.helper.pid,
                         time.monotonic() - self.started_at)
            if self.ready or self.helper.poll() is not None or time.monotonic() >= deadline:
                break
            time.sleep(START_POLL)  # gevent's sleep in a server process: only this request waits
        return self.ready

    def start(self) -> None:
        """Start the helper; it listens on the lane's socket once its app is built."""
        self.started_at = time.monotonic()
        self.ready = False
        if not self.path:
            folder = tempfile.mkdtemp(prefix="mflux-upload-")  # 0700: only this user reaches the socket
            atexit.register(shutil.rmtree, folder, True)
            self.path = os.path.join(folder, "lane.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed helper's
        self.helper = subprocess.Popen([sys.executable, "-m", "mflux_server.api.upload_lane", self.path, str(os.getpid())],
                                       stdin=subprocess.PIPE, close_fds=True)
        assert self.helper.stdin is not None
        self.helper.stdin.write(pickle.dumps(self.settings))
        self.helper.stdin.close()
        log.info("upload lane: helper process %d started", self.helper.pid)

    def stop(self) -> None:
        """Tell the helper to answer what it holds and exit (this process is stopping)."""
        if self.helper is not None and self.helper.poll() is None:
            self.helper.send_signal(signal.SIGTERM)

    def relay(self, environ: dict[str, Any], start_response: Callable[..., Any], app: Flask) -> Any:
        """Read the body, send the request to the helper and its answer to the client (inline if it cannot)."""
        length = int(environ["CONTENT_LENGTH"])
        body = read_exactly(environ["wsgi.input"], length)
        if len(body) < length or not self.available():  # the client went away mid-body (the app says so), or no
            return _inline(environ, start_response, app, body)  # helper could start: handled here, as before
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.path)
            connection.sendall(request_head(environ, length))
            connection.sendall(body)
        except OSError:
            connection.close()
            # The helper never had the whole request, so it did nothing with it.
            return _inline(environ, start_response, app, body)
        del body
        try:
            response = http.client.HTTPResponse(connection, method="POST")
            response.begin()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            log.error("upload lane: the helper did not answer %s %s (%s)", environ.get("REQUEST_METHOD"),
                      environ.get("PATH_INFO"), error)
            return _lost(app, environ, start_response)
        start_response(f"{response.status} {response.reason}",
                       [(name, value) for name, value in response.getheaders() if name.lower() not in NOT_ANSWERED])
        return _answer(response, connection)


def read_exactly(stream: Any, length: int) -> bytes:
    """Up to length bytes of a request body (fewer only if the client stopped sending)."""
    parts, got = [], 0
    while got < length:
        part = stream.read(min(CHUNK * 16, length - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def request_head(environ: dict[str, Any], length: int) -> bytes:
    """The request line and headers as the client sent them (as WSGI gives them), for one request on its own
    connection."""
    # Rebuilt from the path as this server parsed it (not as sent), so the helper routes it the same way.
    target = quote(environ.get("PATH_INFO", "/").encode("latin-1"), safe="/")
    if environ.get("QUERY_STRING"):
        target += "?" + environ["QUERY_STRING"]
    lines = [f"POST {target} HTTP/1.1"]
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").title()
            if name.lower() not in NOT_RELAYED:
                lines.append(f"{name}: {value}")
    if environ.get("CONTENT_TYPE"):
        lines.append(f"Content-Type: {environ['CONTENT_TYPE']}")
    lines += [f"Content-Length: {length}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _inline(environ: dict[str, Any], start_response: Callable[..., Any], app: Flask, body: bytes) -> Any:
    environ["wsgi.input"] = io.BytesIO(body)
    return app(environ, start_response)


def _lost(app: Flask, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """A 503 saying the outcome is unknown, in the envelope of the surface the request came through."""
    from mflux_server.api.errors import in_envelope

    with app.request_context(environ):
        answer = app.make_response(in_envelope(({"code": "unavailable", "field": None, "message": LOST_MESSAGE},
                                                503, {"Retry-After": "5"})))
    return answer(environ, start_response)


def _answer(response: http.client.HTTPResponse, connection: socket.socket) -> Iterator[bytes]:
    try:
        while chunk := response.read1(CHUNK):
            yield chunk
    finally:
        response.close()
        connection.close()


def upload_lane(app: Flask, lane: UploadLane) -> Callable[[dict[str, Any], Any], Any]:
    """The app, with large request bodies handled by the lane's helper process."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        if lane.takes(environ):
            return lane.relay(environ, start_response, app)
        return app(environ, start_response)

    return wsgi


def serve_helper(path: str, parent: int, settings: Settings) -> None:
    """The helper: the app on the lane's socket, until the parent stops it or is gone."""
    import gevent
    import gevent.event
    from gevent.pywsgi import WSGIServer

    from mflux_server import store
    from mflux_server.api.app import create_app
    from mflux_server.api.write_lane import Writer
    from mflux_server.core.logs import configure_logging, shorten_gil_switch_interval

    configure_logging(settings.log_level, "mflux-server")
    shorten_gil_switch_interval()
    store.limit_idle_transactions(settings.write_lock_limit)
    app = create_app(settings)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    server = WSGIServer(listener, app, log=None, error_log=log)
    server.start()
    # Before the nice: the writer's thread keeps the server's priority (api/write_lane.py).
    app.extensions["mflux_writer"] = Writer(app.extensions["mflux_sessions"].get)
    # Niced once ready: starting (imports, the app) at the server's priority makes it ready sooner under load.
    os.nice(HELPER_NICENESS)
    os.rename(path + ".new", path)  # the parent relays once the socket is there, listening

    stopped = gevent.event.Event()

    def stop() -> None:
        draining.drain()
        server.stop(timeout=HELPER_GRACE)
        stopped.set()

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGINT, lambda: None)  # Ctrl-C reaches the whole group: the parent decides
    while not stopped.wait(1.0):
        if os.getppid() != parent:  # the server process is gone (killed): nothing can reach this one any more
            stop()
    with contextlib.suppress(FileNotFoundError):  # the folder is the server process's to remove
        os.unlink(path)


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    serve_helper(sys.argv[1], int(sys.argv[2]), pickle.loads(sys.stdin.buffer.read()))

"""The upload lane: each server process's upload helper (api/upload_helper.py), an idle-class process that does the
CPU-heavy parts of large uploads (parsing a large JSON body, decoding and checking input images) as pure functions.

Those parts hold the GIL for milliseconds, so a thread of the server process would hold up its event loop (docs/
benchmarks.md, "The event loop beside heavy work"). The helper runs them in its own interpreter under Linux's
SCHED_IDLE (niced 19 elsewhere): the kernel gives it only CPU time nothing else wants and takes a core back the
moment a server process wakes, where a niced process keeps its time slice. It holds no lock and no queue
session, nothing a server process waits for but its own results, so being starved delays only the requests that
asked it. An earlier helper ran the whole request, its write included: an idle-class helper holding the queue's
write lock stalled every submit, and a niced one still made the server processes wait for its slices.

Only requests with a body of UPLOAD_BYTES or more use it; the request itself (checks, the write, the answer) stays
in the server process. The helper starts with the first such request (which waits for it, up to START_WAIT) and
again after it dies. A call it cannot answer (not started, gone, or silent for CALL_TIMEOUT) runs in the process
on a bounded pool of threads instead: the functions are pure, so running one twice changes nothing.
"""

from __future__ import annotations

import atexit
import contextlib
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
from collections.abc import Callable
from typing import Any, TypeVar

from flask import has_request_context, request

from mflux_server.api import draining
from mflux_server.core import native

log = logging.getLogger("mflux_server")
T = TypeVar("T")

# Requests with a body at least this large use the helper: anything smaller carries no image worth the trip.
UPLOAD_BYTES = 256 << 10
# Seconds between starts of a helper that keeps dying; meanwhile calls run in the process.
RESTART_AFTER = 5.0
# Seconds a call waits for a starting helper (about a second on an idle 2-core machine), and between looks.
START_WAIT = 10.0
START_POLL = 0.02
# Seconds a call waits for the helper's answer before the helper is ended and the call runs in the process: an
# idle-class process gets no CPU while the cores are saturated, and the request must still be answered.
CALL_TIMEOUT = 30.0
CHUNK = 1 << 16


class HelperUnavailable(Exception):
    """The helper could not answer this call (not started, gone, or too slow); nothing was done with it."""


class UploadHelper:
    """This server process's helper: started on demand, ended with the process."""

    def __init__(self, log_level: str = "info"):
        self.log_level = log_level
        self.path = ""  # the socket, in a folder of this process's own made at the first start, removed at exit
        self.helper: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.started_at = -RESTART_AFTER
        draining.on_drain(self.stop)

    def available(self) -> bool:
        """Whether the helper is up; starts it when it is not (unless it was started moments ago and died) and
        waits for it up to START_WAIT."""
        if draining.draining():
            return False
        if self.helper is None or self.helper.poll() is not None:
            if time.monotonic() - self.started_at < RESTART_AFTER:
                return False
            self.start()
        deadline = time.monotonic() + START_WAIT
        while not self.ready:
            assert self.helper is not None
            self.ready = os.path.exists(self.path)
            if self.ready:
                log.info("upload helper: process %d ready %.1f s after its start", self.helper.pid,
                         time.monotonic() - self.started_at)
            if self.ready or self.helper.poll() is not None or time.monotonic() >= deadline:
                break
            time.sleep(START_POLL)  # gevent's sleep in a server process: only this request waits
        return self.ready

    def start(self) -> None:
        """Start the helper; it listens on the socket once it has imported what it runs."""
        self.started_at = time.monotonic()
        self.ready = False
        if not self.path:
            folder = tempfile.mkdtemp(prefix="mflux-upload-")  # 0700: only this user reaches the socket
            atexit.register(shutil.rmtree, folder, True)
            self.path = os.path.join(folder, "helper.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed helper's
        self.helper = subprocess.Popen([sys.executable, "-m", "mflux_server.api.upload_helper", self.path,
                                        str(os.getpid()), self.log_level], stdin=subprocess.DEVNULL, close_fds=True)
        log.info("upload helper: process %d started", self.helper.pid)

    def stop(self) -> None:
        """End the helper (this process is stopping; a call it held runs in the process)."""
        if self.helper is not None and self.helper.poll() is None:
            self.helper.send_signal(signal.SIGTERM)

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) in the helper; what it raises is raised here. HelperUnavailable if it cannot answer."""
        if not self.available():
            raise HelperUnavailable("not running")
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(CALL_TIMEOUT)
        try:
            connection.connect(self.path)
            connection.sendall(pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL))
            connection.shutdown(socket.SHUT_WR)
            answer = read_all(connection)
        except TimeoutError:
            log.warning("upload helper: no answer to %s within %.0f s; ending it, the call runs here",
                        function.__name__, CALL_TIMEOUT)
            self.kill()
            raise HelperUnavailable("too slow") from None
        except OSError as error:
            raise HelperUnavailable(str(error)) from None
        finally:
            connection.close()
        try:
            raised, value = pickle.loads(answer)
        except (pickle.UnpicklingError, EOFError, ValueError):  # it died holding the call, or while answering
            raise HelperUnavailable("gone") from None
        if raised:
            raise value
        result: T = value
        return result

    def kill(self) -> None:
        """End a helper that stopped answering; the next call starts another (after RESTART_AFTER)."""
        if self.helper is not None and self.helper.poll() is None:
            self.helper.kill()


def read_all(connection: socket.socket) -> bytes:
    """Everything the peer sends until it shuts its side."""
    parts = []
    while part := connection.recv(CHUNK):
        parts.append(part)
    return b"".join(parts)


_installed: UploadHelper | None = None


def install(helper: UploadHelper | None) -> None:
    """Make this process's large requests use the helper (the server does, per process; tests may not)."""
    global _installed
    _installed = helper


def offloaded(function: Callable[..., T], *args: Any, pool: str, threads: int) -> T:
    """function(*args) off the event loop: in the upload helper for a request with a large body, otherwise (or
    when the helper cannot answer) on a pool of `threads` OS threads of this process named `pool`."""
    if _installed is not None and _large_request():
        try:
            return _installed.call(function, *args)
        except HelperUnavailable:
            pass
    return native.call_bounded(lambda: function(*args), pool, threads)


def _large_request() -> bool:
    return has_request_context() and (request.content_length or 0) >= UPLOAD_BYTES

"""The upload helper process (api/upload_lane.py starts it and calls it): answers calls of pure functions from its
server process, on a few idle-class threads, until that process ends it or is gone."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import time

from mflux_server.api import image_inputs, request_body  # noqa: F401  # what it runs, imported before it listens
from mflux_server.api.upload_lane import read_all
from mflux_server.core.logs import configure_logging

# The helper's niceness where Linux's idle class is not there (macOS).
HELPER_NICENESS = 19
# Calls the helper runs at once (each on a thread of its own); more wait for one.
HELPER_THREADS = 3


def run_calls(listener: socket.socket) -> None:
    """Answer calls on the listener, one connection each, until the process ends (a helper thread)."""
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                function, args = pickle.loads(read_all(connection))
                try:
                    answer = (False, function(*args))
                except Exception as error:  # the caller raises it, as if it had run there
                    answer = (True, error)
                try:
                    out = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as error:  # an exception that does not pickle is still an error there
                    out = pickle.dumps((True, RuntimeError(f"{type(error).__name__}: {error}")))
                connection.sendall(out)
            except OSError:
                pass  # the caller went away (its request ended): nothing to answer


def idle_class() -> None:
    """Run this process, and the threads it starts after, on CPU time nothing else wants."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(HELPER_NICENESS)


def serve_helper(path: str, parent: int, log_level: str) -> None:
    """The helper: answer calls on the socket until the parent stops it or is gone."""
    configure_logging(log_level, "mflux-server")
    idle_class()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    for _ in range(HELPER_THREADS):
        threading.Thread(target=run_calls, args=(listener,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    os.rename(path + ".new", path)  # calls come once the socket is there, listening
    try:
        while os.getppid() == parent:  # the server process is gone (killed): nothing can reach this one any more
            time.sleep(1.0)
    finally:
        with contextlib.suppress(FileNotFoundError):  # the folder is the server process's to remove
            os.unlink(path)


if __name__ == "__main__":
    serve_helper(sys.argv[1], int(sys.argv[2]), sys.argv[3])

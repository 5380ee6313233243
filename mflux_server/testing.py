"""Launching the real API and worker processes on loopback, for the tests and the benchmarks (neither process imports it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests

from mflux_server import store

ROOT = Path(__file__).resolve().parent.parent  # the checkout: processes run from it, as `make run` does
T = TypeVar("T")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream into {'id', 'event', 'data'} messages (comments skipped)."""
    message: dict[str, Any] = {}
    for raw in response.iter_lines(decode_unicode=True):
        line = raw.decode() if isinstance(raw, bytes) else raw
        if line == "":
            if "event" in message:
                yield message
            message = {}
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(": ")
            message[field] = json.loads(value) if field == "data" else value


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll until predicate() is truthy; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Processes:
    """mflux-server and mflux-worker as subprocesses on one queue file; stop_all() ends them."""

    def __init__(self, workdir: Path, db_path: str):
        self.workdir = Path(workdir)
        self.db_path = db_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}  # pid -> its output file
        self.server_proc: subprocess.Popen[bytes] | None = None

    def spawn(self, module: str, args: list[str], name: str) -> subprocess.Popen[bytes]:
        """Start `python -m module --db … args`, logging to a file in workdir."""
        log = open(self.workdir / f"{name}-{len(self.procs)}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", module, "--db", self.db_path, *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        self.logs[proc.pid] = Path(log.name)
        self.procs.append(proc)
        return proc

    def worker(self, *args: str, speed: float = 20.0, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start a synthetic worker with fast heartbeats; by default waits until it has registered."""
        before = self.worker_count()
        proc = self.spawn("mflux_server.worker", ["--engine", "synthetic", "--synthetic-speed", str(speed),
                                     "--heartbeat-interval", "0.2", "--stale-after", "2", *args], "worker")
        if wait:
            wait_for(lambda: self.worker_count() > before or proc.poll() is not None, what="worker registration")
            assert proc.poll() is None, self.log(proc)
        return proc

    def server(self, *args: str, http_workers: int = 1, port: int | None = None) -> str:
        """Start the API under gunicorn on a free port (or the one given); returns its base URL once it answers."""
        port = port or free_port()
        proc = self.spawn("mflux_server", ["--port", str(port), "--http-workers", str(http_workers),
                                           "--stale-after", "2", *args], "server")
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, self.log(proc)
            try:
                return requests.get(url + "/healthz", timeout=1).status_code == 200
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow to answer a first time
                return False

        wait_for(up, what="the API to answer")
        self.server_proc = proc
        return url

    def kill_server(self) -> None:
        """SIGKILL the API's gunicorn master and its server processes at once, as a crash or the OOM killer would."""
        import psutil  # type: ignore[import-untyped]  # a test dependency, without stubs

        assert self.server_proc is not None
        family = [psutil.Process(self.server_proc.pid), *psutil.Process(self.server_proc.pid).children(recursive=True)]
        for member in family:
            member.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)

    def worker_count(self) -> int:
        """Workers ever registered in the queue."""
        db = store.connect(self.db_path)
        try:
            return db.worker_count()
        finally:
            db.close()

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """The process's output so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    def stop_all(self) -> None:
        """SIGTERM every process still running, then SIGKILL stragglers."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def fresh_queue() -> Iterator[Processes]:
    """A new queue file in a temporary folder and Processes on it; every process is stopped on the way out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "queue.db")
        store.open_migrated(path).close()
        procs = Processes(Path(tmp), path)
        try:
            yield procs
        finally:
            procs.stop_all()


TEST_WEBHOOK_SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 known bytes, for receivers to verify


class WebhookReceiver:
    """A webhook receiver on loopback that verifies each delivery's Standard Webhooks signature and answers the
    statuses it is told to (then 200); `received` holds (arrival time, headers, parsed body) of verified ones."""

    def __init__(self, secret: str = TEST_WEBHOOK_SECRET, statuses: tuple[int, ...] = ()):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from standardwebhooks import Webhook, WebhookVerificationError

        self.received: list[tuple[float, dict[str, str], dict[str, Any]]] = []
        self.rejected: list[str] = []
        self.attempts: list[tuple[float, str]] = []  # (time, webhook-id) of every request, answered or not
        self.statuses = list(statuses)
        verifier = Webhook(secret)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.attempts.append((time.time(), headers.get("webhook-id", "")))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    try:
                        receiver.received.append((time.time(), headers, verifier.verify(body, headers)))
                    except WebhookVerificationError as error:
                        receiver.rejected.append(str(error))
                        status = 400
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # a quick close

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()

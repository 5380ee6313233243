"""Fixtures: real SQLite files in tmp_path, the Flask app, and real API and worker subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from mflux_server import db
from mflux_server.app import create_app
from mflux_server.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def task_row(db_path: str, task_id: str) -> dict | None:
    """Read one task straight from the database."""
    conn = db.connect(db_path)
    try:
        row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return dict(row) if row else None
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A fresh, migrated queue file."""
    path = str(tmp_path / "queue.db")
    db.open_database(path).close()
    return path


@pytest.fixture
def conn(db_path: str) -> Iterator[sqlite3.Connection]:
    """A connection to the fresh queue."""
    connection = db.connect(db_path)
    yield connection
    connection.close()


@pytest.fixture
def app(db_path: str):
    """The API app on the fresh queue."""
    return create_app(Settings(db=db_path, stale_after=2.0))


@pytest.fixture
def client(app):
    """Flask's test client (for input rules; the e2e tests use real HTTP)."""
    return app.test_client()


class Processes:
    """Starts mflux-server and mflux-worker as real subprocesses and stops them at the end of a test."""

    def __init__(self, tmp_path: Path, db_path: str):
        self.tmp_path = tmp_path
        self.db_path = db_path
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, module: str, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--db", self.db_path, *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def worker(self, *args: str, speed: float = 20.0, wait: bool = True) -> subprocess.Popen:
        """Start a synthetic worker with fast heartbeats; waits until it has registered."""
        before = self.worker_count()
        proc = self._spawn(
            "worker",
            ["--engine", "synthetic", "--synthetic-speed", str(speed), "--heartbeat-interval", "0.2",
             "--stale-after", "2", *args],
            "worker",
        )
        if wait:
            wait_for(lambda: self.worker_count() > before or proc.poll() is not None, what="worker registration")
            assert proc.poll() is None, self.log(proc)
        return proc

    def server(self, *args: str) -> str:
        """Start the API under gunicorn on a free port; returns its base URL once it answers."""
        port = free_port()
        proc = self._spawn("mflux_server", ["--port", str(port), "--http-workers", "1", "--stale-after", "2", *args], "server")
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, self.log(proc)
            try:
                return requests.get(url + "/api/info", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, what="the API to answer")
        return url

    def worker_count(self) -> int:
        """Workers ever registered in the queue."""
        conn = db.connect(self.db_path)
        try:
            return conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0]
        finally:
            conn.close()

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        """The process's output so far."""
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

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


@pytest.fixture
def processes(tmp_path: Path, db_path: str) -> Iterator[Processes]:
    """Real API and worker processes on the test's queue."""
    procs = Processes(tmp_path, db_path)
    yield procs
    procs.stop_all()


def submit(url: str, **fields) -> str:
    """POST /api/generate with small defaults; returns the task id."""
    body = {"prompt": "a test", "width": 256, "height": 256, "steps": 4, "seed": 1}
    body.update(fields)
    response = requests.post(url + "/api/generate", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def wait_status(url: str, task_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> dict:
    """Poll /api/status until the task reaches one of the statuses."""
    def reached():
        body = requests.get(url + "/api/status", params={"task_id": task_id}, timeout=10).json()
        return body if body.get("status") in statuses else None

    return wait_for(reached, timeout=timeout, interval=0.02, what=f"task {task_id} to reach {statuses}")

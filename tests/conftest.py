"""Fixtures: real SQLite files in tmp_path, the Flask app, and real API and worker subprocesses (bench.harness)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.harness import Processes, wait_for
from mflux_server import db
from mflux_server.app import create_app
from mflux_server.config import Settings


class StopHere(Exception):
    """Raised by Recorder to stop a generation at a chosen step."""


class Recorder:
    """A StepReporter that records the engine's events, and can stop it at a step."""

    def __init__(self, stop_at: int | None = None):
        self.events: list[object] = []
        self.stop_at = stop_at

    def loop_started(self) -> None:
        self.events.append("loop")

    def step(self, done: int, total: int) -> None:
        self.events.append((done, total))
        if done == self.stop_at:
            raise StopHere(f"stopped at step {done}")


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

"""The one fixture module: real SQLite files in tmp_path, task factories, the Flask app, and real processes.

tests/fast/ runs in-process (`make test-fast`); tests/process/ starts real API and worker processes and
is marked `process` here, by folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mflux_server import store
from mflux_server.core.rows import NewTask, StoredImage, Task
from mflux_server.core.settings import Settings
from mflux_server.store import Store
from mflux_server.testing_postgres import PostgresServer, why_unavailable

if TYPE_CHECKING:  # the app, HTTP and process helpers are imported where used: xdist's controller needs none
    from flask import Flask
    from flask.testing import FlaskClient

    from mflux_server.testing import Processes

PROCESS_TESTS = Path(__file__).parent / "process"
SHARED_POSTGRES = pytest.StashKey[PostgresServer]()
POSTGRES_STOPPING = pytest.StashKey[threading.Thread]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/process/ as a process test."""
    for item in items:
        if PROCESS_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.process)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what imports and collection made out of the garbage collector's sight: every full collection walked
    mflux's, transformers' and the suite's millions of objects again (about 1.5 s of each xdist worker's run)."""
    gc.freeze()


# One PostgreSQL server for a run with pytest-xdist: its controller starts it while the workers start and
# collect, and each worker makes its databases there (a server of each worker's own cost it 1.3 s of the run).


def pytest_configure(config: pytest.Config) -> None:
    """In pytest-xdist's controller, start the run's PostgreSQL server in the background."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None) or why_unavailable() is not None:
        return
    server = PostgresServer()
    threading.Thread(target=server.start, daemon=True, name="postgres-start").start()  # the workers wait for it
    config.stash[SHARED_POSTGRES] = server


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each pytest-xdist worker the port of the run's PostgreSQL server."""
    server = node.config.stash.get(SHARED_POSTGRES, None)
    if server is not None:
        node.workerinput["mflux_postgres_port"] = server.port


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Once the workers are done, stop the run's PostgreSQL server (if the controller started one) while the
    controller reports."""
    server = session.config.stash.get(SHARED_POSTGRES, None)
    if server is not None:
        stopping = threading.Thread(target=server.stop, name="postgres-stop")
        stopping.start()
        session.config.stash[POSTGRES_STOPPING] = stopping


def pytest_unconfigure(config: pytest.Config) -> None:
    """Wait for the run's PostgreSQL server to be stopped and its files removed."""
    stopping = config.stash.get(POSTGRES_STOPPING, None)
    if stopping is not None:
        stopping.join()


# Factories

TASK_DEFAULTS = NewTask(prompt="p", model="schnell", width=512, height=512, steps=4, guidance=3.5, seed=7, count=1,
                        format="PNG", quality=90, priority=0)


def new_task(**overrides: Any) -> NewTask:
    """A valid task request: small defaults, any field overridden."""
    return replace(TASK_DEFAULTS, **overrides)


def queue_task(db: Store, now: float | None = None, **overrides: Any) -> Task:
    """Submit a task built by new_task and return its row."""
    return db.submit(new_task(**overrides), now=now)


def images_for(task: Task, data: bytes = b"img") -> list[StoredImage]:
    """One small fake encoded image per image of a task, as the worker would store them."""
    return [StoredImage(i, task.seed + i, "image/png", data + b"%d" % i, 1.0, 2.0) for i in range(task.count)]


def reread(db_path: str, task_id: str) -> Task | None:
    """Read one task afresh, on a session of its own."""
    db = store.connect(db_path)
    try:
        return db.get(task_id)
    finally:
        db.close()


def status_of(db_path: str, task_id: str) -> str | None:
    """A task's status as the database has it now (None when deleted)."""
    task = reread(db_path, task_id)
    return task.status if task else None


class StopHere(Exception):
    """Raised by Recorder to stop a generation at a chosen step."""


class Recorder:
    """A StepReporter that records the engine's events, and can stop it at a step."""

    def __init__(self, stop_at: int | None = None, previews: bool = False):
        self.events: list[object] = []
        self.stop_at = stop_at
        self.previews: list[object] = [] if previews else None  # drawn previews, when asked to draw them

    def loop_started(self) -> None:
        self.events.append("loop")

    def step(self, done: int, total: int, preview=None) -> None:
        self.events.append((done, total))
        if self.previews is not None and preview is not None:
            self.previews.append(preview())
        if done == self.stop_at:
            raise StopHere(f"stopped at step {done}")


# Fixtures


@pytest.fixture
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated queue file (a PostgreSQL database instead with MFLUX_TEST_STORE=postgresql, which runs
    every test on that store; tests about SQLite's files then fail, as they should)."""
    if os.environ.get("MFLUX_TEST_STORE") == "postgresql":
        yield from postgres_database(request.getfixturevalue("postgres_server"))
        return
    path = tmp_path / "queue.db"
    shutil.copyfile(request.getfixturevalue("migrated_file"), path)
    yield str(path)


def postgres_database(server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated PostgreSQL queue for one test, emptied for another after it."""
    url = server.create_database(migrated=True)
    yield url
    server.recycle(url)


@pytest.fixture(scope="session")
def migrated_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite queue migrated once for the run; each test's queue is a copy (a tenth of a migration's time)."""
    path = tmp_path_factory.mktemp("template") / "queue.db"
    store.open_migrated(str(path)).close()
    return path


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the run, started from Debian's binaries (by pytest-xdist's controller, when there
    is one); a loud skip where there are none (on CI, where they must be, a failure)."""
    reason = why_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL store tests, but {reason}")
        pytest.skip(f"PostgreSQL STORE TESTS SKIPPED: {reason}")
    port = getattr(pytestconfig, "workerinput", {}).get("mflux_postgres_port")
    # In /tmp: pytest's own folders are closed to the postgres user.
    server = PostgresServer(running_on=port).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated queue on each store in turn: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        target = tmp_path / "queue.db"
        shutil.copyfile(request.getfixturevalue("migrated_file"), target)
        yield str(target)
        return
    yield from postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def db(db_path: str) -> Iterator[Store]:
    """A store session with the fresh queue."""
    session = store.connect(db_path)
    yield session
    session.close()


@pytest.fixture
def app(db_path: str) -> Flask:
    """The API app on the fresh queue."""
    from mflux_server.api.app import create_app

    return create_app(Settings(db=db_path, stale_after=2.0))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client (for input rules; the process tests use real HTTP)."""
    return app.test_client()


@pytest.fixture
def processes(tmp_path: Path, db_path: str) -> Iterator[Processes]:
    """Real API and worker processes on the test's queue."""
    from mflux_server.testing import Processes

    procs = Processes(tmp_path, db_path)
    yield procs
    procs.stop_all()


# Over HTTP


def submit(url: str, **fields: Any) -> str:
    """POST /api/generate with small defaults; returns the task id."""
    import requests

    body = {"prompt": "a test", "width": 256, "height": 256, "steps": 4, "seed": 1}
    body.update(fields)
    response = requests.post(url + "/api/generate", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["task_id"])


def wait_status(url: str, task_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
    """Poll /api/status until the task reaches one of the statuses."""
    import requests

    from mflux_server.testing import wait_for

    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = requests.get(url + "/api/status", params={"task_id": task_id}, timeout=10).json()
        return body if body.get("status") in statuses else None

    found: dict[str, Any] = wait_for(reached, timeout=timeout, interval=0.02, what=f"task {task_id} to reach {statuses}")
    return found

"""The status path's read cache: kept on PostgreSQL until a NOTIFY or a second passes, never on SQLite."""

from __future__ import annotations

import pytest

from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.forecast.signal_cache import SignalCache
from mflux_server.testing import wait_for
from tests.conftest import queue_task


@pytest.fixture
def db_path(store_db: str) -> str:
    return store_db


def test_a_read_is_kept_until_the_store_changes(db):
    clock = [0.0]
    cache = SignalCache(max_age=1.0, clock=lambda: clock[0])
    reads = []

    def read() -> int:
        reads.append(1)
        return db.status_counts()[Status.WAITING]

    if db.capabilities.notifies:  # the listener's first LISTEN moves the signal too
        wait_for(lambda: db.data_version() > 0, timeout=5, what="the listener")
    assert cache.get(db, "waiting", read) == 0
    assert cache.get(db, "waiting", read) == 0
    if not db.capabilities.notifies:
        assert len(reads) == 2, "SQLite reads every time"
        return
    assert len(reads) == 1, "PostgreSQL answers the second from the cache"
    before = db.data_version()
    other = store.connect(db.target)
    queue_task(other)
    other.close()
    wait_for(lambda: db.data_version() != before, timeout=5, what="the NOTIFY of the new task")
    assert cache.get(db, "waiting", read) == 1 and len(reads) == 2
    assert cache.get(db, "waiting", read) == 1 and len(reads) == 2
    clock[0] = 1.5  # past max_age: what no NOTIFY announces is read again
    assert cache.get(db, "waiting", read) == 1 and len(reads) == 3


def test_a_new_task_finds_the_tasks_submitted_just_before_it(app, db, monkeypatch):
    # The NOTIFYs of the next two tasks have not arrived (the signal stands still): the cached read of newer tasks
    # predates both, and a task newer than anything in it must be read afresh.
    from mflux_server.api.context import forecaster

    monkeypatch.setattr(type(db), "data_version", lambda _db: 7)
    with app.app_context():
        first = queue_task(db, prompt="first")
        assert forecaster().estimate(db, first, workers=1).pos == 0
        second = queue_task(db, prompt="second")
        third = queue_task(db, prompt="third")
        assert forecaster().estimate(db, third, workers=1).pos == 2
        assert forecaster().estimate(db, second, workers=1).pos == 1
        assert forecaster().estimate(db, first, workers=1).pos == 0

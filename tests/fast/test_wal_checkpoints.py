"""Checkpoints of the SQLite queue: never PASSIVE (SQLite's WAL-reset bug before 3.51.3 loses commits there)."""

from __future__ import annotations

import os

import pytest

from mflux_server import store
from mflux_server.store.sqlite.connection import WAL_SIZE_LIMIT, wal_bytes
from tests.conftest import queue_task


@pytest.fixture
def sqlite_path(db_path: str) -> str:
    if "://" in db_path:
        pytest.skip("SQLite's WAL only")
    return db_path


def big_tasks(db, megabytes: float) -> None:
    """Commit about `megabytes` of WAL in tasks of 100 KB prompts."""
    for _ in range(int(megabytes * 10)):
        queue_task(db, prompt=os.urandom(50_000).hex()[:100_000])


@pytest.mark.parametrize("pages", [None, store.EAGER_PAGES, store.BACKSTOP_PAGES])
def test_no_session_lets_sqlite_checkpoint_passively_on_its_own(sqlite_path, pages):
    db = store.connect(sqlite_path, pages)
    try:
        assert db.session.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert db.session.checkpoint_bytes == (pages or 1000) * 4096
    finally:
        db.close()


def test_a_commit_past_the_bound_checkpoints_full_and_the_wal_is_cut_back(sqlite_path):
    db = store.connect(sqlite_path, store.EAGER_PAGES)
    seen: list[tuple[int, int, int]] = []
    real = db.session.checkpoint_full
    db.session.checkpoint_full = lambda: seen.append(real()) or seen[-1]  # type: ignore[method-assign]
    try:
        big_tasks(db, 3)
        assert seen and all(busy == 0 and done == frames for busy, frames, done in seen), seen
        queue_task(db)  # the first write after a complete checkpoint restarts the WAL, cut back to its limit
        assert wal_bytes(db.session) <= WAL_SIZE_LIMIT + 200_000
        seen.clear()
        big_tasks(db, 0.1)  # under the bound: no checkpoint at commit, but the housekeeper's is the same FULL one
        assert not seen
        db.checkpoint()
        assert len(seen) == 1 and seen[0][0] == 0 and seen[0][2] == seen[0][1] > 0, seen
    finally:
        db.close()


def test_an_event_loop_session_never_checkpoints(sqlite_path):
    db = store.connect(sqlite_path, store.BACKSTOP_PAGES, wait_turn=lambda seconds: None)
    try:
        assert db.session.checkpoint_bytes is None
        big_tasks(db, 2)
        assert wal_bytes(db.session) > 2 * WAL_SIZE_LIMIT, "left to the housekeeper and the workers"
    finally:
        db.close()


def test_a_task_shown_as_a_live_workers_but_not_run_by_it_goes_back_to_the_queue(store_db):
    """The safety net for a lost write: a claim the worker lost track of would otherwise wait for good."""
    import time

    from mflux_server.core.rows import Status
    from mflux_server.core.settings import Settings
    from mflux_server.worker.publisher import GHOST_AFTER, ProgressPublisher

    db = store.connect(store_db)
    try:
        worker = db.register_worker("synthetic", "schnell", None)
        ghost, claimed, running, pending = (queue_task(db, prompt=name) for name in ("ghost", "claimed", "running",
                                                                                      "pending"))
        old = time.time() - GHOST_AFTER - 5
        for task in (ghost, claimed, running, pending):
            assert db.claim_next(worker, "schnell", "synthetic", now=old).id == task.id
        db.record_progress(pending.id, worker, 0, 4, time.time())  # generated just now: its completion is pending
        publisher = ProgressPublisher(Settings(db=store_db, heartbeat_interval=0.01), worker)
        publisher.task_claimed(claimed.id)  # loading a model before it starts
        publisher.task_started(running.id)
        publisher._publish_once(db)
        assert db.get(ghost.id).status is Status.WAITING and db.get(ghost.id).attempts == 1
        assert [db.get(t.id).status for t in (claimed, running, pending)] == [Status.PROCESSING] * 3
        assert db.claim_next(worker, "schnell", "synthetic").id == ghost.id, "claimed again, first in line"
    finally:
        db.close()

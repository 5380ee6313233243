"""Retention and idempotency in the store: expiry with remembered ids, the store bound, space given back."""

from __future__ import annotations

import os

from mflux_server.core import db, housekeeping, store
from tests.conftest import images_for, queue_task


def finish(conn, data: bytes = b"img", **overrides):
    task = queue_task(conn, **overrides)
    store.claim_next(conn, "w", task.model, "synthetic")
    store.complete(conn, task.id, "w", images_for(task, data))
    return store.get(conn, task.id)


def test_finished_tasks_expire_after_the_retention_and_their_ids_are_remembered(conn):
    old = finish(conn)
    waiting = queue_task(conn)
    assert store.expire_finished(conn, before=old.finished_at - 1) == 0
    assert store.expire_finished(conn, before=old.finished_at + 1) == 1
    assert store.get(conn, old.id) is None and store.is_expired(conn, old.id)
    assert store.get(conn, waiting.id) is not None, "unfinished tasks are never expired"
    assert not store.is_expired(conn, "never-existed")
    store.forget_old_records(conn, idempotency_before=0, expired_before=old.finished_at + 10 ** 6)
    assert not store.is_expired(conn, old.id), "ids are remembered for a window, not forever"


def test_the_store_bound_removes_the_oldest_finished_first(conn):
    tasks = [finish(conn, data=b"x" * 10_000) for _ in range(5)]
    assert store.store_bytes(conn) >= 50_000
    assert store.trim_store(conn, max_bytes=25_000) == 3
    assert [store.get(conn, t.id) is not None for t in tasks] == [False, False, False, True, True]
    assert store.store_bytes(conn) <= 25_000
    assert store.is_expired(conn, tasks[0].id)


def test_a_sweep_gives_the_space_back_to_the_file_system(db_path, conn):
    for _ in range(40):
        finish(conn, data=os.urandom(100_000))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    full = os.path.getsize(db_path)
    done = housekeeping.sweep(conn, keep_finished=0.0, max_store_bytes=None, now=10 ** 10)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert done.expired == 40 and done.pages_freed > 0
    assert os.path.getsize(db_path) < full / 2, f"{os.path.getsize(db_path)} of {full} bytes still held"


def test_an_idempotency_key_answers_its_task_and_refuses_another_body(conn):
    from tests.conftest import new_task

    first, _ = store.submit_idempotent(conn, new_task(prompt="a"), 1, "k1", "hash-a", window=3600)
    again, other = store.submit_idempotent(conn, new_task(prompt="a"), 1, "k1", "hash-a", window=3600)
    assert first is not None and again is not None and again.id == first.id and other is None
    clash, used_by = store.submit_idempotent(conn, new_task(prompt="b"), 1, "k1", "hash-b", window=3600)
    assert clash is None and used_by == first.id
    other_key, _ = store.submit_idempotent(conn, new_task(prompt="a"), 2, "k1", "hash-a", window=3600)
    assert other_key is not None and other_key.id != first.id, "keys are per API key"
    assert store.list_tasks(conn, None, 10, 0)[1] == 2


def test_new_queue_files_vacuum_incrementally(db_path):
    conn = db.connect(db_path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2

"""Storage faults on a real SQLite file: a full disk, a removed WAL, a bad --db; the answers and the worker's patience."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
from PIL import Image

from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.store import StoreError
from mflux_server.store.sqlite.connection import problem_of
from mflux_server.worker.messages import SHUTDOWN, ImageGenerated
from mflux_server.worker.result_writer import ResultWriter
from mflux_server.worker.storage_retry import StorageRetry
from tests.conftest import queue_task


def app_conn(client):
    return client.application.extensions["mflux_sessions"].get()


def fill_up(db) -> None:
    """Make the database as full as a full disk: no page beyond those it has."""
    pages = db.session.execute("PRAGMA page_count").fetchone()[0]
    db.session.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_is_a_507_storage_full_and_submits_resume_once_space_is_back(client):
    db = app_conn(client)
    fill_up(db)
    big = {"prompt": "x" * 3900}
    answers = [client.post("/api/generate", json=big) for _ in range(40)]  # pages fill up within a few of these
    full = [a for a in answers if a.status_code != 200]
    assert full and all(a.status_code == 507 for a in full), {a.status_code for a in answers}
    assert full[0].json["code"] == "storage_full" and full[0].headers["Retry-After"] == "5"
    assert "not carried out" in full[0].json["message"]
    acknowledged = sum(a.status_code == 200 for a in answers)
    assert db.status_counts()[Status.WAITING] == acknowledged, "every 200 is stored, no 507 is"
    db.session.execute("PRAGMA max_page_count = 1073741823")
    assert client.post("/api/generate", json=big).status_code == 200


def test_a_removed_wal_stops_acknowledging_writes_and_says_why(client, db_path):
    first = client.post("/api/generate", json={"prompt": "before"})
    assert first.status_code == 200
    os.remove(db_path + "-wal")
    refused = client.post("/api/generate", json={"prompt": "after"})
    assert refused.status_code == 503 and refused.json["code"] == "storage_lost"
    assert "WAL was removed or replaced" in refused.json["message"] or "replaced" in refused.json["message"]
    again = client.delete(f"/api/tasks/{first.json['task_id']}")
    assert again.status_code == 503, "every later write is refused too, not only the first"
    assert client.get("/api/info").status_code == 200, "reads still answer"


def test_a_replaced_database_file_is_noticed_too(tmp_path):
    path = str(tmp_path / "q.db")
    db = store.open_migrated(path)
    db.session.execute("BEGIN IMMEDIATE")
    db.session.execute("COMMIT")
    os.replace(path, str(tmp_path / "moved.db"))
    store.open_migrated(path).close()  # a fresh file at the same path, as a restore from backup would leave
    with pytest.raises(store.StorageLost, match="replaced"):
        db.session.execute("BEGIN IMMEDIATE")
    assert store.storage_problem(store.StorageLost("x")) == "lost"


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp, "it is a directory"),
    (lambda tmp: (tmp / "text.db").write_text("not sqlite at all" * 100) and tmp / "text.db", "not an SQLite database"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "q.db", "cannot create the folder"),
])
def test_a_bad_db_path_exits_with_one_line_naming_it(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        store.open_or_exit(path, "mflux-server")
    message = str(stopped.value.code)
    assert message.startswith(f"mflux-server: cannot use the queue file {path}: ") and reason in message
    assert "\n" not in message


def test_storage_retry_waits_out_a_full_disk_and_gives_other_errors_back_at_once(tmp_path):
    db = store.open_migrated(str(tmp_path / "q.db"))
    db.session.execute("CREATE TABLE blobs (data BLOB)")
    fill_up(db)
    threading.Timer(0.3, lambda: db.session.execute("PRAGMA max_page_count = 1073741823")).start()
    started = time.monotonic()
    StorageRetry("test", threading.Event()).run(lambda: db.session.execute("INSERT INTO blobs VALUES (?)", (b"x" * 50_000,)))
    assert time.monotonic() - started >= 0.25 and db.session.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
    with pytest.raises(ZeroDivisionError):
        StorageRetry("test", threading.Event()).run(lambda: 1 / 0)


def test_the_result_writer_keeps_a_finished_image_through_a_full_disk_and_stores_it_after(db_path):
    db = store.open_migrated(db_path)
    worker = db.register_worker("synthetic", "schnell", None)
    task_id = queue_task(db, width=256, height=256).id
    task = db.claim_next(worker, "schnell", "synthetic")
    writer_conn = store.connect(db_path)
    fill_up(writer_conn)
    writer = ResultWriter(worker)
    thread = threading.Thread(target=writer.run, args=(writer_conn,), daemon=True)
    thread.start()
    noise = Image.effect_noise((256, 256), 90).convert("RGB")  # incompressible: its PNG needs new pages
    writer.send(ImageGenerated(task, 0, noise, 1.0, 2.0, 0.1, "test"))
    time.sleep(0.5)  # the writer has tried twice (now and after 0.2 s) and waits 0.4 s more
    assert db.get(task_id).status is Status.PROCESSING, "held while the disk is full, not failed"
    writer_conn.session.execute("PRAGMA max_page_count = 1073741823")
    writer.send(SHUTDOWN)
    thread.join(timeout=20)
    assert db.get(task_id).status is Status.DONE and db.fetch_image(task_id, 0) is not None


def real_busy_error(tmp_path) -> store.StoreError:
    """SQLite's own SQLITE_BUSY, from a write to a file another connection holds the write lock of, as the store
    raises it."""
    path = str(tmp_path / "locked.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    try:
        sqlite3.connect(path, timeout=0, isolation_level=None).execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        return store.StoreError(str(error), problem_of(error))
    finally:
        holder.rollback()
    raise AssertionError("the second writer was not refused")


def test_a_fault_after_the_submit_committed_never_says_the_request_was_not_carried_out(client, monkeypatch, tmp_path):
    from mflux_server.api import generation

    busy = real_busy_error(tmp_path)

    def locked(*args, **kwargs):
        raise busy  # an external lock taken right after the task's commit

    monkeypatch.setattr(type(app_conn(client)), "set_forecast", locked)
    client.post("/api/generate", json={"prompt": "warm the cost model"})
    queued = client.post("/api/generate", json={"prompt": "forecast not recorded"})
    assert queued.status_code == 200 and queued.json["task_id"], "the forecast metric is not worth an error"
    monkeypatch.setattr(generation, "task_status_and_estimate", locked)
    answer = client.post("/api/generate", json={"prompt": "answer cut short"})
    assert answer.status_code == 503 and "not carried out" not in answer.json["message"]
    task_id = answer.json["task_id"]
    assert f"the task was queued as {task_id}" in answer.json["message"]
    assert app_conn(client).get(task_id) is not None


def test_a_writer_on_the_event_loop_waits_for_the_write_lock_by_yielding_and_gives_up_at_the_busy_timeout(
        tmp_path, monkeypatch):
    from mflux_server.store.sqlite import connection

    path = tmp_path / "queue.db"
    holder = store.open_migrated(path)
    waiter = store.connect(path)
    pauses: list[float] = []

    def yield_once(seconds: float) -> None:  # what gevent.sleep does for the loop; here the holder commits at last
        pauses.append(seconds)
        if len(pauses) == 6:
            holder.session.execute("COMMIT")

    waiter.session.wait_turn = yield_once
    holder.session.execute("BEGIN IMMEDIATE")
    with waiter.session.transaction():
        waiter.session.execute("SELECT 1")
    assert len(pauses) == 6 and pauses == sorted(pauses) and pauses[0] < pauses[-1] <= connection.LAST_PAUSE
    busy = waiter.session.execute("PRAGMA busy_timeout").fetchone()[0]
    assert busy == connection.BUSY_TIMEOUT_MS, "other statements of the session still wait in SQLite as before"

    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 30)
    holder.session.execute("BEGIN IMMEDIATE")
    waiter.session.wait_turn = lambda seconds: time.sleep(seconds)
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        waiter.session.begin()
    assert refused.value.problem == "busy" and time.monotonic() - started < 1.0
    holder.session.execute("ROLLBACK")
    holder.close()
    waiter.close()


def test_only_the_event_loop_s_own_session_waits_for_the_lock_by_yielding(tmp_path):
    import subprocess
    import sys

    probe = """
from gevent import monkey
monkey.patch_all()
import gevent
from mflux_server.api.context import Sessions
from mflux_server.core import native
print(native.loop_waiter() is gevent.sleep, gevent.get_hub().threadpool.apply(native.loop_waiter) is None)
sessions = Sessions({path!r})
print(sessions.get().session.wait_turn is gevent.sleep)
"""
    path = str(tmp_path / "queue.db")
    store.open_migrated(path).close()
    out = subprocess.run([sys.executable, "-c", probe.format(path=path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["True", "True", "True"], out

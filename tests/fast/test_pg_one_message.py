"""The claim sent as one message on PostgreSQL: placeholders, the write lock held, errors and a cut session."""

from __future__ import annotations

import threading
import time

import pytest

from mflux_server.core import db, pg, store
from mflux_server.core.db import storage_problem
from mflux_server.core.pg_one_message import positional
from mflux_server.core.rows import Status
from tests.conftest import queue_task


@pytest.fixture
def pg_conn(postgres_server):
    url = postgres_server.create_database()
    db.open_database(url).close()
    conn = db.connect(url)
    yield conn
    conn.close()


def test_placeholders_become_positions_each_name_once():
    text, names = positional("UPDATE t SET a = %(now)s, b = %(who)s WHERE c = %(now)s AND d LIKE 'x%%'")
    assert text == "UPDATE t SET a = $1, b = $2 WHERE c = $1 AND d LIKE 'x%'"
    assert names == ["now", "who"]


def test_a_claim_in_one_message_takes_the_task_in_order_under_the_write_lock(pg_conn):
    first, second = queue_task(pg_conn), queue_task(pg_conn)
    urgent = queue_task(pg_conn, priority=1)
    claimed = store.claim_next(pg_conn, "w", first.model, "synthetic")
    assert claimed is not None and claimed.id == urgent.id
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (Status.PROCESSING, "w", 1)
    assert store.get(pg_conn, urgent.id) == claimed  # committed, and read back the same

    # Another session holds the write lock: the claim waits for it, so the lock is part of the claim's transaction.
    holder = db.connect(pg_conn.url)
    holder.session().execute(f"SELECT pg_advisory_lock({pg.WRITE_LOCK})")
    done: list = []
    claimer = threading.Thread(target=lambda: done.append(store.claim_next(pg_conn, "w", first.model, "synthetic")))
    claimer.start()
    time.sleep(0.5)
    assert not done, "the claim ran while another session held the write lock"
    holder.session().execute(f"SELECT pg_advisory_unlock({pg.WRITE_LOCK})")
    claimer.join(10)
    assert done and done[0].id == first.id
    holder.close()
    assert store.claim_next(pg_conn, "w", first.model, "synthetic").id == second.id
    assert store.claim_next(pg_conn, "w", first.model, "synthetic") is None


def test_a_cut_session_fails_one_claim_as_io_and_the_next_reconnects(pg_conn):
    waiting = queue_task(pg_conn)
    store.prepare_claims(pg_conn, "w", "synthetic")
    killer = db.connect(pg_conn.url)
    pid = pg_conn.session().info.backend_pid
    killer.session().execute("SELECT pg_terminate_backend(%s)", (pid,))
    killer.close()
    with pytest.raises(Exception) as failed:
        store.claim_next(pg_conn, "w", waiting.model, "synthetic")
    assert storage_problem(failed.value) == "io", failed.value
    claimed = store.claim_next(pg_conn, "w", waiting.model, "synthetic")  # a new session, prepared again
    assert claimed is not None and claimed.id == waiting.id


def test_a_claim_after_psycopg_dropped_every_prepared_statement_prepares_its_own_again(pg_conn):
    first, second = queue_task(pg_conn), queue_task(pg_conn)
    assert store.claim_next(pg_conn, "w", first.model, "synthetic").id == first.id
    # psycopg answers a ROLLBACK it sees with DEALLOCATE ALL, which takes the claim's statements too.
    pg_conn.execute("BEGIN")
    pg_conn.execute("SELECT 1 FROM tasks").fetchall()
    pg_conn.execute("ROLLBACK")
    pg_conn.execute("SELECT 1").fetchall()  # psycopg deallocates before its next statement
    names = [row[0] for row in pg_conn.session().execute("SELECT name FROM pg_prepared_statements")]
    assert not [name for name in names if name.startswith("mflux_one_")], names
    assert store.claim_next(pg_conn, "w", first.model, "synthetic").id == second.id


def test_a_rehearsed_claim_changes_nothing_and_keeps_psycopgs_prepared_statements(pg_conn):
    waiting = queue_task(pg_conn)
    store.get(pg_conn, waiting.id)  # prepared by psycopg
    store.prepare_claims(pg_conn, "w", "synthetic", waiting.model)
    assert store.get(pg_conn, waiting.id) == waiting
    names = [row[0] for row in pg_conn.session().execute("SELECT name FROM pg_prepared_statements")]
    assert [name for name in names if name.startswith("_pg3_")], f"psycopg's statements were dropped: {names}"

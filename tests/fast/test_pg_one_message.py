"""The claim sent as one message on PostgreSQL: placeholders, the write lock held, errors and a cut session."""

from __future__ import annotations

import threading
import time

import pytest

from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.store import storage_problem
from mflux_server.store.postgresql.one_message import positional
from mflux_server.store.postgresql.session import WRITE_LOCK
from tests.conftest import queue_task


@pytest.fixture
def pg_conn(postgres_server):
    url = postgres_server.create_database(migrated=True)
    db = store.connect(url)
    yield db
    db.close()
    postgres_server.recycle(url)


def test_placeholders_become_positions_each_name_once():
    text, names = positional("UPDATE t SET a = %(now)s, b = %(who)s WHERE c = %(now)s AND d LIKE 'x%%'")
    assert text == "UPDATE t SET a = $1, b = $2 WHERE c = $1 AND d LIKE 'x%'"
    assert names == ["now", "who"]


def test_a_claim_in_one_message_takes_the_task_in_order_under_the_write_lock(pg_conn):
    first, second = queue_task(pg_conn), queue_task(pg_conn)
    urgent = queue_task(pg_conn, priority=1)
    claimed = pg_conn.claim_next("w", first.model, "synthetic")
    assert claimed is not None and claimed.id == urgent.id
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (Status.PROCESSING, "w", 1)
    assert pg_conn.get(urgent.id) == claimed  # committed, and read back the same

    # Another session holds the write lock: the claim waits for it, so the lock is part of the claim's transaction.
    holder = store.connect(pg_conn.target)
    holder.session.session().execute(f"SELECT pg_advisory_lock({WRITE_LOCK})")
    done: list = []
    claimer = threading.Thread(target=lambda: done.append(pg_conn.claim_next("w", first.model, "synthetic")))
    claimer.start()
    time.sleep(0.25)  # a claim that did not wait for the lock takes a few milliseconds
    assert not done, "the claim ran while another session held the write lock"
    holder.session.session().execute(f"SELECT pg_advisory_unlock({WRITE_LOCK})")
    claimer.join(10)
    assert done and done[0].id == first.id
    holder.close()
    assert pg_conn.claim_next("w", first.model, "synthetic").id == second.id
    assert pg_conn.claim_next("w", first.model, "synthetic") is None


def test_a_cut_session_fails_one_claim_as_io_and_the_next_reconnects(pg_conn):
    waiting = queue_task(pg_conn)
    pg_conn.prepare_claims("w", "synthetic")
    killer = store.connect(pg_conn.target)
    pid = pg_conn.session.session().info.backend_pid
    killer.session.session().execute("SELECT pg_terminate_backend(%s)", (pid,))
    killer.close()
    with pytest.raises(Exception) as failed:
        pg_conn.claim_next("w", waiting.model, "synthetic")
    assert storage_problem(failed.value) == "io", failed.value
    claimed = pg_conn.claim_next("w", waiting.model, "synthetic")  # a new session, prepared again
    assert claimed is not None and claimed.id == waiting.id


def test_a_claim_after_psycopg_dropped_every_prepared_statement_prepares_its_own_again(pg_conn):
    first, second = queue_task(pg_conn), queue_task(pg_conn)
    assert pg_conn.claim_next("w", first.model, "synthetic").id == first.id
    # psycopg answers a ROLLBACK it sees with DEALLOCATE ALL, which takes the claim's statements too.
    with pytest.raises(RuntimeError), pg_conn.session.transaction():
        pg_conn.session.execute("SELECT 1 FROM tasks").fetchall()
        raise RuntimeError("rolled back")
    pg_conn.session.execute("SELECT 1").fetchall()  # psycopg deallocates before its next statement
    names = [row[0] for row in pg_conn.session.session().execute("SELECT name FROM pg_prepared_statements")]
    assert not [name for name in names if name.startswith("mflux_one_")], names
    assert pg_conn.claim_next("w", first.model, "synthetic").id == second.id


def test_a_rehearsed_claim_changes_nothing_and_keeps_psycopgs_prepared_statements(pg_conn):
    waiting = queue_task(pg_conn)
    pg_conn.get(waiting.id)  # prepared by psycopg
    pg_conn.prepare_claims("w", "synthetic", waiting.model)
    assert pg_conn.get(waiting.id) == waiting
    names = [row[0] for row in pg_conn.session.session().execute("SELECT name FROM pg_prepared_statements")]
    assert [name for name in names if name.startswith("_pg3_")], f"psycopg's statements were dropped: {names}"


def test_a_recycled_test_database_is_the_template_again_and_out_of_reach_of_a_session_left_on_it(postgres_server):
    # The suite's own plumbing (PostgresServer.recycle): a test's leftovers must not reach the next test.
    url = postgres_server.create_database(migrated=True)
    left = store.connect(url)
    first = queue_task(left)
    postgres_server.recycle(url)
    with pytest.raises(Exception) as cut:
        queue_task(left)
    assert storage_problem(cut.value) == "io", cut.value
    reused = [postgres_server.create_database(migrated=True) for _ in range(2)]
    assert url not in reused and any("/reused_" in found for found in reused), "the used database came back renamed"
    for found in reused:
        db = store.connect(found)
        assert db.list_tasks(Status.WAITING, 10, 0)[0] == []
        assert queue_task(db).seq == first.seq, "sequences start again where the template's stood"
        db.close()
        postgres_server.recycle(found)

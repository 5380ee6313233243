"""The store contract: typed rows, claim order, guarded writes, cancel, recovery, and the query file."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import time
from pathlib import Path

import pytest

from mflux_server.core import db, query_files, store
from mflux_server.core.rows import InputImage, Recovery, Removal, Status, Task, Timing
from tests.conftest import images_for, new_task, queue_task


@pytest.fixture
def db_path(store_db: str) -> str:
    """Every store test runs on SQLite and on PostgreSQL: one contract for both."""
    return store_db


def claim(conn, worker: str = "w", model: str = "schnell") -> Task | None:
    return store.claim_next(conn, worker, model, "synthetic")


def test_rows_are_frozen_typed_tasks(conn):
    task = queue_task(conn, prompt="typed")
    assert isinstance(task, Task) and task.status is Status.WAITING and task.prompt == "typed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.status = Status.DONE  # type: ignore[misc]
    assert store.get(conn, task.id) == task


def test_claim_order_is_priority_then_fifo(conn):
    a = queue_task(conn, prompt="a")
    b = queue_task(conn, prompt="b", priority=1)
    c = queue_task(conn, prompt="c")
    d = queue_task(conn, prompt="d", priority=1)
    order = [claim(conn).id for _ in range(4)]  # type: ignore[union-attr]
    assert order == [b.id, d.id, a.id, c.id]
    assert claim(conn) is None


def test_a_claim_marks_the_task_processing_under_the_worker(conn):
    queue_task(conn)
    claimed = store.claim_next(conn, "w1", "schnell", "synthetic", now=123.0)
    assert claimed is not None
    assert (claimed.status, claimed.worker_id, claimed.engine, claimed.started_at, claimed.attempts) == (
        Status.PROCESSING, "w1", "synthetic", 123.0, 1)


def test_claim_only_takes_the_workers_model(conn):
    dev = queue_task(conn, model="dev")
    assert claim(conn) is None
    assert claim(conn, model="dev").id == dev.id  # type: ignore[union-attr]


def test_ids_are_unguessable_and_sequence_numbers_never_reused(conn):
    tasks = [queue_task(conn) for _ in range(200)]
    assert len({t.id for t in tasks}) == 200
    assert all(len(t.id) == 32 and int(t.id, 16) >= 0 for t in tasks)
    last = queue_task(conn)
    assert store.cancel_or_delete(conn, last.id) is Removal.CANCELED
    assert store.cancel_or_delete(conn, last.id) is Removal.DELETED
    assert queue_task(conn).seq == last.seq + 1  # AUTOINCREMENT: the deleted one's number is not reused


def test_a_worker_that_lost_its_task_cannot_overwrite_it(conn):
    t = queue_task(conn)
    claim(conn, "w1")
    assert store.cancel_or_delete(conn, t.id) is Removal.CANCELED
    assert not store.record_progress(conn, t.id, "w1", 0, 2, time.time())
    assert not store.still_mine(conn, t.id, "w1")
    assert not store.complete(conn, t.id, "w1", images_for(t))
    assert not store.fail(conn, t.id, "w1", "boom")
    assert not store.release(conn, t.id, "w1")
    assert store.get(conn, t.id).status is Status.CANCELED  # type: ignore[union-attr]
    assert store.fetch_image(conn, t.id, 0) is None


def test_complete_stores_images_and_done_together(conn):
    t = queue_task(conn, count=2)
    claimed = claim(conn)
    assert store.complete(conn, claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    done = store.get(conn, t.id)
    assert done.status is Status.DONE and done.step == done.steps and done.image_index == 1  # type: ignore[union-attr]
    image = store.fetch_image(conn, t.id, 1)
    assert image is not None and (image.idx, image.seed, image.data) == (1, 8, b"img1")
    assert store.generation_spans(conn) == [(1.0, 2.0), (1.0, 2.0)]


def test_a_failing_image_write_leaves_the_task_running_and_the_connection_usable(conn):
    # On PostgreSQL the image rows go out with the COMMIT: their error surfaces there, and must undo the lot.
    t = queue_task(conn, count=2)
    claimed = claim(conn)
    twice = [images_for(t)[0], images_for(t)[0]]  # the same image index twice breaks the primary key
    with pytest.raises(sqlite3.IntegrityError):
        store.complete(conn, claimed.id, "w", twice)  # type: ignore[union-attr]
    assert not conn.in_transaction
    assert store.get(conn, t.id).status is Status.PROCESSING and store.fetch_image(conn, t.id, 0) is None
    assert store.complete(conn, claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    assert store.get(conn, t.id).status is Status.DONE


@pytest.mark.parametrize("write", ["lone", "completion"])
def test_a_write_that_could_not_reach_the_server_leaves_no_transaction_behind(conn, monkeypatch, write):
    # Otherwise its BEGIN and the write lock would ride with the next statement, in a transaction nobody ends,
    # and every other writer would wait for that lock forever.
    if not store.is_postgres(conn):
        pytest.skip("PostgreSQL sessions only")
    from mflux_server.core import pg

    t = queue_task(conn)
    claimed = claim(conn)
    real, failures = conn.session, [1]

    def down():
        if failures:
            failures.pop()
            raise pg.PgStorageError("cannot reach PostgreSQL", "io")
        return real()

    monkeypatch.setattr(conn, "session", down)
    with pytest.raises(sqlite3.OperationalError):
        if write == "lone":
            store.record_progress(conn, t.id, "w", 0, 1, 1.0)
        else:
            store.complete(conn, claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    assert store.get(conn, t.id).status is Status.PROCESSING  # the next statement, on a session that works
    assert real().info.transaction_status.name == "IDLE", "a transaction was left open"


def test_writes_left_for_the_commit_vanish_with_a_rollback(conn):
    t = queue_task(conn)
    with pytest.raises(RuntimeError), db.transaction(conn):
        db.execute_later(conn, "UPDATE tasks SET prompt = 'changed' WHERE id = ?", (t.id,))
        raise RuntimeError("the block fails after its write")
    assert store.get(conn, t.id).prompt == t.prompt
    with db.transaction(conn):
        db.execute_later(conn, "UPDATE tasks SET prompt = 'changed' WHERE id = ?", (t.id,))
    assert store.get(conn, t.id).prompt == "changed"


def test_timings_accumulate_per_model_size_and_kind(conn):
    store.record_timings(conn, "schnell", 512, 768, [Timing("step", (0.1, 0.3)), Timing("encode", (0.01,))], now=5.0)
    store.record_timings(conn, "schnell", 512, 768, [Timing("step", (0.2,)), Timing("after", ())], now=6.0)
    stats = {s.kind: s for s in store.timing_stats(conn)}
    assert set(stats) == {"step", "encode"}  # an empty timing writes nothing
    assert stats["step"].n == 3 and stats["step"].total == pytest.approx(0.6)
    assert store.timing_version(conn) == (6.0, 2)


def test_image_delete_waits_for_every_image(conn):
    t = queue_task(conn, count=2)
    store.complete(conn, claim(conn).id, "w", images_for(t))  # type: ignore[union-attr]
    assert not store.mark_served(conn, t.id, 0, True)
    assert store.get(conn, t.id) is not None
    assert store.mark_served(conn, t.id, 1, True)
    assert store.get(conn, t.id) is None
    assert store.fetch_image(conn, t.id, 0) is None and store.generation_spans(conn) == []  # cascade


def test_release_puts_the_task_back_without_counting_the_attempt(conn):
    t = queue_task(conn)
    claim(conn)
    assert store.release(conn, t.id, "w")
    row = store.get(conn, t.id)
    assert (row.status, row.attempts, row.worker_id) == (Status.WAITING, 0, None)  # type: ignore[union-attr]


def test_the_change_counter_moves_when_a_task_leaves_other_than_by_a_claim_or_comes_back(conn):
    first, second, third = queue_task(conn), queue_task(conn), queue_task(conn)
    before = store.queue_changes(conn)
    queue_task(conn)  # a fresh submit: the forecast reads it past its snapshot
    assert claim(conn).id == first.id  # type: ignore[union-attr]
    assert store.queue_changes(conn) == before  # a claim takes the front, which the snapshot corrects for
    assert store.release(conn, first.id, "w")
    assert store.queue_changes(conn) == before + 1  # back in the queue
    assert store.cancel_or_delete(conn, third.id) is Removal.CANCELED
    assert store.queue_changes(conn) == before + 2  # gone from the middle
    assert store.cancel_or_delete(conn, second.id) is Removal.CANCELED
    assert store.cancel_or_delete(conn, second.id) is Removal.DELETED
    assert store.queue_changes(conn) == before + 3  # a canceled task's delete leaves no waiting set behind


def test_a_task_counts_its_input_images_so_a_claim_says_whether_to_read_them(conn):
    images = (InputImage("image", "image/png", 8, 8, b"png"), InputImage("mask", "image/png", 8, 8, b"mask"))
    with_inputs = store.submit(conn, new_task(inputs=images))
    plain = queue_task(conn)
    assert (with_inputs.input_count, plain.input_count) == (2, 0)
    assert claim(conn).input_count == 2 and set(store.inputs(conn, with_inputs.id)) == {"image", "mask"}
    assert claim(conn).input_count == 0 and store.inputs(conn, plain.id) == {}


def test_preparing_the_claims_changes_nothing_and_leaves_them_prepared_on_postgresql(conn):
    waiting = queue_task(conn)
    changes, events = store.queue_changes(conn), store.last_event_id(conn)
    store.prepare_claims(conn, "w", "synthetic", waiting.model)  # claims it for real, and rolls that back
    assert store.get(conn, waiting.id) == waiting
    assert (store.queue_changes(conn), store.last_event_id(conn)) == (changes, events)
    assert store.claim_next(conn, "w", waiting.model, "synthetic").id == waiting.id
    if store.is_postgres(conn):
        prepared = [row[0] for row in conn.session().execute("SELECT statement FROM pg_prepared_statements")]
        assert any("SKIP LOCKED" in text for text in prepared) and any("task_inputs" in text for text in prepared)


def test_cancel_then_delete(conn):
    t = queue_task(conn)
    assert store.cancel_or_delete(conn, t.id) is Removal.CANCELED
    assert claim(conn) is None  # a canceled task never starts
    assert store.cancel_or_delete(conn, t.id) is Removal.DELETED
    assert store.cancel_or_delete(conn, t.id) is None


def test_listing_and_counts(conn):
    waiting = [queue_task(conn, prompt=f"w{i}", priority=int(i == 2)) for i in range(3)]
    running = claim(conn)
    page, total = store.list_tasks(conn, None, 10, 0)
    assert total == 3 and [t.id for t in page] == [running.id, waiting[0].id, waiting[1].id]  # type: ignore[union-attr]
    only_waiting, total = store.list_tasks(conn, Status.WAITING, 1, 1)
    assert total == 2 and [t.id for t in only_waiting] == [waiting[1].id]
    counts = store.status_counts(conn)
    assert counts == {Status.WAITING: 2, Status.PROCESSING: 1, Status.DONE: 0, Status.ERROR: 0, Status.CANCELED: 0}
    assert [t.id for t in store.running_tasks(conn)] == [running.id]  # type: ignore[union-attr]


def test_live_workers_are_typed_and_stopped_ones_are_not_live(conn):
    first = store.register_worker(conn, "synthetic", "schnell", None)
    second = store.register_worker(conn, "mflux", "dev", 8)
    store.stop_worker(conn, first)
    live = store.live_workers(conn, stale_after=60)
    assert [(w.id, w.engine, w.model, w.quantize) for w in live] == [(second, "mflux", "dev", 8)]
    assert store.worker_count(conn) == 2


def test_recovery_requeues_a_dead_pid_at_once_and_fails_past_the_attempt_limit(conn):
    t = queue_task(conn)
    for attempt in range(1, 4):
        worker = store.register_worker(conn, "synthetic", "schnell", None, pid=999_999)  # no such process
        claimed = claim(conn, worker)
        assert claimed.attempts == attempt  # type: ignore[union-attr]
        outcome = store.recover_orphans(conn, stale_after=60, max_attempts=3, alive=lambda pid: False)
        assert outcome == [Recovery(t.id, Status.WAITING if attempt < 3 else Status.ERROR)]
    row = store.get(conn, t.id)
    assert row.status is Status.ERROR and "gave up after 3 attempts" in row.error  # type: ignore[union-attr, operator]


def test_recovery_leaves_live_workers_alone_and_takes_stale_ones(conn):
    t = queue_task(conn)
    remote = store.register_worker(conn, "synthetic", "schnell", None, pid=1)
    claim(conn, remote)
    assert store.recover_orphans(conn, stale_after=5, max_attempts=3, alive=lambda pid: True) == []
    store.heartbeat(conn, remote, now=time.time() - 10)
    assert store.recover_orphans(conn, stale_after=5, max_attempts=3, alive=lambda pid: True) == [
        Recovery(t.id, Status.WAITING)]


def test_every_named_query_has_a_description_and_compiles(conn):
    queries = query_files.queries()
    assert {"insert_task", "claim_next", "waiting_queue", "data_version"} <= set(queries)
    for query in queries.values():
        assert query.description and not query.description.startswith("--"), query.name
        assert query.sql and not query.sql.endswith(";")
        names = re.findall(r":(\w+)", query.sql)
        conn.execute("EXPLAIN " + query.sql, {n: None for n in names} if names else (None,) * query.sql.count("?"))


def test_the_query_loader_refuses_a_query_without_description_or_defined_twice():
    parsed = query_files.parse_queries("-- name: a\n-- Says what a does.\nSELECT 1;\n\n-- name: b\n-- And b.\nSELECT 2;\n")
    assert [(q.name, q.description, q.sql) for q in parsed.values()] == [("a", "Says what a does.", "SELECT 1"),
                                                                          ("b", "And b.", "SELECT 2")]
    with pytest.raises(ValueError, match="'a' has no description"):
        query_files.parse_queries("-- name: a\nSELECT 1;\n")
    with pytest.raises(ValueError, match="defined twice"):
        query_files.parse_queries("-- name: a\n-- x\nSELECT 1;\n-- name: a\n-- y\nSELECT 2;\n")


def test_every_query_is_used_by_the_store():
    source = Path(store.__file__).read_text()
    unused = [name for name in query_files.queries() if f'sql("{name}")' not in source]
    assert unused == [], f"queries.sql defines statements nothing runs: {unused}"


def test_every_change_of_a_task_appends_an_event_and_previews_belong_to_the_running_worker(conn):
    import json

    start = store.last_event_id(conn)
    task = queue_task(conn, steps=2, count=1)
    claimed = store.claim_next(conn, "w", "schnell", "synthetic")
    assert claimed.id == task.id
    assert store.record_progress(conn, task.id, "w", 0, 1, 100.0)
    assert not store.save_preview(conn, task.id, "someone-else", 1, 1, "image/jpeg", b"x")
    assert store.save_preview(conn, task.id, "w", 1, 1, "image/jpeg", b"first")
    assert store.save_preview(conn, task.id, "w", 1, 2, "image/jpeg", b"second")
    assert store.preview(conn, task.id).data == b"second"
    assert store.complete(conn, task.id, "w", images_for(claimed))
    assert store.preview(conn, task.id) is None, "a preview shows a running task only"
    store.cancel_or_delete(conn, task.id)
    events = store.events_after(conn, start)
    assert [(e.kind, json.loads(e.data).get("status")) for e in events] == [
        ("status", "waiting"), ("status", "processing"), ("progress", None), ("preview", None), ("preview", None),
        ("done", "done"), ("deleted", "deleted")]
    assert json.loads(events[2].data) == {"image": 1, "count": 1, "step": 1, "steps": 2}
    assert [e.id for e in events] == sorted({e.id for e in events}), "ids only grow"
    assert store.events_after(conn, events[3].id, task_id=task.id)[0].id == events[4].id
    assert store.last_event_id(conn) == events[-1].id


def test_waiting_tasks_of_every_model_since_a_sequence_number(conn):
    older = queue_task(conn)
    newer = [queue_task(conn, model=model) for model in ("schnell", "dev", "schnell")]
    store.claim_next(conn, "w", "dev", "synthetic")  # no longer waiting
    found = store.all_waiting_since(conn, older.seq)
    assert sorted(entry.seq for entry in found) == [newer[0].seq, newer[2].seq]
    assert {entry.model for entry in found} == {"schnell"}

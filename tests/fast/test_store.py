"""The store contract: typed rows, claim order, guarded writes, cancel, recovery, and the query file."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from mflux_server import store
from mflux_server.core.rows import InputImage, Recovery, Removal, Status, Task, Timing, UpscaleAfter
from mflux_server.store.query_files import Query, parse_queries
from mflux_server.worker.result_writer import upscales_after
from tests.conftest import images_for, new_task, queue_task


@pytest.fixture
def db_path(store_db: str) -> str:
    """Every store test runs on SQLite and on PostgreSQL: one contract for both."""
    return store_db


def claim(db, worker: str = "w", model: str = "schnell") -> Task | None:
    return db.claim_next(worker, model, "synthetic")


def test_rows_are_frozen_typed_tasks(db):
    task = queue_task(db, prompt="typed")
    assert isinstance(task, Task) and task.status is Status.WAITING and task.prompt == "typed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.status = Status.DONE  # type: ignore[misc]
    assert db.get(task.id) == task


def test_claim_order_is_priority_then_fifo(db):
    a = queue_task(db, prompt="a")
    b = queue_task(db, prompt="b", priority=1)
    c = queue_task(db, prompt="c")
    d = queue_task(db, prompt="d", priority=1)
    order = [claim(db).id for _ in range(4)]  # type: ignore[union-attr]
    assert order == [b.id, d.id, a.id, c.id]
    assert claim(db) is None


def test_a_claim_marks_the_task_processing_under_the_worker(db):
    queue_task(db)
    claimed = db.claim_next("w1", "schnell", "synthetic", now=123.0)
    assert claimed is not None
    assert (claimed.status, claimed.worker_id, claimed.engine, claimed.started_at, claimed.attempts) == (
        Status.PROCESSING, "w1", "synthetic", 123.0, 1)


def test_claim_only_takes_the_workers_model(db):
    dev = queue_task(db, model="dev")
    assert claim(db) is None
    assert claim(db, model="dev").id == dev.id  # type: ignore[union-attr]


def test_ids_are_unguessable_and_sequence_numbers_never_reused(db):
    tasks = [queue_task(db) for _ in range(200)]
    assert len({t.id for t in tasks}) == 200
    assert all(len(t.id) == 32 and int(t.id, 16) >= 0 for t in tasks)
    last = queue_task(db)
    assert db.cancel_or_delete(last.id) is Removal.CANCELED
    assert db.cancel_or_delete(last.id) is Removal.DELETED
    assert queue_task(db).seq == last.seq + 1  # AUTOINCREMENT: the deleted one's number is not reused


def test_a_worker_that_lost_its_task_cannot_overwrite_it(db):
    t = queue_task(db)
    claim(db, "w1")
    assert db.cancel_or_delete(t.id) is Removal.CANCELED
    assert not db.record_progress(t.id, "w1", 0, 2, time.time())
    assert not db.still_mine(t.id, "w1")
    assert not db.complete(t.id, "w1", images_for(t))
    assert not db.fail(t.id, "w1", "boom")
    assert not db.release(t.id, "w1")
    assert db.get(t.id).status is Status.CANCELED  # type: ignore[union-attr]
    assert db.fetch_image(t.id, 0) is None


def test_complete_stores_images_and_done_together(db):
    t = queue_task(db, count=2)
    claimed = claim(db)
    assert db.complete(claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    done = db.get(t.id)
    assert done.status is Status.DONE and done.step == done.steps and done.image_index == 1  # type: ignore[union-attr]
    image = db.fetch_image(t.id, 1)
    assert image is not None and (image.idx, image.seed, image.data) == (1, 8, b"img1")
    assert db.generation_spans() == [(1.0, 2.0), (1.0, 2.0)]


def test_a_failing_image_write_leaves_the_task_running_and_the_connection_usable(db):
    # On PostgreSQL the image rows go out with the COMMIT: their error surfaces there, and must undo the lot.
    t = queue_task(db, count=2)
    claimed = claim(db)
    twice = [images_for(t)[0], images_for(t)[0]]  # the same image index twice breaks the primary key
    with pytest.raises(store.Conflict):
        db.complete(claimed.id, "w", twice)  # type: ignore[union-attr]
    assert not db.session.in_transaction
    assert db.get(t.id).status is Status.PROCESSING and db.fetch_image(t.id, 0) is None
    assert db.complete(claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    assert db.get(t.id).status is Status.DONE


@pytest.mark.parametrize("write", ["lone", "completion"])
def test_a_write_that_could_not_reach_the_server_leaves_no_transaction_behind(db, monkeypatch, write):
    # Otherwise its BEGIN and the write lock would ride with the next statement, in a transaction nobody ends,
    # and every other writer would wait for that lock forever.
    if not db.capabilities.notifies:
        pytest.skip("PostgreSQL sessions only")

    t = queue_task(db)
    claimed = claim(db)
    real, failures = db.session.session, [1]

    def down():
        if failures:
            failures.pop()
            raise store.StoreError("cannot reach PostgreSQL", "io")
        return real()

    monkeypatch.setattr(db.session, "session", down)
    with pytest.raises(store.StoreError):
        if write == "lone":
            db.record_progress(t.id, "w", 0, 1, 1.0)
        else:
            db.complete(claimed.id, "w", images_for(t))  # type: ignore[union-attr]
    assert db.get(t.id).status is Status.PROCESSING  # the next statement, on a session that works
    assert real().info.transaction_status.name == "IDLE", "a transaction was left open"


def test_writes_left_for_the_commit_vanish_with_a_rollback(db):
    t = queue_task(db)
    change = Query("change_prompt", "A test's write.", "UPDATE tasks SET prompt = 'changed' WHERE id = :id", writes=True)
    if db.capabilities.notifies:
        change = Query(change.name, change.description, "UPDATE tasks SET prompt = 'changed' WHERE id = %(id)s", True)
    with pytest.raises(RuntimeError), db.session.transaction():
        db.session.later(change, {"id": t.id})
        raise RuntimeError("the block fails after its write")
    assert db.get(t.id).prompt == t.prompt
    with db.session.transaction():
        db.session.later(change, {"id": t.id})
    assert db.get(t.id).prompt == "changed"


def test_timings_accumulate_per_model_size_and_kind(db):
    db.record_timings("schnell", 512, 768, [Timing("step", (0.1, 0.3)), Timing("encode", (0.01,))], now=5.0)
    db.record_timings("schnell", 512, 768, [Timing("step", (0.2,)), Timing("after", ())], now=6.0)
    stats = {s.kind: s for s in db.timing_stats()}
    assert set(stats) == {"step", "encode"}  # an empty timing writes nothing
    assert stats["step"].n == 3 and stats["step"].total == pytest.approx(0.6)
    assert db.timing_version() == (6.0, 2)


def test_image_delete_waits_for_every_image(db):
    t = queue_task(db, count=2)
    db.complete(claim(db).id, "w", images_for(t))  # type: ignore[union-attr]
    assert not db.mark_served(t.id, 0, True)
    assert db.get(t.id) is not None
    assert db.mark_served(t.id, 1, True)
    assert db.get(t.id) is None
    assert db.fetch_image(t.id, 0) is None and db.generation_spans() == []  # cascade


def test_release_puts_the_task_back_without_counting_the_attempt(db):
    t = queue_task(db)
    claim(db)
    assert db.release(t.id, "w")
    row = db.get(t.id)
    assert (row.status, row.attempts, row.worker_id) == (Status.WAITING, 0, None)  # type: ignore[union-attr]


def test_the_change_counter_moves_when_a_task_leaves_other_than_by_a_claim_or_comes_back(db):
    first, second, third = queue_task(db), queue_task(db), queue_task(db)
    before = db.queue_changes()
    queue_task(db)  # a fresh submit: the forecast reads it past its snapshot
    assert claim(db).id == first.id  # type: ignore[union-attr]
    assert db.queue_changes() == before  # a claim takes the front, which the snapshot corrects for
    assert db.release(first.id, "w")
    assert db.queue_changes() == before + 1  # back in the queue
    assert db.cancel_or_delete(third.id) is Removal.CANCELED
    assert db.queue_changes() == before + 2  # gone from the middle
    assert db.cancel_or_delete(second.id) is Removal.CANCELED
    assert db.cancel_or_delete(second.id) is Removal.DELETED
    assert db.queue_changes() == before + 3  # a canceled task's delete leaves no waiting set behind


def test_a_task_counts_its_input_images_so_a_claim_says_whether_to_read_them(db):
    images = (InputImage("image", "image/png", 8, 8, b"png"), InputImage("mask", "image/png", 8, 8, b"mask"))
    with_inputs = db.submit(new_task(inputs=images))
    plain = queue_task(db)
    assert (with_inputs.input_count, plain.input_count) == (2, 0)
    assert claim(db).input_count == 2 and set(db.inputs(with_inputs.id)) == {"image", "mask"}
    assert claim(db).input_count == 0 and db.inputs(plain.id) == {}


def test_preparing_the_claims_changes_nothing_and_leaves_them_prepared_on_postgresql(db):
    waiting = queue_task(db)
    changes, events = db.queue_changes(), db.last_event_id()
    db.prepare_claims("w", "synthetic", waiting.model)  # claims it for real, and rolls that back
    assert db.get(waiting.id) == waiting
    assert (db.queue_changes(), db.last_event_id()) == (changes, events)
    assert db.claim_next("w", waiting.model, "synthetic").id == waiting.id
    if db.capabilities.notifies:
        prepared = [row[0] for row in db.session.session().execute("SELECT statement FROM pg_prepared_statements")]
        assert any("SKIP LOCKED" in text for text in prepared) and any("task_inputs" in text for text in prepared)


def test_cancel_then_delete(db):
    t = queue_task(db)
    assert db.cancel_or_delete(t.id) is Removal.CANCELED
    assert claim(db) is None  # a canceled task never starts
    assert db.cancel_or_delete(t.id) is Removal.DELETED
    assert db.cancel_or_delete(t.id) is None


def test_listing_and_counts(db):
    waiting = [queue_task(db, prompt=f"w{i}", priority=int(i == 2)) for i in range(3)]
    running = claim(db)
    page, total = db.list_tasks(None, 10, 0)
    assert total == 3 and [t.id for t in page] == [running.id, waiting[0].id, waiting[1].id]  # type: ignore[union-attr]
    only_waiting, total = db.list_tasks(Status.WAITING, 1, 1)
    assert total == 2 and [t.id for t in only_waiting] == [waiting[1].id]
    counts = db.status_counts()
    assert counts == {Status.WAITING: 2, Status.PROCESSING: 1, Status.DONE: 0, Status.ERROR: 0, Status.CANCELED: 0}
    assert [t.id for t in db.running_tasks()] == [running.id]  # type: ignore[union-attr]


def test_live_workers_are_typed_and_stopped_ones_are_not_live(db):
    first = db.register_worker("synthetic", "schnell", None)
    second = db.register_worker("mflux", "dev", 8)
    db.stop_worker(first)
    live = db.live_workers(stale_after=60)
    assert [(w.id, w.engine, w.model, w.quantize) for w in live] == [(second, "mflux", "dev", 8)]
    assert db.worker_count() == 2


def test_recovery_requeues_a_dead_pid_at_once_and_fails_past_the_attempt_limit(db):
    t = queue_task(db)
    for attempt in range(1, 4):
        worker = db.register_worker("synthetic", "schnell", None, pid=999_999)  # no such process
        claimed = claim(db, worker)
        assert claimed.attempts == attempt  # type: ignore[union-attr]
        outcome = db.recover_orphans(stale_after=60, max_attempts=3, alive=lambda pid: False)
        assert outcome == [Recovery(t.id, Status.WAITING if attempt < 3 else Status.ERROR)]
    row = db.get(t.id)
    assert row.status is Status.ERROR and "gave up after 3 attempts" in row.error  # type: ignore[union-attr, operator]


def test_recovery_leaves_live_workers_alone_and_takes_stale_ones(db):
    t = queue_task(db)
    remote = db.register_worker("synthetic", "schnell", None, pid=1)
    claim(db, remote)
    assert db.recover_orphans(stale_after=5, max_attempts=3, alive=lambda pid: True) == []
    db.heartbeat(remote, now=time.time() - 10)
    assert db.recover_orphans(stale_after=5, max_attempts=3, alive=lambda pid: True) == [
        Recovery(t.id, Status.WAITING)]


def test_every_named_query_of_the_backend_has_a_description_and_compiles(db):
    queries = db._queries
    assert {"insert_task", "claim_next", "waiting_queue"} <= set(queries)
    for query in queries.values():
        assert query.description and not query.description.startswith("--"), query.name
        assert query.sql and not query.sql.endswith(";")
        if db.capabilities.notifies:  # psycopg's placeholders
            names, positions = re.findall(r"%\((\w+)\)s", query.sql), query.sql.count("%s")
        else:
            names, positions = re.findall(r"(?<!:):(\w+)", query.sql), query.sql.count("?")
        db.session.execute("EXPLAIN " + query.sql, {n: None for n in names} if names else (None,) * positions)


def test_the_query_loader_refuses_a_query_without_description_or_defined_twice():
    parsed = parse_queries("-- name: a\n-- Says what a does.\nSELECT 1;\n\n-- name: b\n-- And b.\nSELECT 2;\n")
    assert [(q.name, q.description, q.sql) for q in parsed.values()] == [("a", "Says what a does.", "SELECT 1"),
                                                                          ("b", "And b.", "SELECT 2")]
    with pytest.raises(ValueError, match="'a' has no description"):
        parse_queries("-- name: a\nSELECT 1;\n")
    with pytest.raises(ValueError, match="defined twice"):
        parse_queries("-- name: a\n-- x\nSELECT 1;\n-- name: a\n-- y\nSELECT 2;\n")


def test_every_change_of_a_task_appends_an_event_and_previews_belong_to_the_running_worker(db):
    import json

    start = db.last_event_id()
    task = queue_task(db, steps=2, count=1)
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed.id == task.id
    assert db.record_progress(task.id, "w", 0, 1, 100.0)
    assert not db.save_preview(task.id, "someone-else", 1, 1, "image/jpeg", b"x")
    assert db.save_preview(task.id, "w", 1, 1, "image/jpeg", b"first")
    assert db.save_preview(task.id, "w", 1, 2, "image/jpeg", b"second")
    assert db.preview(task.id).data == b"second"
    assert db.complete(task.id, "w", images_for(claimed))
    assert db.preview(task.id) is None, "a preview shows a running task only"
    db.cancel_or_delete(task.id)
    events = db.events_after(start)
    assert [(e.kind, json.loads(e.data).get("status")) for e in events] == [
        ("status", "waiting"), ("status", "processing"), ("progress", None), ("preview", None), ("preview", None),
        ("done", "done"), ("deleted", "deleted")]
    assert json.loads(events[2].data) == {"image": 1, "count": 1, "step": 1, "steps": 2}
    assert [e.id for e in events] == sorted({e.id for e in events}), "ids only grow"
    assert db.events_after(events[3].id, task_id=task.id)[0].id == events[4].id
    assert db.last_event_id() == events[-1].id


def test_waiting_tasks_of_every_model_since_a_sequence_number(db):
    older = queue_task(db)
    newer = [queue_task(db, model=model) for model in ("schnell", "dev", "schnell")]
    db.claim_next("w", "dev", "synthetic")  # no longer waiting
    found = db.all_waiting_since(older.seq)
    assert sorted(entry.seq for entry in found) == [newer[0].seq, newer[2].seq]
    assert {entry.model for entry in found} == {"schnell"}


def test_timings_keep_their_squares_and_finished_tasks_their_forecasts(db):
    db.record_timings("schnell", 512, 512, [Timing("step", (1.0, 2.0, 3.0))])
    [stat] = [s for s in db.timing_stats() if s.kind == "step"]
    assert (stat.n, stat.total, stat.total_sq) == (3, 6.0, 14.0)
    for n in range(3):
        t = queue_task(db, prompt=f"t{n}")
        db.set_forecast(t.id, 6.0, (4.0, 8.0))
        claimed = db.claim_next("w", "schnell", "synthetic")
        assert claimed is not None and db.complete(claimed.id, "w", images_for(t))
    unranged = queue_task(db, prompt="no range")
    db.set_forecast(unranged.id, 6.0)  # an older API's submit: no range, but a forecast to learn from
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and db.complete(claimed.id, "w", images_for(unranged))
    unforecast = queue_task(db, prompt="no forecast")  # no worker was alive: nothing recorded, nothing learned
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and db.complete(claimed.id, "w", images_for(unforecast))
    outcomes = db.recent_forecasts(10)
    assert [o.point for o in outcomes] == [6.0] * 4
    assert sorted(o.high for o in outcomes if o.high is not None) == [8.0] * 3, "the model range's top, where known"
    assert sum(o.high is None for o in outcomes) == 1
    assert all(o.took >= 0 for o in outcomes) and len(db.recent_forecasts(2)) == 2


def test_a_done_task_queues_its_upscales_with_it_and_a_canceled_one_none(db):
    after = UpscaleAfter("dev-controlnet-upscaler", 1024, 768, 20)
    task = queue_task(db, prompt="enlarge me", count=2, priority=1, then_upscale=after.text(), callback_url="http://x/")
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and UpscaleAfter.of(claimed.then_upscale) == after
    images = images_for(claimed)
    assert db.upscale_tasks_of(task.id) == []
    assert db.complete(claimed.id, "w", images, upscales_after(claimed, images))
    ids = db.upscale_tasks_of(task.id)
    assert len(ids) == 2
    for index, task_id in enumerate(ids):
        upscale = db.get(task_id)
        assert upscale is not None and upscale.status is Status.WAITING
        assert (upscale.model, upscale.width, upscale.height, upscale.steps) == ("dev-controlnet-upscaler", 1024, 768, 20)
        assert (upscale.upscales_task, upscale.upscales_index, upscale.seed) == (task.id, index, task.seed + index)
        assert (upscale.priority, upscale.prompt, upscale.callback_url, upscale.count) == (1, "enlarge me", "http://x/", 1)
        assert upscale.then_upscale == "" and upscale.input_count == 1
        assert db.inputs(task_id)["image"].data == images[index].data, "the generated image, stored with it"
    # Canceled while it ran: the worker's images are dropped, and no upscale is queued.
    canceled = queue_task(db, then_upscale=after.text())
    claimed = db.claim_next("w", "schnell", "synthetic")
    assert claimed is not None and db.cancel_or_delete(canceled.id) is not None
    assert not db.complete(claimed.id, "w", images_for(claimed), upscales_after(claimed, images_for(claimed)))
    assert db.upscale_tasks_of(canceled.id) == []
    assert upscales_after(db.get(ids[0]), images) == [], "an upscale queues nothing after it"

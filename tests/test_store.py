"""The store contract: claim order, atomic claims across processes, guarded writes, cancel, recovery."""

from __future__ import annotations

import multiprocessing
import time

from mflux_server import db, store


def task(**overrides) -> dict:
    base = {"prompt": "p", "model": "schnell", "width": 512, "height": 512, "steps": 4, "guidance": 3.5,
            "seed": 7, "count": 1, "format": "PNG", "quality": 90, "priority": 0}
    base.update(overrides)
    return base


def test_claim_order_is_priority_then_fifo(conn):
    a = store.submit(conn, task(prompt="a"))
    b = store.submit(conn, task(prompt="b", priority=1))
    c = store.submit(conn, task(prompt="c"))
    d = store.submit(conn, task(prompt="d", priority=1))
    order = [store.claim_next(conn, "w", "schnell", "synthetic")["id"] for _ in range(4)]
    assert order == [b["id"], d["id"], a["id"], c["id"]]
    assert store.claim_next(conn, "w", "schnell", "synthetic") is None


def test_claim_only_takes_the_workers_model(conn):
    dev = store.submit(conn, task(model="dev"))
    assert store.claim_next(conn, "w", "schnell", "synthetic") is None
    assert store.claim_next(conn, "w", "dev", "synthetic")["id"] == dev["id"]


def test_ids_are_unguessable_and_unique(conn):
    ids = {store.submit(conn, task())["id"] for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    seqs = [r[0] for r in conn.execute("SELECT seq FROM tasks ORDER BY seq")]
    store.delete(conn, store.submit(conn, task())["id"])
    newest = store.submit(conn, task())
    assert newest["seq"] > max(seqs) + 1  # AUTOINCREMENT: a deleted sequence number is never reused


def test_a_worker_that_lost_its_task_cannot_overwrite_it(conn):
    t = store.submit(conn, task())
    store.claim_next(conn, "w1", "schnell", "synthetic")
    assert store.cancel_or_delete(conn, t["id"]) == "canceled"
    assert not store.record_progress(conn, t["id"], "w1", 0, 2, time.time())
    image = store.StoredImage(0, 7, "image/png", b"x", 0.0, 1.0)
    assert not store.complete(conn, store.get(conn, t["id"]), "w1", [image])
    assert not store.fail(conn, t["id"], "w1", "boom")
    row = store.get(conn, t["id"])
    assert row["status"] == "canceled"
    assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


def test_complete_stores_images_and_done_together(conn):
    t = store.submit(conn, task(count=2))
    claimed = store.claim_next(conn, "w", "schnell", "synthetic")
    images = [store.StoredImage(i, 7 + i, "image/png", b"img%d" % i, 1.0, 2.0) for i in range(2)]
    assert store.complete(conn, claimed, "w", images)
    assert store.get(conn, t["id"])["status"] == "done"
    assert store.fetch_image(conn, t["id"], 1)["data"] == b"img1"


def test_timings_accumulate_per_model_size_and_kind(conn):
    shape = {"model": "schnell", "width": 512, "height": 768}
    store.record_timings(conn, shape, [store.Timing("step", [0.1, 0.3]), store.Timing("encode", [0.01])])
    store.record_timings(conn, shape, [store.Timing("step", [0.2])])
    row = conn.execute("SELECT n, total, total_sq FROM timing_stats WHERE kind='step'").fetchone()
    assert row["n"] == 3 and abs(row["total"] - 0.6) < 1e-9 and abs(row["total_sq"] - 0.14) < 1e-9
    assert conn.execute("SELECT COUNT(*) FROM timing_stats").fetchone()[0] == 2


def test_image_delete_waits_for_every_image(conn):
    t = store.submit(conn, task(count=2))
    claimed = store.claim_next(conn, "w", "schnell", "synthetic")
    store.complete(conn, claimed, "w", [store.StoredImage(i, 7, "image/png", b"i", 1, 2) for i in range(2)])
    assert not store.mark_served(conn, t["id"], 0, True)
    assert store.get(conn, t["id"]) is not None
    assert store.mark_served(conn, t["id"], 1, True)
    assert store.get(conn, t["id"]) is None
    assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0  # cascade


def test_release_puts_the_task_back_without_counting_the_attempt(conn):
    t = store.submit(conn, task())
    store.claim_next(conn, "w", "schnell", "synthetic")
    assert store.release(conn, t["id"], "w")
    row = store.get(conn, t["id"])
    assert (row["status"], row["attempts"], row["worker_id"]) == ("waiting", 0, None)


def test_cancel_then_delete(conn):
    t = store.submit(conn, task())
    assert store.cancel_or_delete(conn, t["id"]) == "canceled"
    assert store.claim_next(conn, "w", "schnell", "synthetic") is None  # a canceled task never starts
    assert store.cancel_or_delete(conn, t["id"]) == "deleted"
    assert store.cancel_or_delete(conn, t["id"]) is None


def _register(conn, worker_id: str, pid: int, heartbeat: float) -> None:
    conn.execute("INSERT INTO workers VALUES (?, ?, ?, 'synthetic', 'schnell', NULL, 0, ?, NULL)",
                 (worker_id, __import__("socket").gethostname(), pid, heartbeat))


def test_recovery_requeues_a_dead_pid_at_once_and_fails_past_the_attempt_limit(conn):
    t = store.submit(conn, task())
    for attempt in range(1, 4):
        worker = f"dead{attempt}"
        _register(conn, worker, 999_999, time.time())  # fresh heartbeat, but the pid does not exist
        claimed = store.claim_next(conn, worker, "schnell", "synthetic")
        assert claimed["attempts"] == attempt
        outcome = store.recover_orphans(conn, stale_after=60, max_attempts=3, alive=lambda pid: False)
        assert outcome == [(t["id"], "waiting" if attempt < 3 else "error")]
    row = store.get(conn, t["id"])
    assert row["status"] == "error" and "gave up after 3 attempts" in row["error"]


def test_recovery_leaves_live_workers_alone_and_takes_stale_ones(conn):
    t = store.submit(conn, task())
    _register(conn, "remote", 1, time.time())
    store.claim_next(conn, "remote", "schnell", "synthetic")
    assert store.recover_orphans(conn, stale_after=5, max_attempts=3, alive=lambda pid: True) == []
    conn.execute("UPDATE workers SET heartbeat_at = ?", (time.time() - 10,))
    assert store.recover_orphans(conn, stale_after=5, max_attempts=3, alive=lambda pid: True) == [(t["id"], "waiting")]


def _claim_all(path: str, worker: str, out, ready, go) -> None:
    conn = db.connect(path)
    ready.put(worker)
    go.wait()
    got = []
    while (row := store.claim_next(conn, worker, "schnell", "synthetic")) is not None:
        got.append(row["id"])
        time.sleep(0.001)  # a real worker generates between claims; this lets the others in
    out.put(got)


def test_concurrent_claims_from_several_processes_never_share_a_task(db_path, conn):
    ids = {store.submit(conn, task())["id"] for _ in range(300)}
    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_all, args=(db_path, f"w{i}", out, ready, go)) for i in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()  # all four start claiming at the same moment
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == ids
    assert sum(1 for r in results if r) >= 2, "the claims should really have been spread over processes"
    owners = conn.execute("SELECT COUNT(DISTINCT worker_id) FROM tasks").fetchone()[0]
    assert owners == sum(1 for r in results if r)

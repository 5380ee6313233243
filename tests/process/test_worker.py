"""The worker as a real process: order, progress, cancel, SIGKILL recovery, SIGTERM, attempt limit, engine errors."""

from __future__ import annotations

import signal
import threading

from mflux_server import store
from mflux_server.config import Settings
from tests.conftest import task_row, wait_for
from worker.runner import Runner


def task(**overrides) -> dict:
    base = {"prompt": "p", "model": "schnell", "width": 256, "height": 256, "steps": 4, "guidance": 3.5,
            "seed": 7, "count": 1, "format": "PNG", "quality": 90, "priority": 0}
    base.update(overrides)
    return base


def status(db_path: str, task_id: str) -> str:
    return task_row(db_path, task_id)["status"]


def test_worker_runs_in_priority_order_and_stores_images(conn, db_path, processes):
    a = store.submit(conn, task(prompt="a"))
    b = store.submit(conn, task(prompt="b", count=2, format="JPEG"))
    c = store.submit(conn, task(prompt="c", priority=1))
    processes.worker()
    wait_for(lambda: all(status(db_path, t["id"]) == "done" for t in (a, b, c)), what="all tasks done")
    started = sorted((task_row(db_path, t["id"])["started_at"], t["prompt"]) for t in (a, b, c))
    assert [p for _, p in started] == ["c", "a", "b"]
    images = conn.execute("SELECT idx, seed, mime FROM images WHERE task_id = ? ORDER BY idx", (b["id"],)).fetchall()
    assert [tuple(r) for r in images] == [(0, 7, "image/jpeg"), (1, 8, "image/jpeg")]
    # every step and fixed cost of the 4 images is measured (the progress thread writes them within ~20 ms)
    expected = {"step": 4 * 4, "before": 4, "after": 4, "encode": 4}
    wait_for(lambda: {r[0]: r[1] for r in conn.execute("SELECT kind, SUM(n) FROM timing_stats GROUP BY kind")} == expected,
             timeout=5, what="all timings recorded")


def test_timings_are_recorded_while_the_first_task_is_still_running(conn, db_path, processes):
    t = store.submit(conn, task(steps=40))
    processes.worker(speed=1.0)
    wait_for(lambda: conn.execute("SELECT COALESCE(SUM(n), 0) FROM timing_stats WHERE kind = 'step'").fetchone()[0] >= 3,
             what="step timings of the running task")
    assert status(db_path, t["id"]) == "processing"


def test_progress_is_visible_while_running(conn, db_path, processes):
    t = store.submit(conn, task(steps=12, count=2))
    processes.worker(speed=1.0)
    seen = set()

    def finished() -> bool:
        row = task_row(db_path, t["id"])
        if row["status"] == "processing":
            seen.add((row["image_index"], row["step"]))
        return row["status"] == "done"

    wait_for(finished, timeout=30, interval=0.01, what="the task to finish")
    assert {i for i, _ in seen} == {0, 1}, seen
    assert len({s for _, s in seen}) >= 4, seen


def test_cancel_waiting_never_starts_and_running_stops_at_a_step(conn, db_path, processes):
    running = store.submit(conn, task(steps=200))
    waiting = store.submit(conn, task())
    after = store.submit(conn, task())
    processes.worker(speed=1.0)
    wait_for(lambda: (task_row(db_path, running["id"])["step"] or 0) >= 2, what="the first task to be mid-way")
    assert store.cancel_or_delete(conn, waiting["id"]) == "canceled"
    assert store.cancel_or_delete(conn, running["id"]) == "canceled"
    wait_for(lambda: status(db_path, after["id"]) == "done", timeout=10, what="the worker to move on")
    assert task_row(db_path, waiting["id"])["started_at"] is None
    row = task_row(db_path, running["id"])
    assert row["status"] == "canceled" and row["step"] < 50  # stopped long before its 200 steps
    assert conn.execute("SELECT COUNT(*) FROM images WHERE task_id = ?", (running["id"],)).fetchone()[0] == 0


def test_sigkill_mid_task_reruns_on_the_next_worker_start(conn, db_path, processes):
    t = store.submit(conn, task(steps=30))
    first = processes.worker(speed=1.0)
    wait_for(lambda: (task_row(db_path, t["id"])["step"] or 0) >= 1, what="the task to be running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert status(db_path, t["id"]) == "processing"  # the dead worker still holds it
    processes.worker(speed=20.0)
    wait_for(lambda: status(db_path, t["id"]) == "done", what="the task to be rerun")
    assert task_row(db_path, t["id"])["attempts"] == 2


def test_a_running_worker_takes_over_from_a_killed_one(conn, db_path, processes):
    t = store.submit(conn, task(steps=30))
    doomed = processes.worker(speed=1.0)
    wait_for(lambda: status(db_path, t["id"]) == "processing", what="the task to start")
    processes.worker(speed=20.0)  # idle, heartbeating; its recovery pass notices the dead pid
    doomed.send_signal(signal.SIGKILL)
    wait_for(lambda: status(db_path, t["id"]) == "done", timeout=20, what="the survivor to finish the task")


def test_attempt_limit_ends_a_task_that_keeps_killing_workers(conn, db_path, processes):
    t = store.submit(conn, task(steps=40))
    for _ in range(2):
        proc = processes.worker("--max-attempts", "2", speed=1.0)
        wait_for(lambda: (task_row(db_path, t["id"])["step"] or 0) >= 1, what="the task to be running")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    processes.worker("--max-attempts", "2")
    wait_for(lambda: status(db_path, t["id"]) == "error", what="the task to be given up")
    row = task_row(db_path, t["id"])
    assert "gave up after 2 attempts" in row["error"]


def test_sigterm_puts_the_task_back_and_exits_zero(conn, db_path, processes):
    t = store.submit(conn, task(steps=200))
    proc = processes.worker(speed=1.0)
    wait_for(lambda: (task_row(db_path, t["id"])["step"] or 0) >= 1, what="the task to be running")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    row = task_row(db_path, t["id"])
    assert (row["status"], row["attempts"], row["worker_id"]) == ("waiting", 0, None)
    assert conn.execute("SELECT stopped_at FROM workers").fetchone()[0] is not None
    assert "SIGTERM received" in processes.log(proc)


def test_sigterm_while_idle_exits_zero_promptly(processes):
    proc = processes.worker()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0


class FailingEngine:
    """An engine double whose model crashes on some prompts (a real crash needs real weights)."""

    name = "synthetic"
    model = "schnell"
    quantize = None

    def generate(self, job, reporter):
        reporter.loop_started()
        reporter.step(1, job.steps)
        if "crash" in job.prompt:
            raise MemoryError("out of GPU memory")
        from worker.engines.synthetic import draw

        return draw(job)


def test_an_engine_exception_fails_that_task_and_the_worker_goes_on(conn, db_path):
    bad = store.submit(conn, task(prompt="please crash"))
    good = store.submit(conn, task(prompt="fine"))
    runner = Runner(Settings(db=db_path, heartbeat_interval=0.2), FailingEngine())
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: status(db_path, good["id"]) == "done", what="the next task to finish")
    finally:
        runner.stop()
        thread.join(timeout=10)
    row = task_row(db_path, bad["id"])
    assert row["status"] == "error" and row["error"] == "synthetic engine failed: MemoryError: out of GPU memory"
    assert not thread.is_alive()


def test_worker_refuses_an_unknown_model(processes):
    proc = processes.worker("--model", "flux-pro", wait=False)
    assert proc.wait(timeout=20) == 1
    assert "unknown model 'flux-pro'" in processes.log(proc)

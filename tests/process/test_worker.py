"""The worker as a real process: order, progress, cancel, SIGKILL recovery, SIGTERM, attempt limit, engine errors."""

from __future__ import annotations

import signal
import threading

from mflux_server.core.rows import Removal, Status, Task
from mflux_server.core.settings import Settings
from mflux_server.testing import wait_for
from mflux_server.worker.engines.synthetic import draw
from mflux_server.worker.supervisor import Supervisor
from tests.conftest import queue_task, reread, status_of


def row(db_path: str, task_id: str) -> Task:
    found = reread(db_path, task_id)
    assert found is not None
    return found


def kinds_measured(db) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stat in db.timing_stats():
        counts[stat.kind] = counts.get(stat.kind, 0) + stat.n
    return counts


def image_count(db, task: Task) -> int:
    return sum(1 for i in range(task.count) if db.fetch_image(task.id, i) is not None)


def test_worker_runs_in_priority_order_and_stores_images(db, db_path, processes):
    a = queue_task(db, width=256, height=256, prompt="a")
    b = queue_task(db, width=256, height=256, prompt="b", count=2, format="JPEG")
    c = queue_task(db, width=256, height=256, prompt="c", priority=1)
    processes.worker()
    wait_for(lambda: all(status_of(db_path, t.id) == "done" for t in (a, b, c)), what="all tasks done")
    started = sorted((row(db_path, t.id).started_at, t.prompt) for t in (a, b, c))
    assert [p for _, p in started] == ["c", "a", "b"]
    images = [db.fetch_image(b.id, i) for i in range(2)]
    assert [(i.idx, i.seed, i.mime) for i in images if i] == [(0, 7, "image/jpeg"), (1, 8, "image/jpeg")]
    # every step and fixed cost of the 4 images is measured (the progress thread writes them within ~20 ms)
    expected = {"step": 4 * 4, "before": 4, "after": 4, "encode": 4}
    wait_for(lambda: kinds_measured(db) == expected,
             timeout=5, what="all timings recorded")


def test_timings_count_once_an_image_is_generated_not_while_it_might_still_fail(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=40, count=2)
    processes.worker(speed=1.0)
    wait_for(lambda: row(db_path, t.id).step >= 5, what="steps of the first image")
    assert kinds_measured(db) == {}, "a generation that has not finished could still fail"
    wait_for(lambda: row(db_path, t.id).image_index == 1, what="the second image started")
    wait_for(lambda: kinds_measured(db).get("step", 0) == 40, timeout=5, what="the first image's 40 steps")
    assert status_of(db_path, t.id) == "processing"


def test_progress_is_visible_while_running(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=12, count=2)
    processes.worker(speed=1.0)
    seen = set()

    def finished() -> bool:
        now = row(db_path, t.id)
        if now.status is Status.PROCESSING:
            seen.add((now.image_index, now.step))
        return now.status is Status.DONE

    wait_for(finished, timeout=30, interval=0.01, what="the task to finish")
    assert {i for i, _ in seen} == {0, 1}, seen
    assert len({s for _, s in seen}) >= 4, seen


def test_cancel_waiting_never_starts_and_running_stops_at_a_step(db, db_path, processes):
    running = queue_task(db, width=256, height=256, steps=200)
    waiting = queue_task(db, width=256, height=256)
    after = queue_task(db, width=256, height=256)
    processes.worker(speed=1.0)
    wait_for(lambda: (row(db_path, running.id).step or 0) >= 2, what="the first task to be mid-way")
    assert db.cancel_or_delete(waiting.id) is Removal.CANCELED
    assert db.cancel_or_delete(running.id) is Removal.CANCELED
    wait_for(lambda: status_of(db_path, after.id) == "done", timeout=10, what="the worker to move on")
    assert row(db_path, waiting.id).started_at is None
    stopped = row(db_path, running.id)
    assert stopped.status is Status.CANCELED and stopped.step < 50  # stopped long before its 200 steps
    assert image_count(db, stopped) == 0


def test_sigkill_mid_task_reruns_on_the_next_worker_start(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=30)
    first = processes.worker(speed=1.0)
    wait_for(lambda: (row(db_path, t.id).step or 0) >= 1, what="the task to be running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert status_of(db_path, t.id) == "processing"  # the dead worker still holds it
    processes.worker(speed=20.0)
    wait_for(lambda: status_of(db_path, t.id) == "done", what="the task to be rerun")
    assert row(db_path, t.id).attempts == 2


def test_a_running_worker_takes_over_from_a_killed_one(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=30)
    doomed = processes.worker(speed=1.0)
    wait_for(lambda: status_of(db_path, t.id) == "processing", what="the task to start")
    processes.worker(speed=20.0)  # idle, heartbeating; its recovery pass notices the dead pid
    doomed.send_signal(signal.SIGKILL)
    wait_for(lambda: status_of(db_path, t.id) == "done", timeout=20, what="the survivor to finish the task")


def test_attempt_limit_ends_a_task_that_keeps_killing_workers(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=40)
    for attempt in (1, 2):
        proc = processes.worker("--max-attempts", "2", speed=1.0)
        # This attempt's own step: the dead worker's last step stays on the row until the new one recovers it.
        wait_for(lambda attempt=attempt: (row(db_path, t.id).attempts, (row(db_path, t.id).step or 0) >= 1)
                 == (attempt, True), what=f"attempt {attempt} to be running")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    processes.worker("--max-attempts", "2")
    wait_for(lambda: status_of(db_path, t.id) == "error", what="the task to be given up")
    final = row(db_path, t.id)
    assert final.error and "gave up after 2 attempts" in final.error


def test_sigterm_puts_the_task_back_and_exits_zero(db, db_path, processes):
    t = queue_task(db, width=256, height=256, steps=200)
    proc = processes.worker(speed=1.0)
    wait_for(lambda: (row(db_path, t.id).step or 0) >= 1, what="the task to be running")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    final = row(db_path, t.id)
    assert (final.status, final.attempts, final.worker_id) == (Status.WAITING, 0, None)
    assert db.live_workers(stale_after=60) == []  # it said it stopped
    assert db.worker_count() == 1
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
    software = "a failing test engine"

    def use_loras(self, loras):
        assert loras == (), "these tasks ask for no LoRAs"

    def generate(self, job, reporter):
        reporter.loop_started()
        reporter.step(1, job.steps)
        if "crash" in job.prompt:
            raise MemoryError("out of GPU memory")
        return draw(job)


def test_an_engine_exception_fails_that_task_and_the_worker_goes_on(db, db_path):
    bad = queue_task(db, width=256, height=256, prompt="please crash")
    good = queue_task(db, width=256, height=256, prompt="fine")
    supervisor = Supervisor(Settings(db=db_path, heartbeat_interval=0.2), FailingEngine())
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        wait_for(lambda: status_of(db_path, good.id) == "done", what="the next task to finish")
    finally:
        supervisor.stop()
        thread.join(timeout=10)
    failed = row(db_path, bad.id)
    assert failed.status is Status.ERROR and failed.error == "synthetic engine failed: MemoryError: out of GPU memory"
    assert not thread.is_alive()


def test_worker_refuses_an_unknown_model(processes):
    proc = processes.worker("--model", "flux-pro", wait=False)
    assert proc.wait(timeout=20) == 1
    assert "unknown model 'flux-pro'" in processes.log(proc)


def test_an_input_image_damaged_in_the_store_fails_its_task_and_the_worker_goes_on(db, db_path, processes):
    from mflux_server.core.rows import InputImage

    damaged = queue_task(db, width=256, height=256, prompt="from a broken file", model="dev", image_strength=0.5,
                         inputs=(InputImage("image", "image/png", 256, 256, b"\x89PNG\r\n\x1a\n not a png any more"),))
    good = queue_task(db, width=256, height=256, prompt="fine", model="dev")
    processes.worker("--model", "dev")
    wait_for(lambda: status_of(db_path, good.id) == "done", what="the next task to finish")
    failed = row(db_path, damaged.id)
    assert failed.status is Status.ERROR and failed.error.startswith("its input images could not be read: "), failed.error

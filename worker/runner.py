"""The worker loop: claim, generate, hand off to encoding and storage; heartbeats, progress, recovery, signals."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from typing import Any

from PIL import Image

from mflux_server import db, store
from mflux_server.config import Settings
from worker.encoding import encode
from worker.engines.base import Engine, Job

log = logging.getLogger("mflux_worker")

# Idle claim attempts happen on any database change, and at least this often regardless.
IDLE_RECHECK_SECONDS = 1.0
# How often the progress thread publishes the latest step and checks whether the task was taken away.
PROGRESS_INTERVAL = 0.02
# Generated images waiting for the encoder; beyond this the GPU waits, which bounds memory.
OUTBOX_IMAGES = 4


class TaskStopped(Exception):
    """Raised from a step callback to stop generating the current task."""


class TaskTaken(TaskStopped):
    """The task was canceled, or recovered by someone else, while this worker ran it."""


class ShutdownRequested(TaskStopped):
    """SIGTERM or SIGINT: stop at this step boundary and put the task back."""


class Reporter:
    """Receives an engine's loop events for one image: times them, publishes progress, and stops on request."""

    def __init__(self, runner: Runner, task: dict[str, Any], index: int):
        self.runner = runner
        self.task = task
        self.index = index
        self.started = self.last = time.perf_counter()
        self.looping = False
        runner.progress = (task["id"], index, 0, time.time())

    def loop_started(self) -> None:
        """The engine finished its work before the denoising loop."""
        now = time.perf_counter()
        self.runner.measured(self.task, "before", now - self.started)
        self.last, self.looping = now, True
        self.runner.check(self.task["id"])

    def step(self, done: int, total: int) -> None:
        """A denoising step finished: record it, publish it, and stop here if asked to."""
        now = time.perf_counter()
        if not self.looping:  # an engine that never reported the loop's start: count that time as 'before'
            self.loop_started()
        self.runner.measured(self.task, "step", now - self.last)
        self.last = now
        self.runner.progress = (self.task["id"], self.index, done, time.time())
        self.runner.check(self.task["id"])

    def after_seconds(self) -> float:
        """Seconds from the last step until the engine returned the image."""
        return time.perf_counter() - self.last


class Runner:
    """One worker: holds the engine, runs tasks one at a time, never loses one."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.conn = db.open_database(settings.db)
        self.worker_id = store.register_worker(self.conn, engine.name, engine.model, engine.quantize)
        self.stopping = threading.Event()
        self.progress: tuple[str, int, int, float] | None = None
        self.current: str | None = None
        self.taken: set[str] = set()
        # (model, width, height, kind, seconds) measured on the generation thread, written by the progress
        # thread, so the forecast learns this machine's speed from the first steps of the first task.
        self.timings: deque[tuple[str, int, int, str, float]] = deque()
        self.outbox: queue.Queue = queue.Queue(maxsize=OUTBOX_IMAGES)
        self._progress_stop = threading.Event()
        self._task_started = threading.Event()
        self._threads: list[threading.Thread] = []

    # The loop

    def run(self) -> int:
        """Recover orphans, then claim and run tasks until asked to stop; returns the exit code."""
        for task_id, outcome in store.recover_orphans(self.conn, self.settings.stale_after, self.settings.max_attempts):
            log.warning("recovered task %s from a dead worker: now %s", task_id, outcome)
        log.info("worker %s ready: engine=%s model=%s quantize=%s db=%s", self.worker_id, self.engine.name,
                 self.engine.model, self.engine.quantize, self.settings.db)
        self._start(self._progress_loop, "progress")
        self._start(self._store_loop, "store")
        handoff = None
        try:
            while not self.stopping.is_set():
                task = store.claim_next(self.conn, self.worker_id, self.engine.model, self.engine.name)
                if task is None:
                    if handoff is not None:
                        self.outbox.put(handoff)
                        handoff = None
                    self._wait_for_work()
                    continue
                previous, handoff = handoff, None  # run_task queues it, even if it fails
                handoff = self.run_task(task, previous)
        finally:
            if handoff is not None:
                self.outbox.put(handoff)
            self._shutdown()
        return 0

    def run_task(self, task: dict[str, Any], previous: tuple | None = None) -> tuple | None:
        """Generate a task's images and queue them for encoding; stop early on cancel, shutdown or error.

        Returns the last image's hand-off instead of queueing it; the caller passes it to the next task as
        `previous`, queued the moment that task's generation starts.
        """
        log.info("task %s: %d×%d, %d steps, %d image(s), attempt %d", task["id"], task["width"], task["height"],
                 task["steps"], task["count"], task["attempts"])
        self.current = task["id"]
        self._task_started.set()
        try:
            for index in range(task["count"]):
                job = Job(task["prompt"], task["seed"] + index, task["width"], task["height"], task["steps"],
                          task["guidance"])
                reporter = Reporter(self, task, index)
                started = time.time()
                if previous is not None:
                    # Only now: the encoder thread wakes and takes the GIL for a while, and between two
                    # generations that wait was most of the gap (bench/explanations.md).
                    self.outbox.put(previous)
                    previous = None
                try:
                    image = self.engine.generate(job, reporter)
                except TaskTaken:
                    log.info("task %s: canceled or taken over; stopped at a step boundary", task["id"])
                    self.outbox.put(("drop", task))
                    return
                except ShutdownRequested:
                    log.info("task %s: shutting down; the task goes back to the queue", task["id"])
                    self.outbox.put(("release", task))
                    return
                except Exception as exc:  # an engine failure fails this task, not the worker
                    log.exception("task %s: engine failed", task["id"])
                    self.outbox.put(("fail", task, f"{self.engine.name} engine failed: {type(exc).__name__}: {exc}"))
                    return
                handoff = ("image", task, index, image, started, time.time(), reporter.after_seconds())
                if index == task["count"] - 1:
                    return handoff
                self.outbox.put(handoff)
        finally:
            if previous is not None:  # not started after all: hand it off anyway
                self.outbox.put(previous)
            self.current = None
            self.progress = None

    def measured(self, task: dict[str, Any], kind: str, seconds: float) -> None:
        """Queue one measured duration for the timing stats."""
        self.timings.append((task["model"], task["width"], task["height"], kind, seconds))

    def check(self, task_id: str) -> None:
        """Raise at a step boundary when the worker is stopping or the task is no longer ours."""
        if self.stopping.is_set():
            raise ShutdownRequested()
        if task_id in self.taken:
            raise TaskTaken()

    def stop(self) -> None:
        """Ask the loop to stop at the next step boundary (signal handlers call this)."""
        self.stopping.set()

    def _wait_for_work(self) -> None:
        # PRAGMA data_version changes when another connection commits, so a new task wakes us within
        # one poll_interval without a query against the tasks table each time.
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        give_up = time.monotonic() + IDLE_RECHECK_SECONDS
        while not self.stopping.is_set() and time.monotonic() < give_up:
            time.sleep(self.settings.poll_interval)
            if self.conn.execute("PRAGMA data_version").fetchone()[0] != version:
                return

    # Background threads

    def _start(self, target, name: str) -> None:
        thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guarded(self, target):
        def run() -> None:
            conn = db.connect(self.settings.db)
            try:
                target(conn)
            except Exception:
                log.exception("%s thread crashed; stopping the worker", threading.current_thread().name)
                self.stopping.set()
            finally:
                conn.close()

        return run

    def _progress_loop(self, conn: sqlite3.Connection) -> None:
        """Publish progress, notice cancels, heartbeat and recover orphans, off the generation thread."""
        written = None
        beat_at = 0.0
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        while not self._progress_stop.is_set():
            # Idle, this thread sleeps until a task starts or a heartbeat is due: an idle worker costs ~nothing.
            if self.current is None:
                self._task_started.wait(max(self.settings.heartbeat_interval - (time.monotonic() - beat_at), 0.0))
                self._task_started.clear()
            else:
                time.sleep(PROGRESS_INTERVAL)
            current, latest = self.current, self.progress
            if latest is not None and latest != written:
                task_id, index, step, at = latest
                if not store.record_progress(conn, task_id, self.worker_id, index, step, at):
                    self.taken.add(task_id)
                written = latest
            now_version = conn.execute("PRAGMA data_version").fetchone()[0]
            if current and now_version != version and not store.still_mine(conn, current, self.worker_id):
                self.taken.add(current)
            version = now_version
            self._flush_timings(conn)
            if time.monotonic() - beat_at >= self.settings.heartbeat_interval:
                store.heartbeat(conn, self.worker_id)
                for task_id, outcome in store.recover_orphans(conn, self.settings.stale_after, self.settings.max_attempts):
                    log.warning("recovered task %s from a dead worker: now %s", task_id, outcome)
                beat_at = time.monotonic()

    def _flush_timings(self, conn: sqlite3.Connection) -> None:
        grouped: dict[tuple[str, int, int], dict[str, list[float]]] = {}
        while self.timings:
            model, width, height, kind, seconds = self.timings.popleft()
            grouped.setdefault((model, width, height), {}).setdefault(kind, []).append(seconds)
        for (model, width, height), kinds in grouped.items():
            shape = {"model": model, "width": width, "height": height}
            store.record_timings(conn, shape, [store.Timing(kind, seconds) for kind, seconds in kinds.items()])

    def _store_loop(self, conn: sqlite3.Connection) -> None:
        """Encode images and write outcomes in order, so the GPU goes straight on to the next task."""
        pending: dict[str, dict[str, Any]] = {}
        while True:
            message = self.outbox.get()
            if message is None:
                return
            kind, task = message[0], message[1]
            try:
                if kind == "image":
                    self._store_image(conn, pending, task, *message[2:])
                    continue
                pending.pop(task["id"], None)
                if kind == "fail":
                    store.fail(conn, task["id"], self.worker_id, message[2])
                elif kind == "release":
                    store.release(conn, task["id"], self.worker_id)
            except Exception as exc:  # encoding or storage failed: that task fails, the worker goes on
                log.exception("task %s: could not store the result", task["id"])
                pending.pop(task["id"], None)
                store.fail(conn, task["id"], self.worker_id, f"storing the image failed: {type(exc).__name__}: {exc}")

    def _store_image(self, conn: sqlite3.Connection, pending: dict, task: dict, index: int, image: Image.Image,
                     started: float, ended: float, after: float) -> None:
        images = pending.setdefault(task["id"], [])
        t0 = time.perf_counter()
        software = f"mflux-server {self.engine.name} engine, model {self.engine.model}"
        if self.engine.name == "synthetic":
            software += " (synthetic test image, not model output)"
        data, mime = encode(image, task["format"], task["quality"], software, task["seed"] + index)
        store.record_timings(conn, task, [store.Timing("after", [after]), store.Timing("encode", [time.perf_counter() - t0])])
        images.append(store.StoredImage(index, task["seed"] + index, mime, data, started, ended))
        if len(images) == task["count"]:
            del pending[task["id"]]
            if store.complete(conn, task, self.worker_id, images):
                log.info("task %s: done", task["id"])
            else:
                log.info("task %s: finished but no longer ours (canceled); images dropped", task["id"])

    def _shutdown(self) -> None:
        # Finish encoding and storing what was generated before exiting: that work is not lost.
        self.outbox.put(None)
        for thread in self._threads:
            if thread.name == "store":
                thread.join()
        self._progress_stop.set()
        self._task_started.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._flush_timings(self.conn)
        store.stop_worker(self.conn, self.worker_id)
        self.conn.close()
        log.info("worker %s stopped", self.worker_id)

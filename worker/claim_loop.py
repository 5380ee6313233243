"""The claim loop: on the generation thread, claim the next task, generate its images, hand them to the writer."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from mflux_server.core import store
from mflux_server.core.rows import Task
from mflux_server.core.settings import Settings
from mflux_server.worker.engines.base import Engine, Job
from mflux_server.worker.messages import (
    ImageGenerated,
    TaskDropped,
    TaskFailed,
    TaskReleased,
)
from mflux_server.worker.publisher import Measurement, Progress, ProgressPublisher
from mflux_server.worker.result_writer import ResultWriter

log = logging.getLogger("mflux_worker")

# Idle claim attempts happen on any database change, and at least this often regardless.
IDLE_RECHECK_SECONDS = 1.0


class TaskStopped(Exception):
    """Raised from a step callback to stop generating the current task."""


class TaskTaken(TaskStopped):
    """The task was canceled, or recovered by someone else, while this worker ran it."""


class ShutdownRequested(TaskStopped):
    """SIGTERM or SIGINT: stop at this step boundary and put the task back."""


class StepTimer:
    """The StepReporter of one image: times the engine's loop events, publishes progress, stops on request."""

    def __init__(self, task: Task, index: int, publisher: ProgressPublisher, stopping: threading.Event):
        self.task = task
        self.index = index
        self.publisher = publisher
        self.stopping = stopping
        self.started = self.last = time.perf_counter()
        self.looping = False
        publisher.publish(Progress(task.id, index, 0, time.time()))

    def loop_started(self) -> None:
        """The engine finished its work before the denoising loop."""
        now = time.perf_counter()
        self._measured("before", now - self.started)
        self.last, self.looping = now, True
        self._check()

    def step(self, done: int, total: int) -> None:
        """A denoising step finished: record it, publish it, and stop here if asked to."""
        now = time.perf_counter()
        if not self.looping:  # an engine that never reported the loop's start: count that time as 'before'
            self.loop_started()
        self._measured("step", now - self.last)
        self.last = now
        self.publisher.publish(Progress(self.task.id, self.index, done, time.time()))
        self._check()

    def after_seconds(self) -> float:
        """Seconds from the last step until the engine returned the image."""
        return time.perf_counter() - self.last

    def _measured(self, kind: str, seconds: float) -> None:
        self.publisher.measured(Measurement(self.task.model, self.task.width, self.task.height, kind, seconds))

    def _check(self) -> None:
        if self.stopping.is_set():
            raise ShutdownRequested()
        if self.publisher.taken(self.task.id):
            raise TaskTaken()


class ClaimLoop:
    """Claims tasks in order and generates them one at a time; never holds the GIL while the engine works."""

    def __init__(self, settings: Settings, engine: Engine, worker_id: str, conn: sqlite3.Connection,
                 publisher: ProgressPublisher, writer: ResultWriter, stopping: threading.Event):
        self.settings = settings
        self.engine = engine
        self.worker_id = worker_id
        self.conn = conn
        self.publisher = publisher
        self.writer = writer
        self.stopping = stopping

    def run(self) -> None:
        """Claim and run tasks until stopping is set; every generated image reaches the writer."""
        handoff: ImageGenerated | None = None
        try:
            while not self.stopping.is_set():
                task = store.claim_next(self.conn, self.worker_id, self.engine.model, self.engine.name)
                if task is None:
                    if handoff is not None:
                        self.writer.send(handoff)
                        handoff = None
                    self._wait_for_work()
                    continue
                previous, handoff = handoff, None  # run_task sends it, even if it fails
                handoff = self.run_task(task, previous)
        finally:
            if handoff is not None:
                self.writer.send(handoff)

    def run_task(self, task: Task, previous: ImageGenerated | None = None) -> ImageGenerated | None:
        """Generate a task's images and send them to the writer; stop early on cancel, shutdown or error.

        Returns the last image instead of sending it; the caller passes it to the next task as `previous`,
        sent the moment that task's generation starts.
        """
        log.info("task %s: %d×%d, %d steps, %d image(s), attempt %d", task.id, task.width, task.height, task.steps,
                 task.count, task.attempts)
        self.publisher.task_started(task.id)
        try:
            for index in range(task.count):
                job = Job(task.prompt, task.seed + index, task.width, task.height, task.steps, task.guidance)
                timer = StepTimer(task, index, self.publisher, self.stopping)
                started = time.time()
                if previous is not None:
                    # Only now: the writer thread wakes and takes the GIL for a while, and between two
                    # generations that wait was most of the gap (bench/explanations.md).
                    self.writer.send(previous)
                    previous = None
                try:
                    image = self.engine.generate(job, timer)
                except TaskTaken:
                    log.info("task %s: canceled or taken over; stopped at a step boundary", task.id)
                    self.writer.send(TaskDropped(task))
                    return None
                except ShutdownRequested:
                    log.info("task %s: shutting down; the task goes back to the queue", task.id)
                    self.writer.send(TaskReleased(task))
                    return None
                except Exception as exc:  # an engine failure fails this task, not the worker
                    log.exception("task %s: engine failed", task.id)
                    self.writer.send(TaskFailed(task, f"{self.engine.name} engine failed: {type(exc).__name__}: {exc}"))
                    return None
                done = ImageGenerated(task, index, image, started, time.time(), timer.after_seconds())
                if index == task.count - 1:
                    return done
                self.writer.send(done)
            return None
        finally:
            if previous is not None:  # not started after all: send it anyway
                self.writer.send(previous)
            self.publisher.task_ended()

    def _wait_for_work(self) -> None:
        # data_version changes when another connection commits, so a new task wakes us within one
        # poll_interval without a query against the tasks table each time.
        version = store.data_version(self.conn)
        give_up = time.monotonic() + IDLE_RECHECK_SECONDS
        while not self.stopping.is_set() and time.monotonic() < give_up:
            time.sleep(self.settings.poll_interval)
            if store.data_version(self.conn) != version:
                return

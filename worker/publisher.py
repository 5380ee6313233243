"""The progress publisher: writes progress, previews and step timings, notices cancels, heartbeats, recovers orphans."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from PIL import Image

from mflux_server.core import service_notify
from mflux_server.core.rows import Timing
from mflux_server.core.settings import Settings
from mflux_server.store import Store
from mflux_server.worker.storage_retry import Outage

log = logging.getLogger("mflux_worker")

# How often a running task's latest step is published and its ownership checked.
PROGRESS_INTERVAL = 0.02
# Seconds without progress after which a task shown as this worker's, which it neither runs nor has claimed last,
# goes back to the queue (a completion waiting in the writer is seconds old; a storage outage longer than this
# costs that task a second run, never the task).
GHOST_AFTER = 60.0
PREVIEW_QUALITY = 70


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the running task is: image, steps finished on it, and when the last one finished."""

    task_id: str
    image_index: int
    step: int
    at: float


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    """A picture of the running task's current image after some step, to encode and publish."""

    task_id: str
    image_index: int
    step: int
    picture: Image.Image


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured duration of one kind of cost at one model and size."""

    model: str
    width: int
    height: int
    kind: str
    seconds: float


class ProgressPublisher:
    """Runs on its own thread and connection, so the generation thread's step callback only records and checks."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self._current: str | None = None
        self._claimed: str | None = None  # the task claimed last, from its claim (a model load may come first)
        self._latest: Progress | None = None
        self._preview: PreviewFrame | None = None
        self._taken: set[str] = set()
        # Measured on the generation thread and written here, so the forecast learns this machine's speed
        # from the first steps of the first task.
        self._measurements: deque[Measurement] = deque()
        self._task_started = threading.Event()
        self._stop = threading.Event()
        # The publishing thread's own state: what it last wrote, when it last beat, the data version it last saw.
        self._written: Progress | None = None
        self._shown: PreviewFrame | None = None
        self._beat_at = 0.0
        self._version = 0

    # Called from the generation thread

    def task_claimed(self, task_id: str) -> None:
        """A task was claimed: it is this worker's, though it may load a model before it starts."""
        self._claimed = task_id

    def task_started(self, task_id: str) -> None:
        """A task is running now: publish its progress often, and watch for it being taken away."""
        self._current = task_id
        self._task_started.set()

    def task_ended(self) -> None:
        """No task is running."""
        self._current = None
        self._latest = None
        self._preview = None

    def publish(self, progress: Progress) -> None:
        """The latest progress; only the newest is written."""
        self._latest = progress

    def publish_preview(self, frame: PreviewFrame) -> None:
        """The latest preview; only the newest is encoded and written."""
        self._preview = frame

    def measured(self, measurement: Measurement) -> None:
        """Queue one duration for the timing stats."""
        self._measurements.append(measurement)

    def taken(self, task_id: str) -> bool:
        """Whether the task was canceled or recovered by someone else while this worker ran it."""
        return task_id in self._taken

    def stop(self) -> None:
        """End the loop after its current pass."""
        self._stop.set()
        self._task_started.set()

    # The thread

    def run(self, db: Store) -> None:
        """Publish, check, heartbeat and recover until stopped; idle, it sleeps until a task starts or a beat is due."""
        self._version = db.data_version()
        outage = Outage("progress and heartbeats")
        watchdog = service_notify.Watchdog()
        while not self._stop.is_set():
            watchdog.ping()  # the loop runs: a storage outage is waited out here, not a reason to be restarted
            try:
                self._publish_once(db)
            except Exception as exc:  # a full disk or passing I/O error must not end the heartbeats for good
                outage.failed(exc)
            else:
                outage.passed()

    def _publish_once(self, db: Store) -> None:
        """One pass: wait for work or a beat, then write progress, preview and timings, check ownership, heartbeat."""
        if self._current is None:
            self._task_started.wait(max(self.settings.heartbeat_interval - (time.monotonic() - self._beat_at), 0.0))
            self._task_started.clear()
        else:
            time.sleep(PROGRESS_INTERVAL)
        current, latest = self._current, self._latest
        if latest is not None and latest != self._written:
            if not db.record_progress(latest.task_id, self.worker_id, latest.image_index, latest.step, latest.at):
                self._taken.add(latest.task_id)
            self._written = latest
        frame = self._preview
        if frame is not None and frame is not self._shown:
            self._shown = frame
            db.save_preview(frame.task_id, self.worker_id, frame.image_index + 1, frame.step, "image/jpeg",
                               encode_preview(frame.picture))
        now_version = db.data_version()
        if current and now_version != self._version and not db.still_mine(current, self.worker_id):
            self._taken.add(current)
        self._version = now_version
        self.flush_timings(db)
        if time.monotonic() - self._beat_at >= self.settings.heartbeat_interval:
            db.heartbeat(self.worker_id)
            recover(db, self.settings)
            # A task shown as this worker's that it does not run would wait for good: its heartbeat keeps recovery
            # away. Seen once, after SQLite lost a claim loop's commits (store/sqlite/connection.py).
            for task_id in db.release_ghosts(self.worker_id, self._current, self._claimed, time.time() - GHOST_AFTER):
                log.warning("task %s was shown as running on this worker, which does not run it: back in the queue",
                            task_id)
            self._beat_at = time.monotonic()

    def flush_timings(self, db: Store) -> None:
        """Write every queued measurement, grouped by model and size."""
        grouped: dict[tuple[str, int, int], dict[str, list[float]]] = {}
        while self._measurements:
            m = self._measurements.popleft()
            grouped.setdefault((m.model, m.width, m.height), {}).setdefault(m.kind, []).append(m.seconds)
        for (model, width, height), kinds in grouped.items():
            db.record_timings(model, width, height, [Timing(kind, tuple(s)) for kind, s in kinds.items()])


def encode_preview(picture: Image.Image) -> bytes:
    """A preview as a small JPEG."""
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="JPEG", quality=PREVIEW_QUALITY)
    return out.getvalue()


def recover(db: Store, settings: Settings) -> None:
    """Requeue (or give up on) tasks of dead workers, and log each."""
    for recovery in db.recover_orphans(settings.stale_after, settings.max_attempts):
        log.warning("recovered task %s from a dead worker: now %s", recovery.task_id, recovery.status)

"""The result writer: encodes generated images and writes each task's outcome, off the generation thread."""

from __future__ import annotations

import logging
import queue
import sqlite3
import time

from mflux_server.core import store
from mflux_server.core.rows import StoredImage, Timing
from mflux_server.worker.encoding import encode
from mflux_server.worker.messages import (
    ImageGenerated,
    Message,
    Shutdown,
    TaskFailed,
    TaskReleased,
)

log = logging.getLogger("mflux_worker")

# Generated images waiting for the encoder; beyond this the GPU waits, which bounds memory.
OUTBOX_IMAGES = 4


class ResultWriter:
    """Takes messages in order from an outbox, so the GPU goes straight on to the next task."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.outbox: queue.Queue[Message] = queue.Queue(maxsize=OUTBOX_IMAGES)
        self._pending: dict[str, list[StoredImage]] = {}

    def send(self, message: Message) -> None:
        """Queue a message; blocks while OUTBOX_IMAGES images wait to be encoded."""
        self.outbox.put(message)

    def run(self, conn: sqlite3.Connection) -> None:
        """Write outcomes until SHUTDOWN; a failure to encode or store fails that task, not the worker."""
        while not isinstance(message := self.outbox.get(), Shutdown):
            task = message.task
            try:
                if isinstance(message, ImageGenerated):
                    self._write_image(conn, message)
                    continue
                self._pending.pop(task.id, None)
                if isinstance(message, TaskFailed):
                    store.fail(conn, task.id, self.worker_id, message.message)
                elif isinstance(message, TaskReleased):
                    store.release(conn, task.id, self.worker_id)
                # TaskDropped: forgetting its pending images, above, is all there is to do
            except Exception as exc:
                log.exception("task %s: could not store the result", task.id)
                self._pending.pop(task.id, None)
                store.fail(conn, task.id, self.worker_id, f"storing the image failed: {type(exc).__name__}: {exc}")

    def _write_image(self, conn: sqlite3.Connection, done: ImageGenerated) -> None:
        task = done.task
        images = self._pending.setdefault(task.id, [])
        started = time.perf_counter()
        seed = task.seed + done.index
        data, mime = encode(done.image, task.format, task.quality, done.software, seed)
        timings = [Timing("after", (done.after_seconds,)), Timing("encode", (time.perf_counter() - started,))]
        store.record_timings(conn, task.model, task.width, task.height, timings)
        images.append(StoredImage(done.index, seed, mime, data, done.started, done.ended))
        if len(images) == task.count:
            del self._pending[task.id]
            if store.complete(conn, task.id, self.worker_id, images):
                log.info("task %s: done", task.id)
            else:
                log.info("task %s: finished but no longer ours (canceled); images dropped", task.id)

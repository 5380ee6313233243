"""The result writer: encodes generated images and writes each task's outcome, off the generation thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial

from mflux_server.core.rows import InputImage, NewTask, StoredImage, Task, Timing, UpscaleAfter
from mflux_server.store import Store, storage_problem
from mflux_server.worker.content_credentials import ContentCredentials
from mflux_server.worker.encoding import encode
from mflux_server.worker.generation_data import GenerationData
from mflux_server.worker.messages import (
    ImageGenerated,
    Message,
    Shutdown,
    TaskFailed,
    TaskReleased,
)
from mflux_server.worker.storage_retry import StorageRetry

log = logging.getLogger("mflux_worker")

# Generated images waiting for the encoder; beyond this the GPU waits, which bounds memory.
OUTBOX_IMAGES = 4


class ResultWriter:
    """Takes messages in order from an outbox, so the GPU goes straight on to the next task."""

    def __init__(self, worker_id: str, stopping: threading.Event | None = None,
                 credentials: ContentCredentials | None = None) -> None:
        self.worker_id = worker_id
        self.credentials = credentials  # signs each encoded image (C2PA), here, off the generation thread
        self.outbox: queue.Queue[Message] = queue.Queue(maxsize=OUTBOX_IMAGES)
        self._pending: dict[str, list[StoredImage]] = {}
        self.stopped = False
        # A full disk or a passing I/O error holds the results here and retries; the task stays this worker's.
        self.retry = StorageRetry("storing results", stopping or threading.Event())

    def send(self, message: Message) -> None:
        """Queue a message; blocks while OUTBOX_IMAGES images wait to be encoded, unless the writer has died."""
        while True:
            try:
                self.outbox.put(message, timeout=0.5)
                return
            except queue.Full:
                if self.stopped:  # its thread died (the storage was lost): the task is recovered from its row
                    log.error("task %s: the result writer has stopped; dropping its %s",
                              getattr(getattr(message, "task", None), "id", "-"),
                              type(message).__name__)
                    return

    def run(self, db: Store) -> None:
        """Write outcomes until SHUTDOWN; a failure to encode fails that task, a storage fault is waited out."""
        try:
            self._run(db)
        finally:
            self.stopped = True

    def _run(self, db: Store) -> None:
        while not isinstance(message := self.outbox.get(), Shutdown):
            task = message.task
            try:
                if isinstance(message, ImageGenerated):
                    self._write_image(db, message)
                    continue
                self._pending.pop(task.id, None)
                if isinstance(message, TaskFailed):
                    self.retry.run(partial(db.fail, task.id, self.worker_id, message.message))
                elif isinstance(message, TaskReleased):
                    self.retry.run(partial(db.release, task.id, self.worker_id))
                # TaskDropped: forgetting its pending images, above, is all there is to do
            except Exception as exc:
                self._pending.pop(task.id, None)
                if storage_problem(exc) is not None:
                    # Still failing after the retries (or a lost file): the task stays processing under this worker,
                    # and once its heartbeat stops another worker requeues it. Nothing a user submitted is lost.
                    log.error("task %s: could not store its result (%s); it will be retried after this worker stops",
                              task.id, exc)
                    raise
                log.exception("task %s: could not encode the result", task.id)
                self.retry.run(partial(db.fail, task.id, self.worker_id,
                                       f"encoding the image failed: {type(exc).__name__}: {exc}"))

    def _write_image(self, db: Store, done: ImageGenerated) -> None:
        task = done.task
        images = self._pending.setdefault(task.id, [])
        started = time.perf_counter()
        seed = task.seed + done.index
        generation = GenerationData.of(task, done.index, done.software, done.image)
        data, mime = encode(done.image, task.format, task.quality, generation)
        signed = self.credentials is not None
        if self.credentials is not None:
            data = self.credentials.sign(data, mime, generation)
        timings = [Timing("after", (done.after_seconds,)), Timing("encode", (time.perf_counter() - started,))]
        images.append(StoredImage(done.index, seed, mime, data, done.started, done.ended, int(signed)))
        self.retry.run(lambda: db.record_timings(task.model, task.width, task.height, timings))
        if len(images) == task.count:
            then = upscales_after(task, images)
            stored = self.retry.run(lambda: db.complete(task.id, self.worker_id, images, then))
            del self._pending[task.id]
            if stored:
                log.info("task %s: done", task.id)
            else:
                log.info("task %s: finished but no longer ours (canceled); images dropped", task.id)


def upscales_after(task: Task, images: list[StoredImage]) -> list[NewTask]:
    """The upscale tasks a generate request's `upscale` asks for, one per image, queued with it done."""
    after = UpscaleAfter.of(task.then_upscale)
    if after is None:
        return []
    # Each is the task's own in all but what it runs: same key, priority, webhook, links and privacy.
    return [NewTask(prompt=task.prompt, model=after.model, width=after.width, height=after.height, steps=after.steps,
                    guidance=after.guidance or 0.0, guidance_auto=after.guidance is None, seed=image.seed, count=1,
                    format=task.format, quality=task.quality, priority=task.priority,
                    inputs=(InputImage("image", image.mime, task.width, task.height, image.data),),
                    callback_url=task.callback_url, link_base=task.link_base, keep_for=task.keep_for,
                    client_user=task.client_user, key_id=task.key_id, private=bool(task.private),
                    upscales_task=task.id, upscales_index=image.idx, fair_cost=after.fair_cost)
            for image in sorted(images, key=lambda image: image.idx)]

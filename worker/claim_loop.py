"""The claim loop: on the generation thread, claim the next task, generate its images, hand them to the writer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image

from mflux_server.core import catalog
from mflux_server.core.lora_library import Library, hub_reference
from mflux_server.core.rows import CONTROL_ROLE, REFERENCE_ROLES, Task
from mflux_server.core.scheduling import LORA_CHANGE, Variant, choose_variant
from mflux_server.core.settings import Settings
from mflux_server.store import Store
from mflux_server.worker import low_priority
from mflux_server.worker.engines.base import Control, Engine, EngineFault, Job, ModelLoadFailed, OutOfMemory
from mflux_server.worker.messages import (
    ImageGenerated,
    TaskDropped,
    TaskFailed,
    TaskReleased,
)
from mflux_server.worker.publisher import Measurement, PreviewFrame, Progress, ProgressPublisher
from mflux_server.worker.result_writer import ResultWriter
from mflux_server.worker.storage_retry import Outage, StorageRetry

T = TypeVar("T")

log = logging.getLogger("mflux_worker")

# Idle claim attempts happen on any database change, and at least this often regardless.
IDLE_RECHECK_SECONDS = 1.0
# Seconds between two previews of one image: every step for slow models, every few steps for fast ones, so that
# drawing them stays far below 1% of generation time (benchmark 1 measures it).
PREVIEW_INTERVAL = 0.25


def too_large(task: Task, limit: int, detail: str) -> str:
    """The error of a task whose image size this worker cannot run."""
    because = f": it ran out of memory ({detail})" if detail else ""
    return (f"{task.width}×{task.height} ({task.width * task.height} pixels) is too large for this worker{because}; "
            f"it runs at most {limit} pixels. Ask for a smaller width or height.")


class TaskStopped(Exception):
    """Raised from a step callback to stop generating the current task."""


class TaskTaken(TaskStopped):
    """The task was canceled, or recovered by someone else, while this worker ran it."""


class ShutdownRequested(TaskStopped):
    """SIGTERM or SIGINT: stop at this step boundary and put the task back."""


class PreviewCost:
    """What drawing previews cost on the generation thread, against the time spent generating (logged at stop)."""

    def __init__(self) -> None:
        self.previews, self.seconds, self.generating = 0, 0.0, 0.0

    def add(self, previews: int, seconds: float, generating: float) -> None:
        """One image's previews and its generation time."""
        self.previews += previews
        self.seconds += seconds
        self.generating += generating

    def summary(self) -> str:
        """One log line (benchmark 1 reads it)."""
        share = self.seconds / self.generating * 100 if self.generating else 0.0
        return (f"previews: {self.previews} drawn in {self.seconds * 1000:.1f} ms, {share:.3f}% of "
                f"{self.generating:.1f} s generating")


class StepTimer:
    """The StepReporter of one image: times the engine's loop events, publishes progress, stops on request."""

    def __init__(self, task: Task, index: int, publisher: ProgressPublisher, stopping: threading.Event):
        self.task = task
        self.index = index
        self.publisher = publisher
        self.stopping = stopping
        self.started = self.last = time.perf_counter()
        self.previewed = float("-inf")
        self.previews, self.preview_seconds = 0, 0.0  # what drawing previews cost this image's generation
        self.looping = False
        # Held until the image is generated: a failed generation's timings would teach the forecast its failure.
        self.measurements: list[Measurement] = []
        publisher.publish(Progress(task.id, index, 0, time.time()))

    def loop_started(self) -> None:
        """The engine finished its work before the denoising loop."""
        now = time.perf_counter()
        self._measured("before", now - self.started)
        self.last, self.looping = now, True
        self._check()

    def step(self, done: int, total: int, preview: Callable[[], Image.Image | None] | None = None) -> None:
        """A denoising step finished: record it, publish it (and a preview when one is due), stop here if asked to."""
        now = time.perf_counter()
        if not self.looping:  # an engine that never reported the loop's start: count that time as 'before'
            self.loop_started()
        self._measured("step", now - self.last)
        self.last = now
        self.publisher.publish(Progress(self.task.id, self.index, done, time.time()))
        if preview is not None and done < total and now - self.previewed >= PREVIEW_INTERVAL:
            # Drawn here (the latents live on this thread), encoded and stored on the publisher's thread.
            picture = preview()
            if picture is not None:
                self.publisher.publish_preview(PreviewFrame(self.task.id, self.index, done, picture))
            self.previewed = time.perf_counter()
            self.preview_seconds += self.previewed - now
            self.previews += 1
        self._check()

    def after_seconds(self) -> float:
        """Seconds from the last step until the engine returned the image."""
        return time.perf_counter() - self.last

    def commit(self) -> None:
        """The image was generated: its timings count."""
        for measurement in self.measurements:
            self.publisher.measured(measurement)
        self.measurements.clear()

    def _measured(self, kind: str, seconds: float) -> None:
        self.measurements.append(Measurement(self.task.model, self.task.width, self.task.height, kind, seconds))

    def _check(self) -> None:
        if self.stopping.is_set():
            raise ShutdownRequested()
        if self.publisher.taken(self.task.id):
            raise TaskTaken()


class WorkerBroken(Exception):
    """The engine could not be recovered after a fault; the process exits so its service manager restarts it."""


class ClaimLoop:
    """Claims tasks in order and generates them one at a time; never holds the GIL while the engine works."""

    def __init__(self, settings: Settings, engine: Engine, worker_id: str, db: Store,
                 publisher: ProgressPublisher, writer: ResultWriter, stopping: threading.Event,
                 servable: Sequence[str] = (), limits: Mapping[str, int] | None = None):
        self.settings = settings
        self.engine = engine
        self.worker_id = worker_id
        self.db = db
        self.publisher = publisher
        self.writer = writer
        self.stopping = stopping
        self.servable = list(dict.fromkeys(servable or ([engine.model] if engine.model else [])))
        # The largest image per model (its memory need; lowered when it runs out of memory), as published.
        self.limits = dict(limits or {})
        self.preview_cost = PreviewCost()
        self.library = Library(settings.lora_dir)
        self.loras = ""  # the LoRA set the engine holds, as tasks.loras spells it ("" after a load: the default)

    def claim(self, now: float | None = None) -> Task | None:
        """Claim the next task this worker should run, per choose_variant; None when nothing it serves waits."""
        if self.servable == [self.engine.model] and self.library.folder is None and not self.settings.lora_hub:
            # One model and no LoRAs to take (no library, no hub), so one variant: the plain claim, no tally.
            assert self.engine.model is not None
            return self.db.claim_next(self.worker_id, self.engine.model, self.engine.name)
        now = time.time() if now is None else now
        loaded = Variant(self.engine.model, self.loras) if self.engine.model else None
        heads = self.db.waiting_heads()
        chosen = choose_variant(heads, loaded, self.servable, now, self.settings.max_affinity_wait,
                                self.db.mean_load_seconds())
        if chosen is None:
            return None
        # By LoRA set only where the model has several waiting: the plain claim of a model keeps its index.
        sets = {head.loras for head in heads if head.model == chosen.model}
        return self.db.claim_next(self.worker_id, chosen.model, self.engine.name,
                                  loras=chosen.loras if len(sets) > 1 else None)

    def stored(self, what: str, action: Callable[[], T]) -> T:
        """A store call made with a task in hand: a storage fault (a restarted PostgreSQL) is waited out, not fatal."""
        return StorageRetry(what, self.stopping).run(action)

    def switch_to(self, task: Task) -> bool:
        """Load the task's model (it is claimed, so clients see it starting); on failure fail its tasks."""
        previous = self.engine.model
        log.info("switching model: %s -> %s for task %s", previous, task.model, task.id)
        self.stored("publishing the model switch",
                    lambda: self.db.worker_loading(self.worker_id, previous or "", task.model, self.servable))
        started = time.perf_counter()
        try:
            self.loras = ""
            self.engine.load(task.model)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadFailed) else f"{type(exc).__name__}: {exc}"
            log.error("could not load %s: %s", task.model, reason)
            self.servable.remove(task.model)  # and from the workers table below, so the API stops accepting it
            message = f"model {task.model} failed to load on worker {self.worker_id}: {reason}"
            self.writer.send(TaskFailed(task, message))
            live = self.stored("reading the workers", lambda: self.db.live_workers(self.settings.stale_after))
            if not [w for w in live if w.id != self.worker_id and task.model in w.servable]:
                failed = self.stored("failing its waiting tasks", lambda: self.db.fail_waiting(task.model, message))
                log.error("failed %d more waiting task(s) of %s: no other worker serves it", failed, task.model)
            self.stored("publishing the failed load",
                        lambda: self.db.worker_loading(self.worker_id, "", None, self.servable))
            return False
        seconds = time.perf_counter() - started
        self.stored("recording the load", lambda: self.db.record_load(task.model, seconds))
        self.stored("publishing the loaded model",
                    lambda: self.db.worker_loading(self.worker_id, task.model, None, self.servable))
        log.info("loaded %s in %.2f s (warm-up included)", task.model, seconds)
        return True

    def run(self) -> None:
        """Claim and run tasks until stopping is set; every generated image reaches the writer."""
        handoff: ImageGenerated | None = None
        outage = Outage("claiming tasks")
        try:
            while not self.stopping.is_set():
                try:
                    task = self.claim()
                except Exception as exc:  # a full disk or locked file: wait it out, nothing was claimed
                    outage.failed(exc)
                    continue
                outage.passed()
                if task is not None:
                    self.publisher.task_claimed(task.id)
                if task is not None and task.model != self.engine.model:
                    if handoff is not None:
                        self.writer.send(handoff)
                        handoff = None
                    if not self.switch_to(task):
                        continue
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

    def limit_for(self, model: str) -> int:
        """The largest image this worker runs with a model."""
        return self.limits.get(model, self.settings.max_pixels)  # published limits are already within the cap

    def run_task(self, task: Task, previous: ImageGenerated | None = None) -> ImageGenerated | None:
        """Generate a task's images and send them to the writer; stop early on cancel, shutdown or error.

        Returns the last image instead of sending it; the caller passes it to the next task as `previous`,
        sent the moment that task's generation starts.
        """
        log.info("task %s: %s %d×%d, %d steps, %d image(s), attempt %d", task.id, task.model, task.width, task.height,
                 task.steps, task.count, task.attempts)
        if task.width * task.height > self.limit_for(task.model):
            self.writer.send(TaskFailed(task, too_large(task, self.limit_for(task.model), "")))
            return previous
        loras = []
        for name, scale in task.lora_set:
            found = self.lora_source(name)
            if found is None:  # the API found it in its --lora-dir: this worker's folder differs
                self.writer.send(TaskFailed(task, f"LoRA {name!r} is not in this worker's LoRA library "
                                                  f"({self.settings.lora_dir or 'no --lora-dir'}); give the API and "
                                                  "every worker the same --lora-dir (and --lora-hub)"))
                return previous
            loras.append((found, scale))
        try:  # before the images' timings start: a set change is a reload, not a slow first step
            started = time.perf_counter()
            self.engine.use_loras(tuple(loras))
            if task.loras != self.loras:
                seconds, self.loras = time.perf_counter() - started, task.loras
                # Measured beside the model's loads, so the scheduler and the forecast charge what a change costs.
                self.stored("recording the LoRA change",
                            lambda: self.db.record_load(task.model + LORA_CHANGE, seconds))
                self.stored("publishing the LoRA set", lambda: self.db.worker_loras(self.worker_id, task.loras))
        except Exception as exc:
            self.loras = "?"  # unknown: the next task applies its set again
            log.exception("task %s: its LoRAs could not be applied", task.id)
            self.writer.send(TaskFailed(task, f"its LoRAs could not be applied: {type(exc).__name__}: {exc}"))
            if self.engine.model is None:
                raise WorkerBroken(f"no model held after a failed LoRA change: {exc}") from exc
            return previous
        # Most tasks have no input images: no read for them (a round trip fewer between generations on PostgreSQL).
        stored_inputs = self.stored("reading input images",
                                    lambda: self.db.inputs(task.id)) if task.input_count else {}
        try:  # verified at submit; a file damaged since (or written around the API) fails its task, not the worker
            inputs = low_priority.decoded(stored_inputs)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.error("task %s: its input images could not be read: %s", task.id, exc)
            self.writer.send(TaskFailed(task, f"its input images could not be read: {type(exc).__name__}: {exc}"))
            return previous
        references = tuple(inputs[role] for role in REFERENCE_ROLES if role in inputs)
        settings = task.control_settings
        resolved = catalog.resolve_reference(task.model)
        can = resolved.info.capabilities if resolved is not None else None
        control = None if settings is None or CONTROL_ROLE not in inputs else \
            Control(inputs[CONTROL_ROLE], settings.kind, settings.strength, settings.preprocess)
        self.publisher.task_started(task.id)
        try:
            for index in range(task.count):
                job = Job(task.prompt, task.seed + index, task.width, task.height, task.steps,
                          None if task.guidance_auto else task.guidance, task.negative_prompt, inputs.get("image"),
                          inputs.get("mask"), task.image_strength, references, tuple(loras), control,
                          bool(can and can.upscale), bool(can and can.variation), task.strengths,
                          bool(can and can.try_on))
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
                except OutOfMemory as exc:
                    self.limits[task.model] = min(self.limit_for(task.model), exc.pixels - 1)
                    log.error("task %s: out of memory at %d pixels; this worker's limit for %s is now %d", task.id,
                              exc.pixels, task.model, self.limits[task.model])
                    self.stored("publishing pixel limits",
                                lambda: self.db.set_pixel_limits(self.worker_id, self.limits))
                    self.writer.send(TaskFailed(task, too_large(task, self.limits[task.model], str(exc))))
                    self.recover_engine()
                    return None
                except Exception as exc:  # an engine failure fails this task, not the worker
                    log.exception("task %s: engine failed", task.id)
                    self.writer.send(TaskFailed(task, f"{self.engine.name} engine failed: {type(exc).__name__}: {exc}"))
                    if isinstance(exc, EngineFault):
                        self.recover_engine()
                    return None
                timer.commit()
                self.preview_cost.add(timer.previews, timer.preview_seconds, time.time() - started)
                done = ImageGenerated(task, index, image, started, time.time(), timer.after_seconds(), self.engine.software)
                if index == task.count - 1:
                    return done
                self.writer.send(done)
            return None
        finally:
            if previous is not None:  # not started after all: send it anyway
                self.writer.send(previous)
            self.publisher.task_ended()

    def lora_source(self, name: str) -> str | None:
        """What mflux loads for a LoRA name: its file in the library, or (with --lora-hub) the Hugging Face reference
        itself, which mflux downloads; never a path on this machine that the library does not hold."""
        found = self.library.path_of(name)
        if found is not None:
            return str(found)
        # mflux tries a reference as a local path first: one that exists here (relative to the working
        # directory) would load a file a client named, so it is refused.
        if self.settings.lora_hub and hub_reference(name) and not Path(name.partition(":")[0]).exists():
            return name
        return None

    def recover_engine(self) -> None:
        """Free memory and reload after a fault, so later tasks do not fail in milliseconds; exit if that fails."""
        started = time.perf_counter()
        try:
            self.engine.reset()
        except Exception as exc:
            raise WorkerBroken(f"could not recover the engine: {type(exc).__name__}: {exc}") from exc
        log.info("engine recovered in %.2f s", time.perf_counter() - started)

    def _wait_for_work(self) -> None:
        # A commit by another connection wakes us: on PostgreSQL a NOTIFY at once, on SQLite a change of
        # data_version within one poll_interval, without a query against the tasks table each time.
        version = self.db.data_version()
        give_up = time.monotonic() + IDLE_RECHECK_SECONDS
        while not self.stopping.is_set() and time.monotonic() < give_up:
            # Short waits, so a stop request is seen within a second.
            wait = min(1.0, give_up - time.monotonic())
            if self.db.wait_for_change(version, wait, self.settings.poll_interval) != version:
                return

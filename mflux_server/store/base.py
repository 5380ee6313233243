"""The store: every read and write of the queue, as methods of one object; rows come out typed (core.rows).

Store holds what both databases share: the named statements (query_files.py) and the logic around them.
Each backend (sqlite/, postgresql/) subclasses it with its session, its SQL and what only it can do; callers
hold a Store and never see a connection, a driver error (errors.py) or a dialect (capabilities.py says what
they may count on).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mflux_server.core.rows import (
    ApiKey,
    Arrival,
    ClaimKey,
    Delivery,
    Event,
    ForecastOutcome,
    InputImage,
    LoadStat,
    NewTask,
    Preview,
    QueueEntry,
    QueueRead,
    Recovery,
    Removal,
    Status,
    StoredImage,
    Task,
    Timing,
    TimingStat,
    WaitingHead,
    Worker,
)
from mflux_server.store.capabilities import Capabilities
from mflux_server.store.query_files import Query

# Workers silent this long that hold no task are forgotten.
FORGET_WORKERS_AFTER = 7 * 24 * 3600.0
# How long events are kept for streams that reconnect; older ones are pruned by the workers' recovery sweep.
EVENT_RETENTION = 3600.0


def new_task_id() -> str:
    """An unguessable id: 128 random bits, hex."""
    return secrets.token_hex(16)


def _task_params(task: NewTask, task_id: str, created_at: float) -> dict[str, object]:
    params = {f.name: getattr(task, f.name) for f in fields(task) if f.name not in ("inputs", "fair_cost")}
    return params | {"id": task_id, "created_at": created_at, "guidance_auto": int(task.guidance_auto), "fair_tag": 0.0,
                     "fair_start": 0.0, "input_count": len(task.inputs), "private": int(task.private)}


# A sample over this many times the typical one is a stall (kernel compilation, swapping, a GC pause), not the
# cost of the work: it is counted at this bound, so one 43 s first step cannot make every later forecast 1.7× long.
OUTLIER_FACTOR = 3.0
MIN_SAMPLES_TO_CLIP = 3


def clip_outliers(samples: Sequence[float], stored: tuple[int, float]) -> tuple[float, ...]:
    """Samples bounded above by OUTLIER_FACTOR × the typical value: the stored mean, or this batch's median."""
    n, total = stored
    if n >= MIN_SAMPLES_TO_CLIP:
        typical = total / n
    elif len(samples) >= MIN_SAMPLES_TO_CLIP:
        typical = statistics.median(samples)
    else:
        return tuple(samples)
    return tuple(min(s, OUTLIER_FACTOR * typical) for s in samples)


def _model_list(model: str, models: Sequence[str]) -> str:
    """The workers.models column: the held model first, then the others, once each."""
    return ",".join(name for name in dict.fromkeys((model, *models)) if name)


def _limit_list(limits: Mapping[str, int]) -> str:
    """The workers.pixel_limits column: model=pixels, comma separated."""
    return ",".join(f"{model}={pixels}" for model, pixels in limits.items())


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Counted(Protocol):
    """A write's result: how many rows it changed (for a deferred one, known once it was sent)."""

    @property
    def rowcount(self) -> int: ...


class Rows(Counted, Protocol):
    """A statement's result: its rows (by position and by column name) and how many rows it changed."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Session(Protocol):
    """What a backend's session gives the shared methods: named statements, write transactions, a read snapshot."""

    def run(self, query: Query, parameters: Any = ()) -> Rows: ...

    def later(self, query: Query, parameters: Any = ()) -> Counted: ...

    def transaction(self) -> AbstractContextManager[None]: ...

    def snapshot(self, statements: Sequence[Query]) -> list[list[tuple[Any, ...]]]: ...

    def close(self) -> None: ...


class Store:
    """One session with a queue's store; not shared between threads (under gevent: one per request on PostgreSQL)."""

    capabilities: ClassVar[Capabilities]

    def __init__(self, target: str, session: Session, queries: dict[str, Query]):
        self.target = target
        self.session = session  # below the store: for the backend, and for tests that must reach the database
        self._queries = queries

    def _run(self, name: str, parameters: Any = ()) -> Rows:
        return self.session.run(self._queries[name], parameters)

    def _later(self, name: str, parameters: Any = ()) -> Counted:
        return self.session.later(self._queries[name], parameters)

    def close(self) -> None:
        """End the session (a pooled one goes back to its pool)."""
        self.session.close()

    # Tasks

    def _fair_tag(self, task: NewTask) -> tuple[float, float]:
        """The new task's place in fair claim order (inside the submit transaction): its key's next start time and
        where the key's backlog began, or with first-in first-out scheduling just past every tag given so far."""
        if task.fair_cost is None:
            tag = start = math.nextafter(float(self._run("fifo_tag").fetchone()[0]), math.inf)
        else:
            cost = max(task.fair_cost, 1e-6)  # a key's own tasks keep their order: every one moves its end on
            tag, start = self._run("fair_tag", {"key_id": task.key_id or 0, "cost": cost}).fetchone()
        self._run("note_tag", {"tag": tag})
        return float(tag), float(start)

    def submit(self, task: NewTask, now: float | None = None) -> Task:
        """Queue a waiting task, with its input images, and return its row."""
        with self.session.transaction():
            return self._insert(task, time.time() if now is None else now)

    def _insert(self, task: NewTask, now: float) -> Task:
        """Insert a waiting task and its input images, inside the caller's transaction."""
        params = _task_params(task, new_task_id(), now)
        params["fair_tag"], params["fair_start"] = self._fair_tag(task)
        created = Task.from_row(self._run("insert_task", params).fetchone())
        for image in task.inputs:
            self._run("insert_input", asdict(image) | {"task_id": created.id})
        return created

    def upscale_tasks_of(self, task_id: str) -> list[str]:
        """The ids of the upscale tasks a done task's then_upscale queued, in the order of its images."""
        return [row[0] for row in self._run("upscale_tasks_of", (task_id,))]

    def inputs(self, task_id: str) -> dict[str, InputImage]:
        """The images a task was submitted with, by role ('image', 'image2'..'image4', 'mask'), references in order."""
        return {row["role"]: InputImage.from_row(row) for row in self._run("task_inputs", (task_id,))}

    def submit_many(self, tasks: Iterable[NewTask], now: float | None = None) -> list[str]:
        """Queue many waiting tasks in one transaction (benchmarks fill a queue this way); returns their ids."""
        created_at = time.time() if now is None else now
        ids = []
        with self.session.transaction():
            for task in tasks:
                ids.append(new_task_id())
                params = _task_params(task, ids[-1], created_at)
                params["fair_tag"], params["fair_start"] = self._fair_tag(task)
                self._run("insert_task", params).fetchone()
        return ids

    def get(self, task_id: str) -> Task | None:
        """One task, or None."""
        row = self._run("get_task", (task_id,)).fetchone()
        return Task.from_row(row) if row else None

    def claim_next(self, worker_id: str, model: str, engine: str, now: float | None = None,
                   loras: str | None = None) -> Task | None:
        """Atomically take the next waiting task of this model in claim order (of its LoRA set `loras` if given)."""
        params = {"worker_id": worker_id, "model": model, "engine": engine, "now": time.time() if now is None else now}
        with self.session.transaction():
            row = (self._run("claim_next", params) if loras is None
                   else self._run("claim_next_variant", {**params, "loras": loras})).fetchone()
        return Task.from_row(row) if row else None

    def prepare_claims(self, worker_id: str, engine: str, model: str = "") -> None:
        """Make the session ready for a worker's first claim, changing nothing (PostgreSQL plans its statements)."""

    def record_progress(self, task_id: str, worker_id: str, image_index: int, step: int,
                        step_at: float) -> bool:
        """Store progress; False when the task is no longer this worker's to run (canceled, recovered)."""
        cur = self._run(
            "record_progress",
            {"id": task_id, "worker_id": worker_id, "image_index": image_index, "step": step, "step_at": step_at},
        )
        return cur.rowcount == 1

    def still_mine(self, task_id: str, worker_id: str) -> bool:
        """True while the task is processing under this worker."""
        return self._run("still_mine", {"id": task_id, "worker_id": worker_id}).fetchone() is not None

    def complete(self, task_id: str, worker_id: str, images: Iterable[StoredImage], then: Sequence[NewTask] = ()
                 ) -> bool:
        """Store the images and mark the task done, and queue the tasks `then` (its upscales) if it was, all in one
        transaction; False if it was not ours."""
        # Every statement is guarded by the task still being this worker's (canceled or recovered meanwhile: the
        # images are dropped), under the write lock; on PostgreSQL they all go out with the COMMIT, one round trip,
        # unless tasks follow: they are queued only once the task is known to be done.
        now = time.time()
        with self.session.transaction():
            for image in images:
                self._later("insert_image_if_mine", asdict(image) | {"task_id": task_id, "worker_id": worker_id})
            if not then:
                done = self._later("mark_done", {"id": task_id, "worker_id": worker_id, "now": now})
            elif (done := self._run("mark_done", {"id": task_id, "worker_id": worker_id, "now": now})).rowcount == 1:
                for task in then:
                    self._insert(task, now)
        return bool(done.rowcount == 1)

    def fail(self, task_id: str, worker_id: str, message: str) -> bool:
        """Mark a task as error with a message; False if it was not ours."""
        with self.session.transaction():
            cur = self._run("mark_error", {"id": task_id, "worker_id": worker_id, "now": time.time(), "error": message})
        return cur.rowcount == 1

    def release(self, task_id: str, worker_id: str) -> bool:
        """Put a task back in the queue (graceful stop); the interrupted attempt is not counted."""
        with self.session.transaction():
            cur = self._run("release_task", {"id": task_id, "worker_id": worker_id})
        return cur.rowcount == 1

    def cancel_or_delete(self, task_id: str) -> Removal | None:
        """Cancel an unfinished task, or delete a finished one; None when there is no such task."""
        with self.session.transaction():
            task = self.get(task_id)
            if task is None:
                return None
            if task.status.unfinished:
                self._run("cancel_task", {"id": task_id, "now": time.time()})
                return Removal.CANCELED
            self._run("delete_task", (task_id,))
            return Removal.DELETED

    def fetch_image(self, task_id: str, index: int) -> StoredImage | None:
        """One stored image, or None."""
        row = self._run("get_image", (task_id, index)).fetchone()
        return StoredImage.from_row(row) if row else None

    def image_credentials(self, task_id: str) -> dict[int, bool]:
        """Whether each stored image of a task carries signed Content Credentials, by image index."""
        return {row["idx"]: bool(row["credentials"]) for row in self._run("image_credentials", (task_id,))}

    def mark_served(self, task_id: str, index: int, delete_when_all_served: bool) -> bool:
        """Note an image as served; with delete, remove the task once every image was served. True if deleted."""
        with self.session.transaction():
            self._run("mark_served", (task_id, index))
            if delete_when_all_served and self._run("unserved_count", (task_id,)).fetchone()[0] == 0:
                self._run("delete_task", (task_id,))
                return True
        return False

    def generation_spans(self) -> list[tuple[float, float]]:
        """(started, ended) of every stored image's generation, in order."""
        return [(row[0], row[1]) for row in self._run("generation_spans")]

    def list_tasks(self, status: Status | None, limit: int, offset: int, owner: int | None = None
                   ) -> tuple[list[Task], int]:
        """A page of tasks (running, then waiting in claim order, then newest finished) and the total; only the
        owner key's when given."""
        params = {"status": status, "limit": limit, "offset": offset, "owner": owner}
        rows = self._run("list_tasks", params).fetchall()
        total = self._run("count_tasks", {"status": status, "owner": owner}).fetchone()[0]
        return [Task.from_row(r) for r in rows], total

    def status_counts(self) -> dict[Status, int]:
        """Tasks per status, every status present."""
        counts = {status: 0 for status in Status}
        counts.update({Status(row["status"]): row["n"] for row in self._run("status_counts")})
        return counts

    def running_tasks(self) -> list[Task]:
        """Tasks being generated right now."""
        return [Task.from_row(r) for r in self._run("running_tasks")]

    # What the forecast reads

    def read_queue(self) -> QueueRead:
        """Every waiting task in claim order, with the newest seq and the change counter, from one read snapshot."""
        waiting, newest, changes = self.session.snapshot(
            [self._queries["waiting_queue"], self._queries["max_seq"], self._queries["queue_changes"]])
        return QueueRead([QueueEntry(*row) for row in waiting], newest[0][0], changes[0][0])

    def waiting_since(self, model: str, seq: int) -> list[QueueEntry]:
        """Waiting tasks for a model submitted after sequence number seq."""
        return [QueueEntry(*r) for r in self._run("waiting_since", {"model": model, "seq": seq})]

    def all_waiting_since(self, seq: int) -> list[QueueEntry]:
        """Waiting tasks of every model submitted after sequence number seq."""
        return [QueueEntry(*r) for r in self._run("all_waiting_since", {"seq": seq})]

    def waiting_front(self, model: str, seq: int, loras: str = "") -> ClaimKey | None:
        """The claim key of a model and LoRA set's first waiting task in claim order among those with seq up to seq,
        or None."""
        row = self._run("waiting_front", {"model": model, "loras": loras, "seq": seq}).fetchone()
        return ClaimKey.of(row["priority"], row["seq"], row["fair_tag"], row["fair_start"]) if row else None

    def arrivals_since(self, seq: int, since: float) -> list[Arrival]:
        """Tasks submitted after sequence number seq and after time since, whatever their status now."""
        return [Arrival(*r) for r in self._run("arrivals_since", {"seq": seq, "since": since})]

    def queue_changes(self) -> int:
        """A counter that moves whenever a task leaves the waiting set other than by a claim, or re-enters it."""
        changes: int = self._run("queue_changes").fetchone()[0]
        return changes

    def data_version(self) -> int:
        """A number that changes whenever another session commits to the queue."""
        raise NotImplementedError

    def wait_for_change(self, version: int, timeout: float, tick: float) -> int:
        """Wait until data_version moves from `version` or timeout seconds pass; returns it (polled every tick
        seconds where the store cannot signal)."""
        raise NotImplementedError

    # Timings

    def record_timings(self, model: str, width: int, height: int, timings: Iterable[Timing],
                       now: float | None = None) -> None:
        """Add measured seconds for one model and size to the stats the forecast is fitted to."""
        at = time.time() if now is None else now
        with self.session.transaction():
            for timing in timings:
                if not timing.seconds:
                    continue
                key = {"model": model, "width": width, "height": height, "kind": timing.kind}
                stored = self._run("timing_stat", key).fetchone()
                seconds = clip_outliers(timing.seconds, (stored[0], stored[1]) if stored else (0, 0.0))
                self._run("record_timing", key | {"n": len(seconds), "total": sum(seconds),
                                                 "total_sq": sum(s * s for s in seconds), "now": at})
                if timing.kind == "step":  # the measured seconds, unclipped: the metric shows what happened
                    for value in timing.seconds:
                        self.observe("step_seconds", model, value)

    def observe(self, name: str, model: str, value: float) -> None:
        """Count one observation in a histogram of the metrics tables (inside the caller's transaction)."""
        params = {"name": name, "model": model, "value": value}
        self._run("histogram_buckets", params)
        self._run("histogram_observe", params)
        self._run("histogram_sum", params)

    def timing_stats(self) -> list[TimingStat]:
        """Every aggregated timing."""
        return [TimingStat.from_row(r) for r in self._run("timing_stats")]

    def timing_version(self) -> tuple[float, int]:
        """A cheap fingerprint of the timing stats, so a fitted model is refit only when they change."""
        row = self._run("timing_version").fetchone()
        return (row["version"], row["rows"])

    # Workers and recovery

    def register_worker(self, engine: str, model: str, quantize: int | None,
                        pid: int | None = None, now: float | None = None, models: Sequence[str] = (),
                        max_pixels: int | None = None, affinity_wait: float | None = None,
                        pixel_limits: Mapping[str, int] | None = None) -> str:
        """Record a new worker (this process unless pid is given) with a fresh id, and return the id.

        `model` is the model it holds; `models` every model it may switch to.
        """
        pid = os.getpid() if pid is None else pid
        worker_id = f"{socket.gethostname()}-{pid}-{secrets.token_hex(4)}"
        params = {"id": worker_id, "hostname": socket.gethostname(), "pid": pid, "engine": engine, "model": model,
                  "quantize": quantize, "now": time.time() if now is None else now,
                  "models": _model_list(model, models), "max_pixels": max_pixels,
                  "affinity_wait": affinity_wait, "pixel_limits": _limit_list(pixel_limits or {})}
        with self.session.transaction():
            self._run("register_worker", params)
        return worker_id

    def worker_loading(self, worker_id: str, model: str, loading: str | None,
                       models: Sequence[str]) -> None:
        """Publish which model a worker holds, which it is loading now (None once loaded), and what it may still serve."""
        with self.session.transaction():
            self._run("worker_loading", {"id": worker_id, "model": model, "loading": loading,
                                                 "models": _model_list(model, models)})

    def worker_loras(self, worker_id: str, loras: str) -> None:
        """Publish which LoRA set a worker holds now (tasks.loras' text; "" for its default set)."""
        with self.session.transaction():
            self._run("worker_loras", {"id": worker_id, "loras": loras})

    def set_pixel_limits(self, worker_id: str, limits: Mapping[str, int]) -> None:
        """Publish the largest image a worker runs with each model (lowered after it ran out of memory)."""
        with self.session.transaction():
            self._run("worker_pixel_limits", {"id": worker_id, "pixel_limits": _limit_list(limits)})

    def record_load(self, model: str, seconds: float, now: float | None = None) -> None:
        """Add one measured model load (and warm-up) to its stats."""
        with self.session.transaction():
            self._run("record_load", {"model": model, "seconds": seconds, "now": time.time() if now is None else now})

    def load_stats(self) -> dict[str, LoadStat]:
        """Measured load times by model."""
        return {row["model"]: LoadStat.from_row(row) for row in self._run("load_stats")}

    def mean_load_seconds(self) -> dict[str, float]:
        """The mean measured load time of each model loaded here."""
        return {model: stat.total / stat.n for model, stat in self.load_stats().items()}

    def waiting_heads(self) -> list[WaitingHead]:
        """The front of each variant's waiting tasks per priority, with the work behind it, in one statement."""
        return [WaitingHead(r["model"], r["priority"], r["seq"], r["created_at"], r["tasks"], r["images"], r["loras"])
                for r in self._run("waiting_heads")]

    def fail_waiting(self, model: str, error: str, now: float | None = None) -> int:
        """Fail every waiting task of a model; returns how many."""
        with self.session.transaction():
            cur = self._run("fail_waiting", {"model": model, "error": error, "now": time.time() if now is None else now})
            return cur.rowcount

    def fail_unserved(self, model: str, before: float, error: str, now: float | None = None) -> int:
        """Fail a model's waiting tasks queued before `before` (no live worker serves the model); returns how many."""
        with self.session.transaction():
            cur = self._run("fail_unserved", {"model": model, "before": before, "error": error,
                                                      "now": time.time() if now is None else now})
            return cur.rowcount

    def heartbeat(self, worker_id: str, now: float | None = None) -> None:
        """Tell everyone this worker is alive (as of now)."""
        self._run("heartbeat", {"id": worker_id, "now": time.time() if now is None else now})

    def stop_worker(self, worker_id: str) -> None:
        """Mark a worker as cleanly stopped."""
        self._run("stop_worker", {"id": worker_id, "now": time.time()})

    def live_workers(self, stale_after: float) -> list[Worker]:
        """Workers that heartbeated within stale_after seconds and have not stopped."""
        return [Worker.from_row(r) for r in self._run("live_workers", {"since": time.time() - stale_after})]

    def server_setting(self, name: str) -> str | None:
        """A setting the API changed at run time (POST /api/load's default model), or None."""
        row = self._run("server_setting", {"name": name}).fetchone()
        return None if row is None else str(row[0])

    def set_server_setting(self, name: str, value: str) -> None:
        """Change a run-time setting every server process reads."""
        with self.session.transaction():
            self._run("set_server_setting", {"name": name, "value": value})

    def worker_pids(self, hostname: str) -> set[int]:
        """Process ids of the workers on one machine that have not stopped."""
        return {row[0] for row in self._run("worker_pids", {"hostname": hostname}) if row[0] is not None}

    def worker_count(self) -> int:
        """Workers ever registered and not yet forgotten."""
        count: int = self._run("worker_count").fetchone()[0]
        return count

    def recover_orphans(
        self,
        stale_after: float,
        max_attempts: int,
        alive: Callable[[int], bool] = pid_alive,
    ) -> list[Recovery]:
        """Requeue tasks whose worker died (stale heartbeat, or a dead pid on this host); past max_attempts, fail them."""
        now = time.time()
        host = socket.gethostname()
        outcomes = []
        with self.session.transaction():
            for held in self._run("held_tasks").fetchall():
                dead = (
                    held["heartbeat_at"] is None
                    or held["stopped_at"] is not None
                    or held["heartbeat_at"] < now - stale_after
                    or (held["hostname"] == host and held["pid"] != os.getpid() and not alive(held["pid"]))
                )
                if not dead:
                    continue
                params = {"id": held["id"], "worker_id": held["worker_id"], "now": now}
                if held["attempts"] >= max_attempts:
                    params["error"] = (
                        f"gave up after {held['attempts']} attempts: the worker running this task died each time "
                        f"(last: {held['worker_id']}); the task may crash the worker or need more memory"
                    )
                    self._run("fail_orphan", params)
                    outcomes.append(Recovery(held["id"], Status.ERROR))
                else:
                    self._run("requeue_orphan", params)
                    outcomes.append(Recovery(held["id"], Status.WAITING))
            self._run("forget_old_workers", {"before": now - FORGET_WORKERS_AFTER})
            self._run("prune_events", {"before": now - EVENT_RETENTION})
        return outcomes

    def release_ghosts(self, worker_id: str, running: str | None, claimed: str | None, before: float) -> list[str]:
        """Requeue this worker's processing tasks other than the one it runs and the one it claimed last, whose
        progress is older than `before` (their attempt stays counted); their ids."""
        with self.session.transaction():
            rows = self._run("release_ghosts", {"worker_id": worker_id, "running": running or "",
                                                "claimed": claimed or "", "before": before}).fetchall()
        return [row[0] for row in rows]

    # Events and previews

    def events_after(self, after: int, task_id: str | None = None, limit: int = 1000) -> list[Event]:
        """Events newer than id `after` (of one task, when given), oldest first."""
        if task_id is None:
            rows = self._run("events_after", {"after": after, "limit": limit})
        else:
            rows = self._run("task_events_after", {"after": after, "task_id": task_id, "limit": limit})
        return [Event.from_row(r) for r in rows]

    def last_event_id(self) -> int:
        """The newest event's id (0 when none)."""
        newest: int = self._run("last_event_id").fetchone()[0]
        return newest

    def save_preview(self, task_id: str, worker_id: str, image: int, step: int, mime: str, data: bytes,
                     now: float | None = None) -> bool:
        """Replace the task's preview; False when the task is no longer this worker's to run."""
        cur = self._run("save_preview", {"id": task_id, "worker_id": worker_id, "image": image, "step": step,
                                                 "mime": mime, "data": data, "at": time.time() if now is None else now})
        return cur.rowcount == 1

    def preview(self, task_id: str) -> Preview | None:
        """The task's latest preview, if its worker has published one."""
        row = self._run("get_preview", (task_id,)).fetchone()
        return None if row is None else Preview.from_row(row)

    # Webhooks (the outbox the deliveries_task_ended trigger fills)

    def claim_delivery(self, lease: float, now: float | None = None) -> Delivery | None:
        """Lease the oldest due webhook for `lease` seconds, counting the attempt; None when none is due."""
        now = time.time() if now is None else now
        with self.session.transaction():
            row = self._run("claim_delivery", {"now": now, "lease_until": now + lease}).fetchone()
        return None if row is None else Delivery.from_row(row)

    def delivery_sent(self, delivery_id: str, status: int, now: float | None = None) -> None:
        """Record that the receiver acknowledged a webhook."""
        with self.session.transaction():
            self._run("delivery_sent", {"id": delivery_id, "status": status,
                                                "now": time.time() if now is None else now})

    def delivery_retry(self, delivery_id: str, next_at: float | None, status: int | None,
                       error: str) -> None:
        """Record a failed attempt and when to try again; next_at None gives up (the delivery shows as failed)."""
        with self.session.transaction():
            self._run("delivery_retry", {"id": delivery_id, "next_at": next_at, "status": status,
                                                 "error": error[:500]})

    def next_delivery_due(self) -> float | None:
        """When the soonest pending webhook is due, or None."""
        value: float | None = self._run("next_delivery_due").fetchone()[0]
        return value

    def task_deliveries(self, task_id: str) -> list[Delivery]:
        """A task's webhooks (at most one: the one sent when it ended)."""
        return [Delivery.from_row(row) for row in self._run("task_deliveries", (task_id,))]

    def remove_expired(self, now: float | None = None) -> int:
        """Remove finished tasks kept for image links whose links expired; returns how many."""
        with self.session.transaction():
            return self._run("remove_expired", {"now": time.time() if now is None else now}).rowcount

    def secret(self, name: str, generate: Callable[[], str]) -> str:
        """A secret kept in the queue, generated once by whichever process asks first."""
        row = self._run("get_secret", (name,)).fetchone()
        if row is not None:
            return str(row[0])
        with self.session.transaction():
            self._run("keep_secret", {"name": name, "value": generate()})
            return str(self._run("get_secret", (name,)).fetchone()[0])

    # API keys

    def create_key(self, name: str, key_hash: str, admin: bool, priority: bool,
                   now: float | None = None) -> ApiKey:
        """Record a key by its hash; errors.Conflict when the name is taken."""
        with self.session.transaction():
            row = self._run("insert_key", {"name": name, "hash": key_hash, "admin": int(admin),
                                                   "priority": int(priority),
                                                   "now": time.time() if now is None else now}).fetchone()
        return ApiKey.from_row(row)

    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included."""
        return [ApiKey.from_row(row) for row in self._run("list_keys")]

    def revoke_key(self, name: str, now: float | None = None) -> bool:
        """Revoke a live key by name; False when no live key has it."""
        with self.session.transaction():
            return self._run("revoke_key", {"name": name, "now": time.time() if now is None else now}).rowcount == 1

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The live key with this hash."""
        row = self._run("key_by_hash", (key_hash,)).fetchone()
        return None if row is None else ApiKey.from_row(row)

    def keys_exist(self) -> bool:
        """Whether any key was ever created: from then on every request needs a live one."""
        return bool(self._run("keys_exist").fetchone()[0])

    def touch_key(self, key_id: int, now: float | None = None) -> None:
        """Record a key's last use."""
        with self.session.transaction():
            self._run("touch_key", {"id": key_id, "now": time.time() if now is None else now})

    # Idempotency

    def submit_idempotent(self, task: NewTask, key_id: int, idem_key: str, body_hash: str,
                          window: float, now: float | None = None) -> tuple[Task | None, str | None]:
        """Queue a task and remember its Idempotency-Key in one transaction, so neither exists without the other.

        A key already used within `window` seconds answers (its task, None) for the same body hash (the task is None
        when it was deleted since), and (None, its task id) for another body; a new key answers (the new task, None).
        """
        created_at = time.time() if now is None else now
        params = _task_params(task, new_task_id(), created_at)
        with self.session.transaction():
            found = self._run("find_idempotent", {"key_id": key_id, "idem_key": idem_key,
                                                          "since": created_at - window}).fetchone()
            if found is not None:
                if found[0] != body_hash:
                    return None, str(found[1])
                return self.get(str(found[1])), None
            params["fair_tag"], params["fair_start"] = self._fair_tag(task)
            created = Task.from_row(self._run("insert_task", params).fetchone())
            for image in task.inputs:
                self._run("insert_input", asdict(image) | {"task_id": created.id})
            self._run("record_idempotent", {"key_id": key_id, "idem_key": idem_key, "body_hash": body_hash,
                                                    "task_id": created.id, "now": params["created_at"]})
            return created, None

    # Retention and the files

    def expire_finished(self, before: float, now: float | None = None) -> int:
        """Remove tasks that finished before `before`, remembering their ids as expired; returns how many."""
        with self.session.transaction():
            self._run("expire_finished", {"before": before, "now": time.time() if now is None else now})
            return self._run("remove_finished", {"before": before}).rowcount

    def _size_parameters(self) -> dict[str, Any]:
        """What the statements that size image data take besides their own parameters (SQLite: its page size)."""
        return {}

    def store_bytes(self) -> int:
        """Disk bytes that images and input images take (on SQLite page-rounded)."""
        return int(self._run("store_bytes", self._size_parameters()).fetchone()[0])

    def trim_store(self, max_bytes: int, now: float | None = None, batch: int = 200) -> int:
        """Remove the oldest finished tasks until the images take at most max_bytes of disk; returns how many."""
        removed = 0
        excess = self.store_bytes() - max_bytes
        while excess > 0:
            oldest = self._run("oldest_finished", {"limit": batch} | self._size_parameters()).fetchall()
            if not oldest:
                break
            with self.session.transaction():
                for task_id, size in oldest:
                    self._run("expire_task", {"id": task_id, "now": time.time() if now is None else now})
                    self._run("delete_task", (task_id,))
                    removed += 1
                    excess -= size
                    if excess <= 0:
                        break
        return removed

    def forget_old_records(self, idempotency_before: float, expired_before: float) -> None:
        """Forget Idempotency-Keys, expired ids and request counts past their windows."""
        with self.session.transaction():
            self._run("forget_idempotent", {"before": idempotency_before})
            self._run("forget_expired", {"before": expired_before})
            self._run("forget_rate_windows", {"before": int(time.time() // 60) - 1})

    def is_expired(self, task_id: str) -> bool:
        """Whether the id belonged to a task that retention removed (remembered for a while)."""
        return self._run("is_expired", (task_id,)).fetchone() is not None

    def prune_removed_events(self, before: float) -> int:
        """Forget events of removed tasks older than `before`; returns how many."""
        with self.session.transaction():
            return self._run("prune_removed_events", {"before": before}).rowcount

    def checkpoint(self) -> None:
        """Move the WAL's pages into the database file as far as current readers allow (SQLite only)."""

    def backup(self, target: Path) -> None:
        """Copy the live queue into a new file, consistent while others write (only a store with a local file)."""
        raise NotImplementedError(f"{type(self).__name__} has no file to back up")

    def copy_from(self, source: Store) -> dict[str, int]:
        """Copy every row of another queue into this empty, migrated one; the rows copied per table."""
        raise NotImplementedError(f"{type(self).__name__} cannot take rows from {type(source).__name__}")

    def checkpoint_if_grown(self) -> None:
        """Checkpoint when the journal outgrew its bound (SQLite's WAL; nothing to do elsewhere)."""

    def give_back_space(self, pages: int) -> int:
        """Hand up to `pages` free pages back to the file system; returns how many were free (0 where the
        database reuses freed space by itself)."""
        return 0

    def check_writable(self) -> None:
        """Prove the queue takes writes (a write transaction that changes nothing); raises the storage error if not."""
        with self.session.transaction():
            self._run("touch_queue_state")

    # Quotas

    def count_requests(self, key_id: int, minute: int, n: int) -> int:
        """Add n requests of a key to its count for a (Unix) minute; returns the minute's count of every process."""
        with self.session.transaction():
            return int(self._run("count_request", {"key_id": key_id, "window": minute, "n": n}).fetchone()[0])

    def unfinished_of_key(self, key_id: int) -> int:
        """A key's waiting and processing tasks, and the upscale tasks they will queue when done."""
        return int(self._run("unfinished_of_key", {"key_id": key_id}).fetchone()[0])

    # Metrics

    def set_forecast(self, task_id: str, seconds: float, span: tuple[float, float] | None = None) -> None:
        """Keep the forecast a task got at submit and the model's range for it (the metrics and the calibration
        compare the forecast with what it took; the range stays for benchmark 14's diagnosis)."""
        low, high = span if span is not None else (None, None)
        with self.session.transaction():
            row = self._run("set_forecast", {"id": task_id, "seconds": seconds, "low": low, "high": high}).fetchone()
            if row is not None and row["status"] == "done" and row["finished_at"] is not None and seconds > 0:
                # A fast worker finished it before the forecast was written: the trigger saw no forecast to compare.
                self.observe("forecast_ratio", row["model"], (row["finished_at"] - row["created_at"]) / seconds)

    def recent_forecasts(self, limit: int) -> list[ForecastOutcome]:
        """The latest finished tasks' forecasts at submit, with the seconds they took, newest first."""
        return [ForecastOutcome.from_row(r) for r in self._run("recent_forecasts", {"limit": limit})]

    def metric_rows(self) -> dict[str, list[tuple[object, ...]]]:
        """What /metrics shows, read in one go: histogram buckets and sums, counters, tasks, pending webhooks, size."""
        return {
            "buckets": [tuple(row) for row in self._run("metric_buckets")],
            "sums": [tuple(row) for row in self._run("metric_sums")],
            "counters": [tuple(row) for row in self._run("metric_counters")],
            "tasks": [tuple(row) for row in self._run("tasks_by_status_and_model")],
            "pending_deliveries": [tuple(self._run("pending_deliveries").fetchone())],
            "pages": [tuple(self._run("database_pages").fetchone())],
        }

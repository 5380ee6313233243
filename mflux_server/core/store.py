"""All reads and writes of the queue, and the only code that runs SQL on it; rows come out typed (core.rows)."""

from __future__ import annotations

import math
import os
import secrets
import socket
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, fields

from mflux_server.core import pg
from mflux_server.core.db import FileNotWritable, execute_later, transaction
from mflux_server.core.query_files import queries
from mflux_server.core.rows import (
    ApiKey,
    Arrival,
    ClaimKey,
    Delivery,
    Event,
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

# Workers silent this long that hold no task are forgotten.
FORGET_WORKERS_AFTER = 7 * 24 * 3600.0
# How long events are kept for streams that reconnect; older ones are pruned by the workers' recovery sweep.
EVENT_RETENTION = 3600.0


def sql(name: str) -> str:
    """One named statement's SQL."""
    return queries()[name].sql


def new_task_id() -> str:
    """An unguessable id: 128 random bits, hex."""
    return secrets.token_hex(16)


# Tasks


def _task_params(task: NewTask, task_id: str, created_at: float) -> dict[str, object]:
    params = {f.name: getattr(task, f.name) for f in fields(task) if f.name not in ("inputs", "fair_cost")}
    return params | {"id": task_id, "created_at": created_at, "guidance_auto": int(task.guidance_auto), "fair_tag": 0.0,
                     "fair_start": 0.0, "input_count": len(task.inputs)}


def _fair_tag(conn: sqlite3.Connection, task: NewTask) -> tuple[float, float]:
    """The new task's place in fair claim order (inside the submit transaction): its key's next start time and
    where the key's backlog began, or with first-in first-out scheduling just past every tag given so far."""
    if task.fair_cost is None:
        tag = start = math.nextafter(float(conn.execute(sql("fifo_tag")).fetchone()[0]), math.inf)
    else:
        cost = max(task.fair_cost, 1e-6)  # a key's own tasks keep their order: every one moves its end on
        tag, start = conn.execute(sql("fair_tag"), {"key_id": task.key_id or 0, "cost": cost}).fetchone()
    conn.execute(sql("note_tag"), {"tag": tag})
    return float(tag), float(start)


def submit(conn: sqlite3.Connection, task: NewTask, now: float | None = None) -> Task:
    """Queue a waiting task, with its input images, and return its row."""
    params = _task_params(task, new_task_id(), time.time() if now is None else now)
    with transaction(conn):
        params["fair_tag"], params["fair_start"] = _fair_tag(conn, task)
        created = Task.from_row(conn.execute(sql("insert_task"), params).fetchone())
        for image in task.inputs:
            conn.execute(sql("insert_input"), asdict(image) | {"task_id": created.id})
        return created


def inputs(conn: sqlite3.Connection, task_id: str) -> dict[str, InputImage]:
    """The images a task was submitted with, by role ('image', 'image2'..'image4', 'mask'), references in order."""
    return {row["role"]: InputImage.from_row(row) for row in conn.execute(sql("task_inputs"), (task_id,))}


def submit_many(conn: sqlite3.Connection, tasks: Iterable[NewTask], now: float | None = None) -> list[str]:
    """Queue many waiting tasks in one transaction (benchmarks fill a queue this way); returns their ids."""
    created_at = time.time() if now is None else now
    ids = []
    with transaction(conn):
        for task in tasks:
            ids.append(new_task_id())
            params = _task_params(task, ids[-1], created_at)
            params["fair_tag"], params["fair_start"] = _fair_tag(conn, task)
            conn.execute(sql("insert_task"), params).fetchone()
    return ids


def get(conn: sqlite3.Connection, task_id: str) -> Task | None:
    """One task, or None."""
    row = conn.execute(sql("get_task"), (task_id,)).fetchone()
    return Task.from_row(row) if row else None


def claim_next(conn: sqlite3.Connection, worker_id: str, model: str, engine: str, now: float | None = None) -> Task | None:
    """Atomically take the highest-priority, oldest waiting task for this model."""
    params = {"worker_id": worker_id, "model": model, "engine": engine, "now": time.time() if now is None else now}
    if is_postgres(conn):
        # The write lock and the claim go out in one message as one transaction, so the lock is held for no
        # round trip at all, and between two generations the server wakes once (pg_one_message).
        row = conn.write_alone(sql("claim_next"), params).fetchone()  # type: ignore[attr-defined]
        return Task.from_row(row) if row else None
    with transaction(conn):
        row = conn.execute(sql("claim_next"), params).fetchone()
    return Task.from_row(row) if row else None


def prepare_claims(conn: sqlite3.Connection, worker_id: str, engine: str, model: str = "") -> None:
    """Prepare a PostgreSQL session for its first claim, changing nothing; nothing to do on SQLite.

    Parse and plan were 6 of the first claim's 9 ms on a 2-core VM, so the claim and the input read run once
    against nothing. Then one claim of `model` runs for real and is rolled back: its triggers' functions are
    compiled and their statements planned in this session (another 3-6 ms of the first real claim). It holds
    the write lock meanwhile, as every claim does, so no other claim sees its row taken (pg_one_message).
    """
    if not is_postgres(conn):
        return
    claim_next(conn, worker_id, "", engine)  # no task has the empty model: no row, no trigger, nothing written
    inputs(conn, "")
    if model:
        conn.rehearse(sql("claim_next"), {"worker_id": worker_id, "model": model, "engine": engine,  # type: ignore[attr-defined]
                                          "now": time.time()})


def record_progress(conn: sqlite3.Connection, task_id: str, worker_id: str, image_index: int, step: int,
                    step_at: float) -> bool:
    """Store progress; False when the task is no longer this worker's to run (canceled, recovered)."""
    cur = conn.execute(
        sql("record_progress"),
        {"id": task_id, "worker_id": worker_id, "image_index": image_index, "step": step, "step_at": step_at},
    )
    return cur.rowcount == 1


def still_mine(conn: sqlite3.Connection, task_id: str, worker_id: str) -> bool:
    """True while the task is processing under this worker."""
    return conn.execute(sql("still_mine"), {"id": task_id, "worker_id": worker_id}).fetchone() is not None


def complete(conn: sqlite3.Connection, task_id: str, worker_id: str, images: Iterable[StoredImage]) -> bool:
    """Store the images and mark the task done, in one transaction; False if it was not ours."""
    # Every statement is guarded by the task still being this worker's (canceled or recovered meanwhile: the
    # images are dropped), under the write lock; on PostgreSQL they all go out with the COMMIT, one round trip.
    with transaction(conn):
        for image in images:
            execute_later(conn, sql("insert_image_if_mine"), asdict(image) | {"task_id": task_id, "worker_id": worker_id})
        done = execute_later(conn, sql("mark_done"), {"id": task_id, "worker_id": worker_id, "now": time.time()})
    return bool(done.rowcount == 1)


def fail(conn: sqlite3.Connection, task_id: str, worker_id: str, message: str) -> bool:
    """Mark a task as error with a message; False if it was not ours."""
    with transaction(conn):
        cur = conn.execute(sql("mark_error"), {"id": task_id, "worker_id": worker_id, "now": time.time(), "error": message})
    return cur.rowcount == 1


def release(conn: sqlite3.Connection, task_id: str, worker_id: str) -> bool:
    """Put a task back in the queue (graceful stop); the interrupted attempt is not counted."""
    with transaction(conn):
        cur = conn.execute(sql("release_task"), {"id": task_id, "worker_id": worker_id})
    return cur.rowcount == 1


def cancel_or_delete(conn: sqlite3.Connection, task_id: str) -> Removal | None:
    """Cancel an unfinished task, or delete a finished one; None when there is no such task."""
    with transaction(conn):
        task = get(conn, task_id)
        if task is None:
            return None
        if task.status.unfinished:
            conn.execute(sql("cancel_task"), {"id": task_id, "now": time.time()})
            return Removal.CANCELED
        conn.execute(sql("delete_task"), (task_id,))
        return Removal.DELETED


def fetch_image(conn: sqlite3.Connection, task_id: str, index: int) -> StoredImage | None:
    """One stored image, or None."""
    row = conn.execute(sql("get_image"), (task_id, index)).fetchone()
    return StoredImage.from_row(row) if row else None


def mark_served(conn: sqlite3.Connection, task_id: str, index: int, delete_when_all_served: bool) -> bool:
    """Note an image as served; with delete, remove the task once every image was served. True if deleted."""
    with transaction(conn):
        conn.execute(sql("mark_served"), (task_id, index))
        if delete_when_all_served and conn.execute(sql("unserved_count"), (task_id,)).fetchone()[0] == 0:
            conn.execute(sql("delete_task"), (task_id,))
            return True
    return False


def generation_spans(conn: sqlite3.Connection) -> list[tuple[float, float]]:
    """(started, ended) of every stored image's generation, in order."""
    return [(row[0], row[1]) for row in conn.execute(sql("generation_spans"))]


def list_tasks(conn: sqlite3.Connection, status: Status | None, limit: int, offset: int, owner: int | None = None
               ) -> tuple[list[Task], int]:
    """A page of tasks (running, then waiting in claim order, then newest finished) and the total; only the
    owner key's when given."""
    params = {"status": status, "limit": limit, "offset": offset, "owner": owner}
    rows = conn.execute(sql("list_tasks"), params).fetchall()
    total = conn.execute(sql("count_tasks"), {"status": status, "owner": owner}).fetchone()[0]
    return [Task.from_row(r) for r in rows], total


def status_counts(conn: sqlite3.Connection) -> dict[Status, int]:
    """Tasks per status, every status present."""
    counts = {status: 0 for status in Status}
    counts.update({Status(row["status"]): row["n"] for row in conn.execute(sql("status_counts"))})
    return counts


def running_tasks(conn: sqlite3.Connection) -> list[Task]:
    """Tasks being generated right now."""
    return [Task.from_row(r) for r in conn.execute(sql("running_tasks"))]


# What the forecast reads


def read_queue(conn: sqlite3.Connection) -> QueueRead:
    """Every waiting task in claim order, with the newest seq and the change counter, from one read snapshot."""
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples: several times cheaper than sqlite3.Row for 10,000 rows
    cursor.execute("BEGIN")  # one read transaction for all three statements
    try:
        entries = [QueueEntry(*row) for row in cursor.execute(sql("waiting_queue")).fetchall()]
        max_seq = cursor.execute(sql("max_seq")).fetchone()[0]
        changes = cursor.execute(sql("queue_changes")).fetchone()[0]
    finally:
        cursor.execute("COMMIT")
    return QueueRead(entries, max_seq, changes)


def waiting_since(conn: sqlite3.Connection, model: str, seq: int) -> list[QueueEntry]:
    """Waiting tasks for a model submitted after sequence number seq."""
    return [QueueEntry(*r) for r in conn.execute(sql("waiting_since"), {"model": model, "seq": seq})]


def all_waiting_since(conn: sqlite3.Connection, seq: int) -> list[QueueEntry]:
    """Waiting tasks of every model submitted after sequence number seq."""
    return [QueueEntry(*r) for r in conn.execute(sql("all_waiting_since"), {"seq": seq})]


def waiting_front(conn: sqlite3.Connection, model: str, seq: int) -> ClaimKey | None:
    """The claim key of the first waiting task in claim order among those with seq up to seq, or None."""
    row = conn.execute(sql("waiting_front"), {"model": model, "seq": seq}).fetchone()
    return ClaimKey.of(row["priority"], row["seq"], row["fair_tag"], row["fair_start"]) if row else None


def arrivals_since(conn: sqlite3.Connection, seq: int, since: float) -> list[Arrival]:
    """Tasks submitted after sequence number seq and after time since, whatever their status now."""
    return [Arrival(*r) for r in conn.execute(sql("arrivals_since"), {"seq": seq, "since": since})]


def queue_changes(conn: sqlite3.Connection) -> int:
    """A counter that moves whenever a task leaves the waiting set other than by a claim, or re-enters it."""
    changes: int = conn.execute(sql("queue_changes")).fetchone()[0]
    return changes


def data_version(conn: sqlite3.Connection) -> int:
    """A number that changes whenever another connection commits to the database (on PostgreSQL: a NOTIFY)."""
    if is_postgres(conn):
        return pg.notifications(conn.url).version  # type: ignore[attr-defined]
    version: int = conn.execute(sql("data_version")).fetchone()[0]
    return version


def wait_for_change(conn: sqlite3.Connection, version: int, timeout: float, tick: float) -> int:
    """Wait until data_version moves from `version` or timeout seconds pass; returns it. PostgreSQL wakes on
    LISTEN/NOTIFY at once; SQLite has no notification, so the cheap pragma is read every tick seconds."""
    if is_postgres(conn):
        return pg.notifications(conn.url).wait(version, timeout)  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(max(0.0, min(tick, deadline - time.monotonic())))
        current = data_version(conn)
        if current != version or time.monotonic() >= deadline:
            return current


def is_postgres(conn: object) -> bool:
    """Whether a connection is to the PostgreSQL store (pg.PgConnection) rather than an SQLite file."""
    return getattr(conn, "dialect", "sqlite") == "postgresql"


# Timings


def record_timings(conn: sqlite3.Connection, model: str, width: int, height: int, timings: Iterable[Timing],
                   now: float | None = None) -> None:
    """Add measured seconds for one model and size to the stats the forecast is fitted to."""
    at = time.time() if now is None else now
    with transaction(conn):
        for timing in timings:
            if not timing.seconds:
                continue
            key = {"model": model, "width": width, "height": height, "kind": timing.kind}
            stored = conn.execute(sql("timing_stat"), key).fetchone()
            seconds = clip_outliers(timing.seconds, (stored[0], stored[1]) if stored else (0, 0.0))
            conn.execute(sql("record_timing"), key | {"n": len(seconds), "total": sum(seconds), "now": at})
            if timing.kind == "step":  # the measured seconds, unclipped: the metric shows what happened
                for value in timing.seconds:
                    observe(conn, "step_seconds", model, value)


def observe(conn: sqlite3.Connection, name: str, model: str, value: float) -> None:
    """Count one observation in a histogram of the metrics tables (inside the caller's transaction)."""
    params = {"name": name, "model": model, "value": value}
    conn.execute(sql("histogram_buckets"), params)
    conn.execute(sql("histogram_observe"), params)
    conn.execute(sql("histogram_sum"), params)


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


def timing_stats(conn: sqlite3.Connection) -> list[TimingStat]:
    """Every aggregated timing."""
    return [TimingStat.from_row(r) for r in conn.execute(sql("timing_stats"))]


def timing_version(conn: sqlite3.Connection) -> tuple[float, int]:
    """A cheap fingerprint of the timing stats, so a fitted model is refit only when they change."""
    row = conn.execute(sql("timing_version")).fetchone()
    return (row["version"], row["rows"])


# Workers and recovery


def _model_list(model: str, models: Sequence[str]) -> str:
    """The workers.models column: the held model first, then the others, once each."""
    return ",".join(name for name in dict.fromkeys((model, *models)) if name)


def register_worker(conn: sqlite3.Connection, engine: str, model: str, quantize: int | None,
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
    with transaction(conn):
        conn.execute(sql("register_worker"), params)
    return worker_id


def worker_loading(conn: sqlite3.Connection, worker_id: str, model: str, loading: str | None,
                   models: Sequence[str]) -> None:
    """Publish which model a worker holds, which it is loading now (None once loaded), and what it may still serve."""
    with transaction(conn):
        conn.execute(sql("worker_loading"), {"id": worker_id, "model": model, "loading": loading,
                                             "models": _model_list(model, models)})


def _limit_list(limits: Mapping[str, int]) -> str:
    """The workers.pixel_limits column: model=pixels, comma separated."""
    return ",".join(f"{model}={pixels}" for model, pixels in limits.items())


def set_pixel_limits(conn: sqlite3.Connection, worker_id: str, limits: Mapping[str, int]) -> None:
    """Publish the largest image a worker runs with each model (lowered after it ran out of memory)."""
    with transaction(conn):
        conn.execute(sql("worker_pixel_limits"), {"id": worker_id, "pixel_limits": _limit_list(limits)})


def record_load(conn: sqlite3.Connection, model: str, seconds: float, now: float | None = None) -> None:
    """Add one measured model load (and warm-up) to its stats."""
    with transaction(conn):
        conn.execute(sql("record_load"), {"model": model, "seconds": seconds, "now": time.time() if now is None else now})


def load_stats(conn: sqlite3.Connection) -> dict[str, LoadStat]:
    """Measured load times by model."""
    return {row["model"]: LoadStat.from_row(row) for row in conn.execute(sql("load_stats"))}


def mean_load_seconds(conn: sqlite3.Connection) -> dict[str, float]:
    """The mean measured load time of each model loaded here."""
    return {model: stat.total / stat.n for model, stat in load_stats(conn).items()}


def waiting_heads(conn: sqlite3.Connection) -> list[WaitingHead]:
    """The front of each model's waiting tasks per priority, with the work behind it, in one statement."""
    return [WaitingHead(r["model"], r["priority"], r["seq"], r["created_at"], r["tasks"], r["images"])
            for r in conn.execute(sql("waiting_heads"))]


def fail_waiting(conn: sqlite3.Connection, model: str, error: str, now: float | None = None) -> int:
    """Fail every waiting task of a model; returns how many."""
    with transaction(conn):
        cur = conn.execute(sql("fail_waiting"), {"model": model, "error": error, "now": time.time() if now is None else now})
        return cur.rowcount


def fail_unserved(conn: sqlite3.Connection, model: str, before: float, error: str, now: float | None = None) -> int:
    """Fail a model's waiting tasks queued before `before` (no live worker serves the model); returns how many."""
    with transaction(conn):
        cur = conn.execute(sql("fail_unserved"), {"model": model, "before": before, "error": error,
                                                  "now": time.time() if now is None else now})
        return cur.rowcount


def heartbeat(conn: sqlite3.Connection, worker_id: str, now: float | None = None) -> None:
    """Tell everyone this worker is alive (as of now)."""
    conn.execute(sql("heartbeat"), {"id": worker_id, "now": time.time() if now is None else now})


def stop_worker(conn: sqlite3.Connection, worker_id: str) -> None:
    """Mark a worker as cleanly stopped."""
    conn.execute(sql("stop_worker"), {"id": worker_id, "now": time.time()})


def live_workers(conn: sqlite3.Connection, stale_after: float) -> list[Worker]:
    """Workers that heartbeated within stale_after seconds and have not stopped."""
    return [Worker.from_row(r) for r in conn.execute(sql("live_workers"), {"since": time.time() - stale_after})]


def server_setting(conn: sqlite3.Connection, name: str) -> str | None:
    """A setting the API changed at run time (POST /api/load's default model), or None."""
    row = conn.execute(sql("server_setting"), {"name": name}).fetchone()
    return None if row is None else str(row[0])


def set_server_setting(conn: sqlite3.Connection, name: str, value: str) -> None:
    """Change a run-time setting every server process reads."""
    with transaction(conn):
        conn.execute(sql("set_server_setting"), {"name": name, "value": value})


def worker_pids(conn: sqlite3.Connection, hostname: str) -> set[int]:
    """Process ids of the workers on one machine that have not stopped."""
    return {row[0] for row in conn.execute(sql("worker_pids"), {"hostname": hostname}) if row[0] is not None}


def worker_count(conn: sqlite3.Connection) -> int:
    """Workers ever registered and not yet forgotten."""
    count: int = conn.execute(sql("worker_count")).fetchone()[0]
    return count


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(
    conn: sqlite3.Connection,
    stale_after: float,
    max_attempts: int,
    alive: Callable[[int], bool] = pid_alive,
) -> list[Recovery]:
    """Requeue tasks whose worker died (stale heartbeat, or a dead pid on this host); past max_attempts, fail them."""
    now = time.time()
    host = socket.gethostname()
    outcomes = []
    with transaction(conn):
        for held in conn.execute(sql("held_tasks")).fetchall():
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
                conn.execute(sql("fail_orphan"), params)
                outcomes.append(Recovery(held["id"], Status.ERROR))
            else:
                conn.execute(sql("requeue_orphan"), params)
                outcomes.append(Recovery(held["id"], Status.WAITING))
        conn.execute(sql("forget_old_workers"), {"before": now - FORGET_WORKERS_AFTER})
        conn.execute(sql("prune_events"), {"before": now - EVENT_RETENTION})
    return outcomes


# Events and previews


def events_after(conn: sqlite3.Connection, after: int, task_id: str | None = None, limit: int = 1000) -> list[Event]:
    """Events newer than id `after` (of one task, when given), oldest first."""
    if task_id is None:
        rows = conn.execute(sql("events_after"), {"after": after, "limit": limit})
    else:
        rows = conn.execute(sql("task_events_after"), {"after": after, "task_id": task_id, "limit": limit})
    return [Event.from_row(r) for r in rows]


def last_event_id(conn: sqlite3.Connection) -> int:
    """The newest event's id (0 when none)."""
    newest: int = conn.execute(sql("last_event_id")).fetchone()[0]
    return newest


def save_preview(conn: sqlite3.Connection, task_id: str, worker_id: str, image: int, step: int, mime: str, data: bytes,
                 now: float | None = None) -> bool:
    """Replace the task's preview; False when the task is no longer this worker's to run."""
    cur = conn.execute(sql("save_preview"), {"id": task_id, "worker_id": worker_id, "image": image, "step": step,
                                             "mime": mime, "data": data, "at": time.time() if now is None else now})
    return cur.rowcount == 1


def preview(conn: sqlite3.Connection, task_id: str) -> Preview | None:
    """The task's latest preview, if its worker has published one."""
    row = conn.execute(sql("get_preview"), (task_id,)).fetchone()
    return None if row is None else Preview.from_row(row)


# Webhooks (the outbox the deliveries_task_ended trigger fills)


def claim_delivery(conn: sqlite3.Connection, lease: float, now: float | None = None) -> Delivery | None:
    """Lease the oldest due webhook for `lease` seconds, counting the attempt; None when none is due."""
    now = time.time() if now is None else now
    with transaction(conn):
        row = conn.execute(sql("claim_delivery"), {"now": now, "lease_until": now + lease}).fetchone()
    return None if row is None else Delivery.from_row(row)


def delivery_sent(conn: sqlite3.Connection, delivery_id: str, status: int, now: float | None = None) -> None:
    """Record that the receiver acknowledged a webhook."""
    with transaction(conn):
        conn.execute(sql("delivery_sent"), {"id": delivery_id, "status": status,
                                            "now": time.time() if now is None else now})


def delivery_retry(conn: sqlite3.Connection, delivery_id: str, next_at: float | None, status: int | None,
                   error: str) -> None:
    """Record a failed attempt and when to try again; next_at None gives up (the delivery shows as failed)."""
    with transaction(conn):
        conn.execute(sql("delivery_retry"), {"id": delivery_id, "next_at": next_at, "status": status,
                                             "error": error[:500]})


def next_delivery_due(conn: sqlite3.Connection) -> float | None:
    """When the soonest pending webhook is due, or None."""
    value: float | None = conn.execute(sql("next_delivery_due")).fetchone()[0]
    return value


def task_deliveries(conn: sqlite3.Connection, task_id: str) -> list[Delivery]:
    """A task's webhooks (at most one: the one sent when it ended)."""
    return [Delivery.from_row(row) for row in conn.execute(sql("task_deliveries"), (task_id,))]


def remove_expired(conn: sqlite3.Connection, now: float | None = None) -> int:
    """Remove finished tasks kept for image links whose links expired; returns how many."""
    with transaction(conn):
        return conn.execute(sql("remove_expired"), {"now": time.time() if now is None else now}).rowcount


def secret(conn: sqlite3.Connection, name: str, generate: Callable[[], str]) -> str:
    """A secret kept in the queue, generated once by whichever process asks first."""
    row = conn.execute(sql("get_secret"), (name,)).fetchone()
    if row is not None:
        return str(row[0])
    with transaction(conn):
        conn.execute(sql("keep_secret"), {"name": name, "value": generate()})
        return str(conn.execute(sql("get_secret"), (name,)).fetchone()[0])


# API keys


def create_key(conn: sqlite3.Connection, name: str, key_hash: str, admin: bool, priority: bool,
               now: float | None = None) -> ApiKey:
    """Record a key by its hash; sqlite3.IntegrityError when the name is taken."""
    with transaction(conn):
        row = conn.execute(sql("insert_key"), {"name": name, "hash": key_hash, "admin": int(admin),
                                               "priority": int(priority),
                                               "now": time.time() if now is None else now}).fetchone()
    return ApiKey.from_row(row)


def list_keys(conn: sqlite3.Connection) -> list[ApiKey]:
    """Every key, revoked ones included."""
    return [ApiKey.from_row(row) for row in conn.execute(sql("list_keys"))]


def revoke_key(conn: sqlite3.Connection, name: str, now: float | None = None) -> bool:
    """Revoke a live key by name; False when no live key has it."""
    with transaction(conn):
        return conn.execute(sql("revoke_key"), {"name": name, "now": time.time() if now is None else now}).rowcount == 1


def key_by_hash(conn: sqlite3.Connection, key_hash: str) -> ApiKey | None:
    """The live key with this hash."""
    row = conn.execute(sql("key_by_hash"), (key_hash,)).fetchone()
    return None if row is None else ApiKey.from_row(row)


def keys_exist(conn: sqlite3.Connection) -> bool:
    """Whether any key was ever created: from then on every request needs a live one."""
    return bool(conn.execute(sql("keys_exist")).fetchone()[0])


def touch_key(conn: sqlite3.Connection, key_id: int, now: float | None = None) -> None:
    """Record a key's last use."""
    with transaction(conn):
        conn.execute(sql("touch_key"), {"id": key_id, "now": time.time() if now is None else now})


# Idempotency


def submit_idempotent(conn: sqlite3.Connection, task: NewTask, key_id: int, idem_key: str, body_hash: str,
                      window: float, now: float | None = None) -> tuple[Task | None, str | None]:
    """Queue a task and remember its Idempotency-Key in one transaction, so neither exists without the other.

    A key already used within `window` seconds answers (its task, None) for the same body hash (the task is None
    when it was deleted since), and (None, its task id) for another body; a new key answers (the new task, None).
    """
    created_at = time.time() if now is None else now
    params = _task_params(task, new_task_id(), created_at)
    with transaction(conn):
        found = conn.execute(sql("find_idempotent"), {"key_id": key_id, "idem_key": idem_key,
                                                      "since": created_at - window}).fetchone()
        if found is not None:
            if found[0] != body_hash:
                return None, str(found[1])
            return get(conn, str(found[1])), None
        params["fair_tag"], params["fair_start"] = _fair_tag(conn, task)
        created = Task.from_row(conn.execute(sql("insert_task"), params).fetchone())
        for image in task.inputs:
            conn.execute(sql("insert_input"), asdict(image) | {"task_id": created.id})
        conn.execute(sql("record_idempotent"), {"key_id": key_id, "idem_key": idem_key, "body_hash": body_hash,
                                                "task_id": created.id, "now": params["created_at"]})
        return created, None


# Retention


def expire_finished(conn: sqlite3.Connection, before: float, now: float | None = None) -> int:
    """Remove tasks that finished before `before`, remembering their ids as expired; returns how many."""
    with transaction(conn):
        conn.execute(sql("expire_finished"), {"before": before, "now": time.time() if now is None else now})
        return conn.execute(sql("remove_finished"), {"before": before}).rowcount


def _page_size(conn: sqlite3.Connection) -> int:
    """The database's page size, which sets how much disk a blob takes."""
    return int(conn.execute(sql("page_size")).fetchone()[0])


def store_bytes(conn: sqlite3.Connection) -> int:
    """Disk bytes that images and input images take (page-rounded)."""
    return int(conn.execute(sql("store_bytes"), {"page": _page_size(conn)}).fetchone()[0])


def trim_store(conn: sqlite3.Connection, max_bytes: int, now: float | None = None, batch: int = 200) -> int:
    """Remove the oldest finished tasks until the images take at most max_bytes of disk; returns how many."""
    removed = 0
    excess = store_bytes(conn) - max_bytes
    while excess > 0:
        oldest = conn.execute(sql("oldest_finished"), {"limit": batch, "page": _page_size(conn)}).fetchall()
        if not oldest:
            break
        with transaction(conn):
            for task_id, size in oldest:
                conn.execute(sql("expire_task"), {"id": task_id, "now": time.time() if now is None else now})
                conn.execute(sql("delete_task"), (task_id,))
                removed += 1
                excess -= size
                if excess <= 0:
                    break
    return removed


def forget_old_records(conn: sqlite3.Connection, idempotency_before: float, expired_before: float) -> None:
    """Forget Idempotency-Keys, expired ids and request counts past their windows."""
    with transaction(conn):
        conn.execute(sql("forget_idempotent"), {"before": idempotency_before})
        conn.execute(sql("forget_expired"), {"before": expired_before})
        conn.execute(sql("forget_rate_windows"), {"before": int(time.time() // 60) - 1})


def is_expired(conn: sqlite3.Connection, task_id: str) -> bool:
    """Whether the id belonged to a task that retention removed (remembered for a while)."""
    return conn.execute(sql("is_expired"), (task_id,)).fetchone() is not None


def prune_removed_events(conn: sqlite3.Connection, before: float) -> int:
    """Forget events of removed tasks older than `before`; returns how many."""
    with transaction(conn):
        return conn.execute(sql("prune_removed_events"), {"before": before}).rowcount


def checkpoint(conn: sqlite3.Connection) -> None:
    """Move the WAL's pages into the database file as far as current readers allow."""
    conn.execute(sql("checkpoint")).fetchall()


def give_back_space(conn: sqlite3.Connection, pages: int) -> int:
    """Hand up to `pages` free pages back to the file system (incremental vacuum); returns how many were free."""
    if is_postgres(conn):
        return 0  # autovacuum reuses freed space; nothing to hand back by hand
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free:
        # executescript steps the pragma to its end; execute() stops after the first page it frees.
        conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    return min(free, pages)


def check_writable(conn: sqlite3.Connection) -> None:
    """Prove the queue takes writes (a write transaction that changes nothing); raises the storage error if not."""
    path = getattr(conn, "path", "")
    if path and not os.access(path, os.W_OK):  # writes would still land in the WAL, which then only grows
        raise FileNotWritable(f"{path} is not writable (read-only or immutable, as after chattr +i); writes go to "
                                 "its WAL, which cannot be checkpointed and grows until it is")
    with transaction(conn):
        conn.execute(sql("touch_queue_state"))


# Quotas


def count_requests(conn: sqlite3.Connection, key_id: int, minute: int, n: int) -> int:
    """Add n requests of a key to its count for a (Unix) minute; returns the minute's count of every process."""
    with transaction(conn):
        return int(conn.execute(sql("count_request"), {"key_id": key_id, "window": minute, "n": n}).fetchone()[0])


def unfinished_of_key(conn: sqlite3.Connection, key_id: int) -> int:
    """A key's waiting and processing tasks."""
    return int(conn.execute(sql("unfinished_of_key"), {"key_id": key_id}).fetchone()[0])


# Metrics


def set_forecast(conn: sqlite3.Connection, task_id: str, seconds: float) -> None:
    """Keep the forecast a task got at submit (the metrics compare it with what it took)."""
    with transaction(conn):
        row = conn.execute(sql("set_forecast"), {"id": task_id, "seconds": seconds}).fetchone()
        if row is not None and row["status"] == "done" and row["finished_at"] is not None and seconds > 0:
            # A fast worker finished it before the forecast was written: the trigger saw no forecast to compare.
            observe(conn, "forecast_ratio", row["model"], (row["finished_at"] - row["created_at"]) / seconds)


def metric_rows(conn: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    """What /metrics shows, read in one go: histogram buckets and sums, counters, tasks, pending webhooks, size."""
    return {
        "buckets": [tuple(row) for row in conn.execute(sql("metric_buckets"))],
        "sums": [tuple(row) for row in conn.execute(sql("metric_sums"))],
        "counters": [tuple(row) for row in conn.execute(sql("metric_counters"))],
        "tasks": [tuple(row) for row in conn.execute(sql("tasks_by_status_and_model"))],
        "pending_deliveries": [tuple(conn.execute(sql("pending_deliveries")).fetchone())],
        "pages": [tuple(conn.execute(sql("database_pages")).fetchone())],
    }

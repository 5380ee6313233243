"""All reads and writes of the task queue: submit, claim, progress, complete, cancel, list, recover."""

from __future__ import annotations

import os
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from mflux_server.db import transaction

UNFINISHED = ("waiting", "processing")
FINISHED = ("done", "error", "canceled")
STATUSES = UNFINISHED + FINISHED


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    """Load the named statements of queries.sql once."""
    text = resources.files("mflux_server").joinpath("queries.sql").read_text(encoding="utf-8")
    named: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        named[name.strip()] = body.strip().rstrip(";")
    return named


def sql(name: str) -> str:
    """Return one named statement."""
    return queries()[name]


def new_task_id() -> str:
    """An unguessable id: 128 random bits, hex."""
    return secrets.token_hex(16)


def submit(conn: sqlite3.Connection, task: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Insert a waiting task and return its row."""
    row = dict(task, id=new_task_id(), created_at=now or time.time())
    row["priority"] = int(row.get("priority") or 0)
    with transaction(conn):
        conn.execute(sql("insert_task"), row).fetchone()
        return get(conn, row["id"])


def get(conn: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
    """Return one task as a dict, or None."""
    row = conn.execute(sql("get_task"), (task_id,)).fetchone()
    return dict(row) if row else None


def claim_next(conn: sqlite3.Connection, worker_id: str, model: str, engine: str) -> dict[str, Any] | None:
    """Atomically take the highest-priority, oldest waiting task for this model."""
    with transaction(conn):
        row = conn.execute(
            sql("claim_next"), {"worker_id": worker_id, "model": model, "engine": engine, "now": time.time()}
        ).fetchone()
    return dict(row) if row else None


def record_progress(
    conn: sqlite3.Connection, task_id: str, worker_id: str, image_index: int, step: int, step_at: float
) -> bool:
    """Store progress; False when the task is no longer this worker's to run (canceled, recovered)."""
    cur = conn.execute(
        sql("record_progress"),
        {"id": task_id, "worker_id": worker_id, "image_index": image_index, "step": step, "step_at": step_at},
    )
    return cur.rowcount == 1


def still_mine(conn: sqlite3.Connection, task_id: str, worker_id: str) -> bool:
    """True while the task is processing under this worker."""
    return conn.execute(sql("still_mine"), {"id": task_id, "worker_id": worker_id}).fetchone() is not None


@dataclass
class StoredImage:
    """One encoded image on its way into the database."""

    idx: int
    seed: int
    mime: str
    data: bytes
    gen_started: float
    gen_ended: float


@dataclass
class Timing:
    """Seconds measured for one kind of cost at one size."""

    kind: str
    seconds: list[float]


def _record_timings(conn: sqlite3.Connection, shape: dict[str, Any], timings: Iterable[Timing], now: float) -> None:
    for timing in timings:
        if not timing.seconds:
            continue
        conn.execute(
            sql("record_timing"),
            {
                "model": shape["model"],
                "width": shape["width"],
                "height": shape["height"],
                "kind": timing.kind,
                "n": len(timing.seconds),
                "total": sum(timing.seconds),
                "total_sq": sum(s * s for s in timing.seconds),
                "now": now,
            },
        )


def record_timings(conn: sqlite3.Connection, shape: dict[str, Any], timings: Iterable[Timing]) -> None:
    """Add measured seconds for one model and size to the stats the forecast is fitted to."""
    with transaction(conn):
        _record_timings(conn, shape, timings, time.time())


def complete(conn: sqlite3.Connection, task: dict[str, Any], worker_id: str, images: list[StoredImage]) -> bool:
    """Store the images and mark the task done, in one transaction; False if it was not ours."""
    with transaction(conn):
        if not still_mine(conn, task["id"], worker_id):
            return False  # canceled or recovered while we worked: drop the images
        for image in images:
            conn.execute(sql("insert_image"), dict(image.__dict__, task_id=task["id"]))
        conn.execute(sql("mark_done"), {"id": task["id"], "worker_id": worker_id, "now": time.time()})
    return True


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


def cancel_or_delete(conn: sqlite3.Connection, task_id: str) -> str | None:
    """Cancel an unfinished task, or delete a finished one; returns 'canceled', 'deleted' or None."""
    with transaction(conn):
        task = get(conn, task_id)
        if task is None:
            return None
        if task["status"] in UNFINISHED:
            conn.execute(sql("cancel_task"), {"id": task_id, "now": time.time()})
            return "canceled"
        conn.execute(sql("delete_task"), (task_id,))
        return "deleted"


def delete(conn: sqlite3.Connection, task_id: str) -> None:
    """Remove a task and its images."""
    with transaction(conn):
        conn.execute(sql("delete_task"), (task_id,))


def fetch_image(conn: sqlite3.Connection, task_id: str, index: int) -> dict[str, Any] | None:
    """Return one stored image (idx, seed, mime, data), or None."""
    row = conn.execute(sql("get_image"), (task_id, index)).fetchone()
    return dict(row) if row else None


def mark_served(conn: sqlite3.Connection, task_id: str, index: int, delete_when_all_served: bool) -> bool:
    """Note an image as served; with delete, remove the task once every image was served. True if deleted."""
    with transaction(conn):
        conn.execute(sql("mark_served"), (task_id, index))
        if delete_when_all_served and conn.execute(sql("unserved_count"), (task_id,)).fetchone()[0] == 0:
            conn.execute(sql("delete_task"), (task_id,))
            return True
    return False


def list_tasks(conn: sqlite3.Connection, status: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
    """Return a page of tasks (running, then waiting in claim order, then newest finished) and the total."""
    rows = conn.execute(sql("list_tasks"), {"status": status, "limit": limit, "offset": offset}).fetchall()
    total = conn.execute(sql("count_tasks"), {"status": status}).fetchone()[0]
    return [dict(r) for r in rows], total


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Count tasks per status."""
    counts = {status: 0 for status in STATUSES}
    counts.update({row["status"]: row["n"] for row in conn.execute(sql("status_counts"))})
    return counts


def running_tasks(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Tasks being generated right now."""
    return [dict(r) for r in conn.execute(sql("running_tasks"))]


def waiting_since(conn: sqlite3.Connection, model: str, seq: int) -> list[dict[str, Any]]:
    """Waiting tasks for a model submitted after sequence number seq."""
    return [dict(r) for r in conn.execute(sql("waiting_since"), {"model": model, "seq": seq})]


def waiting_front(conn: sqlite3.Connection, model: str, seq: int) -> dict[str, Any] | None:
    """The first waiting task in claim order among those with sequence number up to seq, or None."""
    row = conn.execute(sql("waiting_front"), {"model": model, "seq": seq}).fetchone()
    return dict(row) if row else None


def arrivals_since(conn: sqlite3.Connection, seq: int, since: float) -> list[dict[str, Any]]:
    """Tasks submitted after sequence number seq and after time since, whatever their status now."""
    return [dict(r) for r in conn.execute(sql("arrivals_since"), {"seq": seq, "since": since})]


def queue_changes(conn: sqlite3.Connection) -> int:
    """A counter that moves whenever a task leaves or re-enters the waiting set (not on fresh submits)."""
    return conn.execute(sql("queue_changes")).fetchone()[0]


def timing_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every aggregated timing row."""
    return [dict(r) for r in conn.execute(sql("timing_stats"))]


def timing_version(conn: sqlite3.Connection) -> tuple[float, int]:
    """A cheap fingerprint of the timing stats, so a fitted model is refit only when they change."""
    row = conn.execute(sql("timing_version")).fetchone()
    return (row["version"], row["rows"])


# Workers and recovery


def register_worker(conn: sqlite3.Connection, engine: str, model: str, quantize: int | None) -> str:
    """Record a new worker with a fresh id and return the id."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    with transaction(conn):
        conn.execute(
            sql("register_worker"),
            {
                "id": worker_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "engine": engine,
                "model": model,
                "quantize": quantize,
                "now": time.time(),
            },
        )
    return worker_id


def heartbeat(conn: sqlite3.Connection, worker_id: str) -> None:
    """Tell everyone this worker is alive."""
    conn.execute(sql("heartbeat"), {"id": worker_id, "now": time.time()})


def stop_worker(conn: sqlite3.Connection, worker_id: str) -> None:
    """Mark a worker as cleanly stopped."""
    conn.execute(sql("stop_worker"), {"id": worker_id, "now": time.time()})


def live_workers(conn: sqlite3.Connection, stale_after: float) -> list[dict[str, Any]]:
    """Workers that heartbeated within stale_after seconds and have not stopped."""
    return [dict(r) for r in conn.execute(sql("live_workers"), {"since": time.time() - stale_after})]


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
) -> list[tuple[str, str]]:
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
                outcomes.append((held["id"], "error"))
            else:
                conn.execute(sql("requeue_orphan"), params)
                outcomes.append((held["id"], "waiting"))
        conn.execute(sql("forget_old_workers"), {"before": now - 7 * 24 * 3600})
    return outcomes

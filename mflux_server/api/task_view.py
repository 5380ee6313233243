"""How a task row is shown to clients, with its queue position and forecast."""

from __future__ import annotations

import sqlite3
from typing import Any

from mflux_server import store
from mflux_server.app import forecaster, settings


def progress(task: dict[str, Any]) -> dict[str, Any]:
    """Image and step counters and an overall fraction."""
    total = task["count"] * task["steps"]
    if task["status"] == "done":
        done = total
    else:
        done = task["image_index"] * task["steps"] + task["step"] if task["status"] == "processing" else 0
    return {
        "image": min(task["image_index"] + 1, task["count"]),
        "count": task["count"],
        "step": task["step"],
        "steps": task["steps"],
        "fraction": round(done / total, 4) if total else 0.0,
    }


def live_workers(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Workers that heartbeated within --stale-after seconds."""
    return store.live_workers(conn, settings().stale_after)


def task_status(conn: sqlite3.Connection, task: dict[str, Any], live: list[dict] | None = None) -> dict[str, Any]:
    """The status view of a task: position, forecast wait and progress (pass `live` if already read)."""
    view = {k: task[k] for k in ("status", "error", "model", "engine", "seed", "width", "height", "steps", "count",
                                  "format", "attempts", "created_at", "started_at", "finished_at")}
    view["task_id"] = task["id"]
    view["priority"] = bool(task["priority"])
    view["progress"] = progress(task)
    workers = 0
    if task["status"] in store.UNFINISHED:
        workers = sum(1 for w in (live if live is not None else live_workers(conn)) if w["model"] == task["model"])
    estimate = forecaster().estimate(conn, task, workers)
    view["pos"] = estimate.pos
    view["wait_remaining"] = round(estimate.seconds, 3)
    # The original server's task_length: unfinished tasks that will finish before this one.
    view["task_length"] = estimate.pos + estimate.running
    return view

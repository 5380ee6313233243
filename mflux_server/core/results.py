"""What an ended task's result looks like to each surface: image links, timings, and the bodies sent back.

The synchronous answers (API) and the webhooks (deliverer) both build their bodies here from a task snapshot,
the same JSON object the deliveries trigger stores, so a callback carries exactly what a waiting client gets.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from mflux_server.core.api_keys import link_signature
from mflux_server.core.rows import Task

# Snapshot keys: what migration 0007's trigger copies out of the task row.
SNAPSHOT_KEYS = ("id", "status", "error", "model", "prompt", "seed", "count", "width", "height", "format",
                 "created_at", "started_at", "finished_at", "link_base")


def snapshot(task: Task) -> dict[str, Any]:
    """A task as the deliveries trigger records it."""
    return {key: str(task.status) if key == "status" else getattr(task, key) for key in SNAPSHOT_KEYS}


def image_url(task: dict[str, Any], index: int, keep: bool, secret: str | None = None) -> str:
    """A link to one image on this server; keep=True links do not consume the image (they live until expiry).
    Signed with the links secret, it opens without an API key (for webhook receivers and OpenAI url clients)."""
    query: dict[str, Any] = {"task_id": task["id"], "index": index} | ({"delete": "false"} if keep else {})
    if secret is not None:
        query["sig"] = link_signature(secret, task["id"], index, delete=not keep)
    return f"{(task['link_base'] or '/').rstrip('/')}/api/image?{urlencode(query)}"


def inference_seconds(task: dict[str, Any]) -> float | None:
    """Seconds the worker spent on the task (claim to finish), or None if it never ran."""
    if task["started_at"] is None or task["finished_at"] is None:
        return None
    seconds: float = task["finished_at"] - task["started_at"]
    return round(max(0.0, seconds), 3)


def trace_id(task_id: str) -> str:
    """AceDataCloud's trace_id for a task: a UUID derived from its id, so answers and callbacks agree."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mflux-server:{task_id}"))


def ace_task_id(task_id: str) -> str:
    """Our task id in AceDataCloud's UUID form (the 32 hex digits, hyphenated); other ids are left as they are."""
    try:
        return str(uuid.UUID(hex=task_id))
    except ValueError:
        return task_id


def native_event(task: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """The native webhook body, in Standard Webhooks' recommended shape (type, timestamp, data)."""
    done = task["status"] == "done"
    return {
        "type": f"task.{task['status']}",
        "timestamp": datetime.fromtimestamp(task["finished_at"] or 0, UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "task_id": task["id"], "status": task["status"], "error": task["error"], "model": task["model"],
            "prompt": task["prompt"], "width": task["width"], "height": task["height"],
            "images": [{"index": i, "seed": task["seed"] + i, "url": image_url(task, i, keep=False, secret=secret)}
                       for i in range(task["count"])] if done else [],
            "timings": {"inference": inference_seconds(task)},
        },
    }


def acedata_result(task: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """AceDataCloud's result body: the synchronous answer, and what its callback_url receives."""
    ids = {"task_id": ace_task_id(task["id"]), "trace_id": trace_id(task["id"])}
    if task["status"] != "done":
        message = task["error"] or f"the task was {task['status']}"
        return {"success": False, **ids, "error": {"code": "api_error", "message": message}}
    per_image = inference_seconds(task)
    if per_image is not None:
        per_image = round(per_image / task["count"], 3)
    return {"success": True, **ids, "data": [
        {"prompt": task["prompt"], "image_url": image_url(task, i, keep=True, secret=secret), "seed": task["seed"] + i,
         "timings": {"inference": per_image}} for i in range(task["count"])]}


def webhook_body(surface: str, task: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """The body a task's callback_url receives, in the shape of the surface it was submitted through."""
    return acedata_result(task, secret) if surface == "acedata" else native_event(task, secret)

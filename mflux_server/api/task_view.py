"""How a task is shown to clients, with its queue position and forecast, and the lookup-or-404 of a task."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mflux_server.api.auth import may_see
from mflux_server.api.context import db, forecaster, settings
from mflux_server.api.errors import abort_json
from mflux_server.api.generation_schemas import TASK_ID_LENGTH
from mflux_server.core.rows import Status, Task, UpscaleAfter, Worker
from mflux_server.forecast.queue_view import Estimate
from mflux_server.store import Store

NOT_FOUND = "no task with this id (never existed, or deleted after its image was served)"


def get_task_or_404(task_id: str) -> Task:
    """The task; aborts with a JSON 422 for an id no endpoint takes, or a 404 when none or another key's
    (task_not_found), or when retention removed it (task_expired)."""
    if not 1 <= len(task_id) <= TASK_ID_LENGTH:
        abort_json(422, errors={"view_args": {"task_id": [f"Length must be between 1 and {TASK_ID_LENGTH}."]}})
    task = db().get(task_id)
    if task is None or not may_see(task.key_id):  # another key's task is as absent as a missing one
        if task is None and db().is_expired(task_id):
            abort_json(404, code="task_expired", field="task_id",
                       message=f"task {task_id!r} finished over --keep-finished ago and was removed with its images")
        abort_json(404, code="task_not_found", field="task_id", message=f"no task with id {task_id!r}")
    return task


def progress(task: Task) -> dict[str, Any]:
    """Image and step counters and an overall fraction."""
    total = task.count * task.steps
    if task.status is Status.DONE:
        done = total
    elif task.status is Status.PROCESSING:
        done = task.image_index * task.steps + task.step
    else:
        done = 0
    return {
        "image": min(task.image_index + 1, task.count),
        "count": task.count,
        "step": task.step,
        "steps": task.steps,
        "fraction": round(done / total, 4) if total else 0.0,
    }


def live_workers(queue: Store) -> list[Worker]:
    """Workers that heartbeated within --stale-after seconds."""
    return queue.live_workers(settings().stale_after)


def recent_live_workers(queue: Store) -> list[Worker]:
    """The live workers for a status view: on PostgreSQL as of the last change, or at most a second ago."""
    return forecaster().reads.get(queue, ("live", settings().stale_after), lambda: live_workers(queue))


def summary(task: Task) -> dict[str, Any]:
    """The fields every view of a task shows, without the forecast."""
    return {
        "task_id": task.id, "status": task.status, "prompt": task.prompt, "error": task.error, "model": task.model,
        "engine": task.engine, "seed": task.seed, "width": task.width, "height": task.height, "steps": task.steps,
        "count": task.count, "format": task.format, "priority": bool(task.priority), "attempts": task.attempts,
        "created_at": task.created_at, "started_at": task.started_at, "finished_at": task.finished_at,
        "progress": progress(task), "owner_key": task.key_id,  # owner_key: for filtering; no schema shows it
        "loras": [{"name": name, "scale": scale} for name, scale in task.lora_set],
        "control": control_view(task),
        "image_strengths": list(task.strengths),
        "metadata": {"generation_data": True, "prompt": not task.private,
                     "digital_source_type": "trainedAlgorithmicMedia",
                     "content_credentials": signed_images(task)},
    } | webhook_view(task) | upscale_view(task)


def upscale_view(task: Task) -> dict[str, Any]:
    """A task's upscale (asked with it) and the tasks doing it, or the image an upscale task enlarges; {} for neither."""
    if task.upscales_task is not None:
        return {"upscales": {"task_id": task.upscales_task, "index": task.upscales_index}}
    after = UpscaleAfter.of(task.then_upscale)
    if after is None:
        return {}
    queued = db().upscale_tasks_of(task.id) if task.status is Status.DONE else []
    return {"upscale": {"upscaler": after.model, "width": after.width, "height": after.height, "steps": after.steps,
                        "task_ids": queued}}


def signed_images(task: Task) -> list[bool]:
    """Whether each stored image of a done task carries signed Content Credentials ([] before it is done)."""
    if task.status is not Status.DONE:
        return []
    return list(db().image_credentials(task.id).values())


def control_view(task: Task) -> dict[str, Any] | None:
    """How the task uses its control image, or None without one."""
    control = task.control_settings
    return None if control is None else {"type": control.kind, "strength": control.strength,
                                         "preprocess": control.preprocess}


def webhook_view(task: Task) -> dict[str, Any]:
    """The task's webhook and its delivery ({} for a task without callback_url)."""
    if task.callback_url is None:
        return {}
    sent = db().task_deliveries(task.id)
    if not sent:
        return {"webhook": {"url": task.callback_url, "state": "pending", "attempts": 0, "next_attempt_at": None,
                            "last_status": None, "last_error": None, "delivered_at": None}}
    delivery = sent[-1]
    return {"webhook": {"url": delivery.url, "state": str(delivery.state), "attempts": delivery.attempts,
                        "last_status": delivery.last_status, "last_error": delivery.last_error,
                        "next_attempt_at": delivery.next_at if delivery.state == "pending" else None,
                        "delivered_at": delivery.delivered_at}}


def task_status(queue: Store, task: Task, live: list[Worker] | None = None) -> dict[str, Any]:
    """The status view of a task: position, forecast wait and its range, progress (pass `live` if already read)."""
    return task_status_and_estimate(queue, task, live)[0]


def task_status_and_estimate(queue: Store, task: Task, live: list[Worker] | None = None) -> tuple[dict[str, Any], Estimate]:
    """The status view of a task (as task_status) and the estimate it shows, with the range before calibration.

    Without a live worker that can run it, `waiting_for_worker` (or, for a running task whose worker stopped
    heartbeating, `worker_lost`) says so, and the forecast is the time the task takes once a worker runs it;
    wait_remaining stays a number, since the original server's clients compute with it.
    """
    view = summary(task)
    workers = 0
    forecast_as = task
    if task.status.unfinished:
        live = recent_live_workers(queue) if live is None else live
        workers = sum(1 for w in live if w.model == task.model and not w.loading)
        if task.status is Status.PROCESSING and not any(w.id == task.worker_id for w in live):
            view["worker_lost"] = True
            view["note"] = (f"its worker stopped heartbeating over {settings().stale_after:g} s ago: the task goes back to "
                            f"the queue and is retried from the start when a worker runs (started {task.attempts} time(s) "
                            "so far); the forecast counts from then")
            forecast_as = replace(task, status=Status.WAITING)  # it keeps its place at the front of the queue
        elif task.status is Status.WAITING and not any(task.model in w.servable for w in live):
            view["waiting_for_worker"] = True
            view["note"] = (f"no live worker serves {task.model}" if live else "no worker is running") + \
                ": the task keeps its place and starts when one does; the forecast counts from then"
    estimate = forecaster().estimate(queue, forecast_as, workers, live=live or ())
    view["pos"] = estimate.pos
    view["wait_remaining"] = round(estimate.seconds, 3)
    view["wait_range"] = [round(estimate.low, 3), round(estimate.high, 3)]
    # The original server's task_length: unfinished tasks that will finish before this one.
    view["task_length"] = estimate.pos + estimate.running
    return view, estimate

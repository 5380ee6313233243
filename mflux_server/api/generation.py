"""The original mflux-server's endpoints: generate, status, image (at /api/... and at /generate, /status, /image)."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from flask import Response, request
from flask_smorest import Blueprint

from mflux_server.api.context import conn, settings
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.generation_schemas import (
    FORMATS,
    MAX_SEED,
    GenerateRequest,
    GenerateResponse,
    ImageQuery,
    StatusQuery,
    TaskStatus,
)
from mflux_server.api.task_view import (
    NOT_FOUND,
    get_task_or_404,
    live_workers,
    task_status,
)
from mflux_server.core import catalog, store
from mflux_server.core.rows import NewTask, Status, Worker

blp = Blueprint("generation", __name__, description="Submit a prompt, follow it, fetch its images.")


@blp.before_request
def require_json_body() -> None:
    """A POST must carry JSON; without this a form post would read as 'prompt missing'."""
    if request.method == "POST" and not request.is_json:
        abort_json(415, message="send the request body as JSON with Content-Type: application/json")


def served_models(live: list[Worker]) -> set[str]:
    """Models some live worker runs, plus the configured default."""
    default = catalog.resolve(settings().model)
    return {w.model for w in live} | ({default.name} if default else set())


@blp.route("/generate", methods=["POST"])
@blp.arguments(GenerateRequest(), location="json")
@blp.response(200, GenerateResponse)
@blp.alt_response(422, schema=ErrorSchema, description="a field is invalid; the body names it and the rule")
def generate(body: dict[str, Any]) -> dict[str, Any]:
    """Queue a text-to-image task.

    Answers at once with the task id, the unfinished tasks ahead of it (`task_length`) and the forecast
    seconds until its images are done (`expected_time_seconds`).
    """
    info = catalog.resolve(body["model"] or settings().model)
    live = live_workers(conn())  # read once: it decides the model check and the forecast's worker count
    served = served_models(live)
    if info is None or info.name not in served:
        rule = f"no worker serves {body['model']!r}; served models: {', '.join(sorted(served))}"
        abort_json(422, errors={"json": {"model": [rule]}})
    seed = body["seed"]
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - body["count"] + 2)
    elif seed + body["count"] - 1 > MAX_SEED:
        abort_json(422, errors={"json": {"seed": [f"seed + count - 1 must be at most {MAX_SEED}"]}})
    task = NewTask(prompt=body["prompt"], model=info.name, width=body["width"], height=body["height"],
                   steps=body["steps"] or info.default_steps, guidance=body["guidance"], seed=seed, count=body["count"],
                   format=body["format"], quality=body["quality"], priority=int(body["priority"]))
    created = store.submit(conn(), task)
    view = task_status(conn(), created, live)
    view["expected_time_seconds"] = view["wait_remaining"]
    return view


@blp.route("/status", methods=["GET"])
@blp.arguments(StatusQuery(), location="query")
@blp.response(200, TaskStatus)
@blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
def status(query: dict[str, Any]) -> dict[str, Any]:
    """A task's status, queue position, progress and forecast wait in seconds."""
    return task_status(conn(), get_task_or_404(query["task_id"]))


@blp.route("/image", methods=["GET"])
@blp.arguments(ImageQuery(), location="query")
@blp.response(
    200,
    description="the image bytes (image/jpeg, image/png or image/webp), or base64 text with base64=true",
    content_type="image/jpeg",
)
@blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
@blp.alt_response(409, schema=ErrorSchema, description="the task has no image yet; the body carries its status")
def image(query: dict[str, Any]) -> Response:
    """Fetch a finished task's image; by default the task is removed once all its images were served."""
    task = get_task_or_404(query["task_id"])
    if task.status is not Status.DONE:
        abort_json(
            409,
            code="image_not_ready",
            field="task_id",
            status=str(task.status),
            message=f"task {task.id} is {task.status}, not done" + (f": {task.error}" if task.error else ""),
        )
    if query["index"] >= task.count:
        abort_json(422, errors={"query": {"index": [f"must be from 0 to {task.count - 1}, got {query['index']}"]}})
    stored = store.fetch_image(conn(), task.id, query["index"])
    if stored is None:
        abort_json(404, code="image_not_found", field="index", message=f"image {query['index']} of task {task.id} was not kept")
    store.mark_served(conn(), task.id, query["index"], query["delete"])
    extension = next(name for name, mime in FORMATS.items() if mime == stored.mime).lower()
    headers = {
        "Content-Disposition": f'inline; filename="{task.id}-{query["index"]}.{extension}"',
        "X-Seed": str(stored.seed),
        "Cache-Control": "no-store",
    }
    if query["base64"]:
        return Response(base64.b64encode(stored.data), mimetype="text/plain", headers=headers)
    return Response(stored.data, mimetype=stored.mime, headers=headers)

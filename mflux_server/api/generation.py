"""The original mflux-server's endpoints: generate, status, image (at /api/... and at /generate, /status, /image)."""

from __future__ import annotations

import base64
import logging
from typing import Any

from flask import Response, request
from flask_smorest import Blueprint

from mflux_server.api.auth import by_cookie
from mflux_server.api.context import db
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.generation_schemas import FORMATS, GenerateRequest, GenerateResponse, ImageQuery, StatusQuery, TaskStatus
from mflux_server.api.request_body import StrictParser
from mflux_server.api.submission import queue_task, require_json_body
from mflux_server.api.task_view import NOT_FOUND, get_task_or_404, task_status, task_status_and_estimate
from mflux_server.core.rows import Status, Task, Worker
from mflux_server.store import storage_problem

log = logging.getLogger("mflux_server")
blp = Blueprint("generation", __name__, description="Submit a prompt, follow it, fetch its images.")
blp.ARGUMENTS_PARSER = StrictParser()
blp.before_request(require_json_body)


@blp.route("/generate", methods=["POST"])
@blp.arguments(GenerateRequest(), location="json")
@blp.response(200, GenerateResponse)
@blp.alt_response(422, schema=ErrorSchema, description="a field is invalid; the body names it and the rule")
@blp.alt_response(409, schema=ErrorSchema, description="model_not_served: workers are running and none serves the model")
def generate(body: dict[str, Any]) -> dict[str, Any]:
    """Queue a generation task: text-to-image, image-to-image, edit or inpaint, as the model allows.

    The body is JSON, or multipart/form-data with the same fields (image and mask as file parts).
    Answers at once with the task id, the unfinished tasks ahead of it (`task_length`) and the forecast
    seconds until its images are done (`expected_time_seconds`).
    """
    return submitted_view(*queue_task(body))


def submitted_view(created: Task, live: list[Worker]) -> dict[str, Any]:
    """A new task's answer: its status with the original server's expected_time_seconds, the forecast recorded."""
    view, estimate = task_status_and_estimate(db(), created, live)
    view["expected_time_seconds"] = view["wait_remaining"]
    view["expected_time_range"] = view["wait_range"]
    if not view.get("waiting_for_worker") and view["wait_remaining"] > 0:
        try:
            # For the forecast-error metric, and the calibration of later ranges.
            db().set_forecast(created.id, view["wait_remaining"], (estimate.model_low, estimate.model_high))
        except Exception as error:  # the task is queued: a metric must not turn that into an error answer
            if storage_problem(error) is None:
                raise
            log.warning("task %s queued; its forecast was not recorded (%s)", created.id, error)
    return view


@blp.route("/status", methods=["GET"])
@blp.arguments(StatusQuery(), location="query")
@blp.response(200, TaskStatus)
@blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
def status(query: dict[str, Any]) -> dict[str, Any]:
    """A task's status, queue position, progress and forecast wait in seconds."""
    return task_status(db(), get_task_or_404(query["task_id"]))


@blp.route("/image", methods=["GET"])
@blp.arguments(ImageQuery(), location="query")
@blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
@blp.alt_response(409, schema=ErrorSchema, description="the task has no image yet; the body carries its status")
@blp.doc(responses={"200": {"description": "the image bytes (image/jpeg, image/png or image/webp), or base64 text "
                                           "with base64=true",
                            "content": {**{mime: {"schema": {"type": "string", "format": "binary"}}
                                           for mime in sorted(set(FORMATS.values()))},
                                        "text/plain": {"schema": {"type": "string", "format": "byte"}}}}})
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
    stored = db().fetch_image(task.id, query["index"])
    if stored is None:
        abort_json(404, code="image_not_found", field="index", message=f"image {query['index']} of task {task.id} was not kept")
    if request.method == "GET":  # HEAD (curl -I, a chat app's link preview) must not consume the image
        # The web UI's cookie rides along on any page's <img>: it reads, it never removes a task.
        db().mark_served(task.id, query["index"], query["delete"] and not by_cookie())
    extension = next(name for name, mime in FORMATS.items() if mime == stored.mime).lower()
    headers = {
        "Content-Disposition": f'inline; filename="{task.id}-{query["index"]}.{extension}"',
        "X-Seed": str(stored.seed),
        "Cache-Control": "no-store",
    }
    if query["base64"]:
        return Response(base64.b64encode(stored.data), mimetype="text/plain", headers=headers)
    return Response(stored.data, mimetype=stored.mime, headers=headers)

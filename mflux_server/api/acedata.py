"""AceDataCloud's Flux API (POST /flux/images, POST /flux/tasks) onto the one queue, callbacks included."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from flask_smorest import Blueprint

from mflux_server.api import compat
from mflux_server.api.auth import link_secret, may_see
from mflux_server.api.context import db, settings
from mflux_server.api.errors import abort_json, register_envelope, renamed
from mflux_server.api.submission import queue_task, require_json_body
from mflux_server.api.task_view import task_status
from mflux_server.core import catalog, outbound
from mflux_server.core.results import ace_task_id, acedata_result, snapshot, trace_id
from mflux_server.core.rows import Task

blp = Blueprint("acedata", __name__, description="AceDataCloud's Flux API: generate or edit, waiting or with "
                "callback_url, and task retrieval.")
blp.before_request(require_json_body)

# Their model names, onto ours (our own names are taken too).
MODELS = {"flux-dev": "dev", "flux-schnell": "schnell", "flux-kontext-pro": "dev-kontext",
          "flux-kontext-max": "dev-kontext"}
DEFAULT_MODEL = "flux-dev"
KONTEXT_TEXT_TO_IMAGE = "dev"  # FLUX.1 dev, the text-to-image model Kontext is built on
ACTIONS = ("generate", "edit")
IMAGE_PARAMS = {"action", "prompt", "model", "size", "count", "image_url", "callback_url"}
TASK_PARAMS = {"action", "id", "ids"}
NAMES = {"width": "size", "height": "size", "image": "image_url", "model": "model"}
MAX_BATCH = 100
# Their error codes by HTTP status; a bad parameter is a 400 there.
CODES = {400: "bad_request", 401: "invalid_token", 403: "forbidden", 404: "not_found", 429: "too_many_requests"}


def envelope(payload: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
    """AceDataCloud's error body: {"success": false, "error": {"code", "message"}, "trace_id"}."""
    field, message = renamed(payload, NAMES)
    status = 400 if status in (413, 415, 422) else status
    code = payload.get("code") if payload.get("code") == "api_not_implemented" else \
        CODES.get(status, "api_error" if status >= 500 else str(payload.get("code")))
    return {"success": False, "error": {"code": code, "message": message, "field": field},
            "trace_id": str(uuid.uuid4())}, status


register_envelope("/flux/", envelope)


def local_model(name: Any) -> str:
    """Their model name as ours; an unknown one is a 400 that lists theirs."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, str):
        compat.refuse("model", "must be a string")
    if name.lower() in MODELS:
        return MODELS[name.lower()]
    if catalog.resolve(name) is not None:
        return name
    compat.refuse("model", f"unknown model {name[:60]!r}; use one of {', '.join(MODELS)}", status=400)


def input_image(value: Any) -> str:
    """image_url as base64 image data: a data: URL as it is, an http(s) URL fetched when the operator allows it."""
    if not isinstance(value, str):
        compat.refuse("image_url", "must be a URL string")
    if value.strip().lower().startswith("data:"):
        return value
    if not settings().fetch_image_urls:
        compat.refuse("image_url", "this server does not fetch http(s) URLs (the operator can allow it with "
                                   "--fetch-image-urls); send the image as a data: URL", status=400)
    try:
        data = outbound.fetch(value, settings().fetch_allow_private, settings().max_input_bytes, settings().fetch_timeout)
    except (outbound.TargetRefused, outbound.FetchFailed) as error:
        compat.refuse("image_url", str(error), status=400)
    return base64.b64encode(data).decode("ascii")


@blp.route("/images", methods=["POST"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
    "action": {"type": "string", "enum": list(ACTIONS)}, "prompt": {"type": "string"},
    **compat.nullable({"model": "string", "size": "string", "count": "integer", "image_url": "string",
                       "callback_url": "string"})}}}}},
    responses={"200": {"description": "{success, task_id, trace_id, data: [{prompt, image_url, seed, timings}]}, or "
                                      "{task_id} at once with callback_url"}, **compat.error_docs(*compat.SYNC_ERRORS)})
def images() -> dict[str, Any]:
    """Generate or edit images; without callback_url the answer waits for them."""
    body = compat.json_object()
    compat.refuse_unknown(body, IMAGE_PARAMS)
    action = body.get("action", "generate")
    if action not in ACTIONS:
        abort_json(400, code="api_not_implemented", field="action",
                   message=f"action: {str(action)[:40]!r} is not implemented; use generate or edit")
    model = local_model(body.get("model"))
    if action == "generate" and body.get("image_url") is None and model == MODELS["flux-kontext-pro"]:
        model = KONTEXT_TEXT_TO_IMAGE  # their examples generate with a Kontext model; Kontext itself needs an image
    width, height = compat.size(body.get("size"), "size")
    native: dict[str, Any] = {"prompt": body.get("prompt"), "model": model, "width": width, "height": height,
                              "count": body.get("count", 1), "callback_url": body.get("callback_url"), "format": "PNG"}
    if action == "edit":
        if body.get("image_url") is None:
            compat.refuse("image_url", "is required for action edit: the image to edit")
        native["image"] = input_image(body["image_url"])
        native["count"] = 1  # count applies to generation only, as their documentation says
    elif body.get("image_url") is not None:
        native["image"] = input_image(body["image_url"])
    task, _ = queue_task(compat.native_body(native, NAMES), surface="acedata", keep_for=settings().link_ttl)
    if task.callback_url:
        return {"task_id": ace_task_id(task.id)}
    ended = compat.wait_or_fail(task)
    return acedata_result(snapshot(ended), link_secret())


def task_record(task: Task) -> dict[str, Any]:
    """A task as their tasks API shows it: the request, and the response once it ended (with queue state before)."""
    info = catalog.resolve_reference(task.model)
    record: dict[str, Any] = {
        "id": ace_task_id(task.id), "trace_id": trace_id(task.id), "created_at": task.created_at,
        "finished_at": task.finished_at, "status": str(task.status),
        "request": {"action": "edit" if info is not None and info.info.needs_image else "generate", "prompt": task.prompt,
                    "model": task.model, "size": f"{task.width}x{task.height}", "count": task.count,
                    "callback_url": task.callback_url},
    }
    if task.status.unfinished:
        view = task_status(db(), task)
        record.update(position=view["pos"], wait_remaining=view["wait_remaining"])
    else:
        record["response"] = acedata_result(snapshot(task), link_secret())
        if task.started_at is not None and task.finished_at is not None:
            record["duration"] = round(task.finished_at - task.started_at, 3)
    return record


def find(task_id: Any, field: str) -> Task | None:
    """A task by our id or its UUID form."""
    if not isinstance(task_id, str) or not 1 <= len(task_id) <= 64:
        compat.refuse(field, "must be a task id string")
    task = db().get(task_id.replace("-", "")) or db().get(task_id)
    return task if task is not None and may_see(task.key_id) else None


@blp.route("/tasks", methods=["POST"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["retrieve", "retrieve_batch"]}, "id": {"type": "string"},
    "ids": {"type": "array", "items": {"type": "string"}}}}}}},
    responses={"200": {"description": "one task record, or {items, count} for retrieve_batch"},
               **compat.error_docs(400, 404, 413, 415, 503)})
def tasks() -> dict[str, Any]:
    """Retrieve a task by id, or several by ids with action retrieve_batch."""
    body = compat.json_object()
    compat.refuse_unknown(body, TASK_PARAMS)
    action = body.get("action", "retrieve_batch" if "ids" in body else "retrieve")
    # Every field sent is checked, whichever the action reads: a wrong type is a 400, never silently ignored.
    if body.get("id") is not None and not isinstance(body["id"], str):
        compat.refuse("id", "must be a task id string")
    if body.get("ids") is not None and not (isinstance(body["ids"], list) and all(isinstance(i, str) for i in body["ids"])):
        compat.refuse("ids", f"must be a list of 1 to {MAX_BATCH} task ids")
    if action == "retrieve":
        task = find(body.get("id"), "id")
        if task is None:
            abort_json(404, code="not_found", field="id", message=f"id: no task {body.get('id')!r}")
        return task_record(task)
    if action != "retrieve_batch":
        abort_json(400, code="api_not_implemented", field="action",
                   message=f"action: {str(action)[:40]!r} is not implemented; use retrieve or retrieve_batch")
    ids = body.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BATCH:
        compat.refuse("ids", f"must be a list of 1 to {MAX_BATCH} task ids")
    found = [task for task_id in ids if (task := find(task_id, "ids")) is not None]
    return {"items": [task_record(task) for task in found], "count": len(found)}

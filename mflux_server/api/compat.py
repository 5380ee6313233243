"""What the compatible surfaces (OpenAI Images, AceDataCloud, NebulaBlock) share: reading their bodies, turning
them into a native generate body that the native rules check, and taking the images of an ended task."""

from __future__ import annotations

import base64
import re
from typing import Any, NoReturn

import marshmallow as ma
from flask import request

from mflux_server.api.context import db, settings
from mflux_server.api.draining import draining
from mflux_server.api.errors import abort_json, flatten_messages
from mflux_server.api.generation_schemas import GenerateRequest
from mflux_server.api.request_body import parse_json_body
from mflux_server.api.waiting import wait_for_end
from mflux_server.core.rows import Status, Task

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")
RATIO_PIXELS = 1024 * 1024  # an aspect ratio gets about a megapixel, as the hosted Flux APIs give


def nullable(types: dict[str, str]) -> dict[str, dict[str, object]]:
    """OpenAPI properties of optional parameters that may be null: these APIs take null as left out."""
    return {name: {"type": kind, "nullable": True} for name, kind in types.items()}


def error_docs(*statuses: int) -> dict[str, Any]:
    """OpenAPI responses for a surface's errors (each in that surface's own envelope)."""
    return {str(status): {"description": ERROR_MEANINGS[status],
                          "content": {"application/json": {"schema": {"type": "object"}}}} for status in statuses}


ERROR_MEANINGS = {
    400: "a parameter is missing or invalid; the body names it",
    404: "no such task",
    405: "method not allowed",
    409: "no live worker serves the model, or the task was canceled",
    413: "the body is too large",
    415: "the body is not JSON (or multipart/form-data)",
    500: "the generation failed",
    503: "the queue cannot be written, or this server process is stopping (the task goes on; its id is in the message)",
    504: "the images were not ready within --sync-timeout; the task goes on",
    507: "the queue's disk is full",
}
SYNC_ERRORS = (400, 409, 413, 415, 500, 503, 504, 507)


def refuse(field: str, rule: str, status: int = 422) -> NoReturn:
    """Stop with an error naming a field in the surface's own name (the envelope keeps it as it is)."""
    abort_json(status, field=field, message=f"{field}: {rule}", errors={"json": {field: [rule]}}, named=True)


def json_object() -> dict[str, Any]:
    """The request's JSON body as an object (strictly parsed), or a 400 that says what it is instead."""
    body = parse_json_body(request.get_data(cache=True)) if request.get_data(cache=True) else None
    if not isinstance(body, dict):
        abort_json(400, code="invalid_json", message="the request body must be a JSON object")
    return body


def refuse_unknown(body: dict[str, Any], known: set[str]) -> None:
    """Name the first parameter this surface does not define."""
    for name in body:
        if name not in known:
            refuse(name, "is not a parameter of this endpoint (unrecognized request argument)")


def size(value: Any, field: str, multiple: int = 16) -> tuple[int | None, int | None]:
    """'1024x768' as (width, height); an aspect ratio '16:9' as about a megapixel; 'auto' or None as (None, None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None, None
    if not isinstance(value, str):
        refuse(field, f"must be a string such as '1024x1024' or 'auto', got {type(value).__name__}")
    if match := _SIZE.match(value):
        return int(match[1]), int(match[2])
    if match := _RATIO.match(value):
        across, down = int(match[1]), int(match[2])
        if across and down:
            scale = (RATIO_PIXELS / (across * down)) ** 0.5
            return (max(multiple, round(across * scale / multiple) * multiple),
                    max(multiple, round(down * scale / multiple) * multiple))
    refuse(field, f"must be WIDTHxHEIGHT (such as '1024x1024'), an aspect ratio (such as '16:9') or 'auto', got {value[:40]!r}")


def native_body(native: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Load a native generate body with the native rules; a failure names the surface's parameter."""
    try:
        loaded: dict[str, Any] = GenerateRequest().load({k: v for k, v in native.items() if v is not None})
    except ma.ValidationError as error:
        field, rule = flatten_messages(error.messages)[0]
        refuse(names.get(field, field), rule)
    return loaded


def wait_or_fail(task: Task) -> Task:
    """Wait (up to --sync-timeout) for the task to end; a timeout, failure or cancel becomes an error answer."""
    ended = wait_for_end(task.id, settings().sync_timeout)
    if ended is None:
        abort_json(404, code="task_not_found", field=None, message=f"task {task.id} was deleted before it ended")
    if ended.status is Status.DONE:
        return ended
    if ended.status.unfinished and draining():
        abort_json(503, code="server_stopping", field=None, headers={"Retry-After": "5"},
                   message=f"this server process is stopping, so it stops waiting; the task goes on as {task.id} "
                           f"(GET /api/status?task_id={task.id})")
    if ended.status.unfinished:
        abort_json(504, code="timeout", field=None, message=f"the images were not ready within "
                   f"{settings().sync_timeout:g} s; the task goes on as {task.id} (GET /api/status?task_id={task.id})")
    if ended.status is Status.CANCELED:
        abort_json(409, code="task_canceled", field=None, message=f"task {task.id} was canceled")
    abort_json(500, code="generation_failed", field=None, message=f"the generation failed: {ended.error}")


def take_images(task: Task) -> list[tuple[bytes, int]]:
    """The ended task's images and seeds, in order; the task is removed once they are taken (the answer has them)."""
    taken = []
    for index in range(task.count):
        image = db().fetch_image(task.id, index)
        if image is not None:
            taken.append((image.data, image.seed))
    for index in range(task.count):
        db().mark_served(task.id, index, True)
    return taken


def b64(data: bytes) -> str:
    """Image bytes as base64 text."""
    return base64.b64encode(data).decode("ascii")

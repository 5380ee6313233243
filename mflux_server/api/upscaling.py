"""POST /api/upscale: an image (sent, or a finished task's) enlarged by an upscaler, as a task in the one queue."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask_smorest import Blueprint
from marshmallow import fields, validate

from mflux_server.api.context import db
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.generation import submitted_view
from mflux_server.api.generation_schemas import (
    FormatField,
    GenerateRequest,
    GenerateResponse,
    SeedField,
    StrictInteger,
    UpscaleAfterRequest,
    _callback_url,
)
from mflux_server.api.image_inputs import ImageField, RawImage
from mflux_server.api.request_body import StrictParser
from mflux_server.api.submission import default_upscaler, queue_task, require_json_body, upscalers
from mflux_server.api.task_view import NOT_FOUND, get_task_or_404
from mflux_server.core import catalog
from mflux_server.core.rows import Status

blp = Blueprint("upscaling", __name__, description="Enlarge an image with an upscaler, queued like any task.")
blp.ARGUMENTS_PARSER = StrictParser()
blp.before_request(require_json_body)



class UpscaleRequest(UpscaleAfterRequest):
    """What to enlarge, by how much (factor, or width and height), and with which upscaler (upscaler, steps)."""

    class Meta:
        unknown = ma.RAISE

    error_messages = {"type": "the request body must be a JSON object", "unknown": "unknown field"}

    image = ImageField(load_default=None, metadata={
        "description": "the picture to enlarge, as for /api/generate's image (base64, data: URL or a file part); "
                       "or name a finished task instead"})
    task_id = fields.String(load_default=None, validate=validate.Length(1, 64), metadata={
        "description": "a finished task whose image to enlarge (yours: another key's tasks are not found)"})
    index = StrictInteger(load_default=0, validate=validate.Range(0, 63), metadata={
        "description": "which of that task's images, from 0"})
    prompt = fields.String(load_default=None, validate=validate.Length(max=4000), metadata={
        "description": "what the picture shows, for upscalers that take a prompt; default: the task's own prompt, "
                       "or none"})
    seed = SeedField(load_default=None, metadata={"description": "random when absent"})
    format = FormatField(load_default="PNG", metadata={"description": "JPEG, PNG or WEBP, any case"})
    quality = StrictInteger(load_default=90, validate=validate.Range(1, 100))
    priority = fields.Boolean(load_default=False)
    callback_url = fields.String(load_default=None, validate=_callback_url, metadata={
        "description": "POSTed, signed, when the task ends (as for /api/generate)"})


def _reject(field: str, rule: str) -> None:
    abort_json(422, errors={"json": {field: [rule]}})


def source_of(body: dict[str, Any]) -> tuple[RawImage, str]:
    """The picture to enlarge and the prompt that made it ('' for a sent image)."""
    if (body["image"] is None) == (body["task_id"] is None):
        _reject("image", "send the picture as image, or name a finished task as task_id: one of the two")
    if body["image"] is not None:
        if body["index"]:
            _reject("index", "picks an image of task_id; it does not apply to a sent image")
        return body["image"], ""
    task = get_task_or_404(body["task_id"])
    if task.status is not Status.DONE:
        abort_json(409, code="image_not_ready", field="task_id", status=str(task.status),
                   message=f"task {task.id} is {task.status}, not done: it has no image to upscale yet")
    if body["index"] >= task.count:
        _reject("index", f"task {task.id} has {task.count} image(s): index 0 to {task.count - 1}")
    stored = db().fetch_image(task.id, body["index"])
    if stored is None:
        abort_json(404, code="image_gone", field="index",
                   message=f"image {body['index']} of task {task.id} was fetched with delete and is gone")
    return RawImage(stored.data), task.prompt


@blp.route("/upscale", methods=["POST"])
@blp.arguments(UpscaleRequest(), location="json")
@blp.response(200, GenerateResponse)
@blp.alt_response(422, schema=ErrorSchema, description="a field is invalid; the body names it and the rule")
@blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
@blp.alt_response(409, schema=ErrorSchema, description="the named task is not done, or no live worker serves the "
                                                        "upscaler")
def upscale(body: dict[str, Any]) -> dict[str, Any]:
    """Queue an upscale: listed, forecast, streamed and canceled like any task; fetch it with /api/image."""
    if body["factor"] is not None and (body["width"] is not None or body["height"] is not None):
        _reject("factor", "give a factor, or a target width and height, not both")
    name = body["upscaler"] or default_upscaler()
    info = catalog.resolve(name)
    if info is None or not info.capabilities.upscale:
        _reject("upscaler", f"{name!r} is not an upscaler; the upscalers are {', '.join(upscalers())}")
    picture, prompt = source_of(body)
    factor = body["factor"] if body["factor"] is not None or body["width"] or body["height"] else 2.0
    generate = {name: field.load_default for name, field in GenerateRequest().fields.items()}
    generate.update(prompt=body["prompt"] if body["prompt"] is not None else prompt, model=name, image=picture,
                    width=body["width"], height=body["height"], steps=body["steps"], seed=body["seed"],
                    format=body["format"], quality=body["quality"], priority=body["priority"],
                    callback_url=body["callback_url"], upscale_factor=factor)
    return submitted_view(*queue_task(generate))

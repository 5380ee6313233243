"""NebulaBlock's image generation API (/api/v1/images/generation) onto the one queue: b64_json and timings back."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint

from mflux_server.api import compat
from mflux_server.api.context import settings
from mflux_server.api.errors import register_envelope, renamed
from mflux_server.api.submission import check_body, default_model, queue_task
from mflux_server.core.results import inference_seconds, snapshot

blp = Blueprint("nebula", __name__, description="NebulaBlock's image generation API: text-to-image, and inpaint "
                "with FLUX.1-Fill (image and mask in base64).")


@blp.before_request
def body_rules() -> None:
    """Their text-to-image example is a GET with a JSON body: a GET body is checked like a POST's."""
    if request.method == "POST" or request.content_length or request.headers.get("Transfer-Encoding"):
        check_body()


PARAMS = {"model", "prompt", "num_steps", "guidance_scale", "width", "height", "negative_prompt", "image", "mask", "seed",
          "num_images"}
NAMES = {"steps": "num_steps", "guidance": "guidance_scale", "count": "num_images"}


def envelope(payload: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
    """The error in the shape of their answers: status "error", a message, and the parameter at fault."""
    param, message = renamed(payload, NAMES)
    status = 400 if status == 422 else status
    return {"status": "error", "message": message, "code": payload.get("code"), "param": param, "data": []}, status


register_envelope("/api/v1/images/", envelope)


@blp.route("/generation", methods=["POST", "GET"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string"}, **compat.nullable({"model": "string", "num_steps": "integer", "guidance_scale": "number",
                                              "width": "integer", "height": "integer", "negative_prompt": "string",
                                              "seed": "integer", "num_images": "integer"}),
    "image": {"type": "string", "format": "byte", "nullable": True},
    "mask": {"type": "string", "format": "byte", "nullable": True}}}}}},
    responses={"200": {"description": "{model, object: list, data: [{timings, index, b64_json}], message, status}"},
               **compat.error_docs(*compat.SYNC_ERRORS)})
def generation() -> dict[str, Any]:
    """Generate images and answer them as base64 (their examples send this as GET with a body, or POST)."""
    body = compat.json_object()
    compat.refuse_unknown(body, PARAMS)
    if body.get("model") is not None and not isinstance(body["model"], str):  # {} or 0 is not "left out"
        compat.refuse("model", "must be a string")
    model = body.get("model") or default_model()
    native = {"prompt": body.get("prompt"), "model": model, "steps": body.get("num_steps"),
              "guidance": body.get("guidance_scale"), "width": body.get("width"), "height": body.get("height"),
              "negative_prompt": body.get("negative_prompt"), "image": body.get("image"), "mask": body.get("mask"),
              "seed": body.get("seed"), "count": body.get("num_images", 1), "format": "PNG"}
    task, _ = queue_task(compat.native_body(native, NAMES), surface="nebula", keep_for=settings().link_ttl)
    ended = compat.wait_or_fail(task)
    seconds = inference_seconds(snapshot(ended))
    per_image = None if seconds is None else round(seconds / ended.count, 3)
    return {"model": model, "object": "list", "message": "Image generated successfully", "status": "success",
            "data": [{"timings": {"inference": per_image}, "index": index, "b64_json": compat.b64(data)}
                     for index, (data, _) in enumerate(compat.take_images(ended))]}

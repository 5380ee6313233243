"""The OpenAI Images API (/v1/images/generations, /v1/images/edits, /v1/models) onto the one queue.

Chat front-ends (Open WebUI, LibreChat) and the official `openai` package speak it: each request becomes an
ordinary task (with its position, forecast, events and cancel) and the answer waits for its images.
"""

from __future__ import annotations

import io
import time
from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint
from PIL import Image
from werkzeug.datastructures import FileStorage

from mflux_server.api import compat
from mflux_server.api.auth import link_secret
from mflux_server.api.context import db, settings
from mflux_server.api.errors import register_envelope, renamed
from mflux_server.api.image_inputs import DECODE_THREADS
from mflux_server.api.submission import default_model, queue_task, require_json_body, served_models
from mflux_server.api.task_view import live_workers
from mflux_server.core import catalog, native
from mflux_server.core.results import image_url, snapshot
from mflux_server.core.rows import Task

blp = Blueprint("openai", __name__, description="The OpenAI Images API: generations, edits and models, answered "
                "by the local queue (point an OpenAI client's base URL at /v1).")
blp.before_request(require_json_body)

# OpenAI's own model names run on the server's models: text-to-image on --model, edits on an edit or inpaint model.
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image")
# Steps relative to the model's default, by OpenAI quality.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5, "xhigh": 2.0,
                 "max": 2.0}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
# Parameters OpenAI defines that change nothing here, accepted so that clients sending them work unchanged.
ACCEPTED = {"style", "moderation", "safety_identifier", "user", "background", "input_fidelity", "complexity",
            "partial_images", "stream"}
GENERATION_PARAMS = {"prompt", "model", "n", "size", "response_format", "quality", "output_format",
                     "output_compression"} | ACCEPTED
EDIT_PARAMS = GENERATION_PARAMS | {"image", "image[]", "mask"}
# Native fields by the OpenAI parameter a client sent.
NAMES = {"width": "size", "height": "size", "count": "n", "format": "output_format", "quality": "output_compression",
         "images": "image", "steps": "quality"}
# Which image models edit, and which fill a mask, when the client names an OpenAI model.
EDIT_DEFAULTS = {"edit": "dev-kontext", "inpaint": "dev-fill"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}


def envelope(payload: dict[str, Any], status: int) -> tuple[dict[str, Any], int]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}; a bad field is a 400, as there."""
    param, message = renamed(payload, NAMES)
    status = 400 if status == 422 else status
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": payload.get("code")}}, status


register_envelope("/v1/", envelope)


def is_openai_model(name: str | None) -> bool:
    """Whether a model name is one of OpenAI's (or absent), so the server picks its own."""
    return name is None or name.strip().lower().startswith(OPENAI_MODELS)


def edit_model(requested: str | None, masked: bool) -> str | None:
    """The model for an edit: the one named, or for an OpenAI name one that a live worker serves and that edits
    (or, with a mask, fills); FLUX.1 Kontext or Fill when none does."""
    if not is_openai_model(requested):
        return requested
    capability = "inpaint" if masked else "edit"
    served = served_models(live_workers(db()))
    for info in catalog.models():
        if getattr(info.capabilities, capability) and info.name in served:
            return info.name
    return EDIT_DEFAULTS[capability]


def steps_for(model: str | None, quality: Any) -> int | None:
    """Denoising steps for an OpenAI quality: the model's default, halved for low, 1.5× for high and hd."""
    if quality is None:
        return None
    if not isinstance(quality, str) or quality.lower() not in QUALITY_STEPS:
        compat.refuse("quality", f"must be one of {', '.join(QUALITY_STEPS)}, got {str(quality)[:40]!r}")
    resolved = catalog.resolve_reference(model or default_model())
    if resolved is None:
        return None  # the model check names the model
    return max(1, min(settings().max_steps, round(resolved.info.default_steps * QUALITY_STEPS[quality.lower()])))


def common(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """The native fields every OpenAI request sets: prompt, count, size, steps, format and quality."""
    if body.get("stream") not in (None, False, "false"):
        compat.refuse("stream", "streaming is not supported here; follow the task with GET /api/tasks/{id}/events")
    if body.get("background") not in (None, "auto", "opaque"):
        compat.refuse("background", "only 'auto' or 'opaque': these models draw no transparency")
    output_format = body.get("output_format")
    if output_format is not None and (not isinstance(output_format, str) or output_format.lower() not in FORMATS):
        compat.refuse("output_format", f"must be png, jpeg or webp, got {str(output_format)[:40]!r}")
    width, height = compat.size(body.get("size"), "size")
    local = default_model() if is_openai_model(model) else model
    return {"prompt": body.get("prompt"), "model": local, "count": body.get("n", 1), "width": width, "height": height,
            "steps": steps_for(local, body.get("quality")),
            "format": FORMATS[output_format.lower()] if output_format else "PNG",
            "quality": body.get("output_compression")}


def response_format(body: dict[str, Any], model: str | None) -> str:
    """url or b64_json; gpt-image models answer b64_json unless asked, as OpenAI's do."""
    chosen = body.get("response_format")
    if chosen is None:
        return "b64_json" if (model or "").lower().startswith("gpt-image") else "url"
    if chosen not in ("url", "b64_json"):
        compat.refuse("response_format", f"must be url or b64_json, got {str(chosen)[:40]!r}")
    return str(chosen)


def images_response(task: Task, kind: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse for an ended task: created, and one b64_json or url per image."""
    ended = compat.wait_or_fail(task)
    created = int(ended.created_at)
    if kind == "url":
        shown = snapshot(ended)
        return {"created": created, "data": [{"url": image_url(shown, i, keep=True, secret=link_secret())}
                                             for i in range(ended.count)]}
    return {"created": created, "data": [{"b64_json": compat.b64(data)} for data, _ in compat.take_images(ended)]}


def client_user(body: dict[str, Any]) -> str | None:
    """OpenAI's user (or safety_identifier), kept on the task."""
    user = body.get("user") or body.get("safety_identifier")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        compat.refuse("user", "must be a string of at most 256 characters")
    return user


@blp.route("/images/generations", methods=["POST"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string"}, "response_format": {"type": "string", "enum": ["url", "b64_json"], "nullable": True},
    **compat.nullable({"model": "string", "n": "integer", "size": "string", "quality": "string", "user": "string"})}}}}},
    responses={"200": {"description": "OpenAI's ImagesResponse: created and data[] of b64_json or url"},
    **compat.error_docs(*compat.SYNC_ERRORS)})
def generations() -> dict[str, Any]:
    """Create images from a prompt, waiting for them (OpenAI's POST /v1/images/generations)."""
    body = compat.json_object()
    compat.refuse_unknown(body, GENERATION_PARAMS)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        compat.refuse("model", "must be a string")
    kind = response_format(body, model)
    native = compat.native_body(common(body, model), NAMES)
    task, _ = queue_task(native, surface="openai", keep_for=settings().link_ttl, client_user=client_user(body))
    return images_response(task, kind)


def openai_mask(upload: FileStorage) -> str:
    """OpenAI's mask (transparent = edit) as ours (white = repaint), base64 PNG; a mask without alpha is taken as
    ours already. Decoded on the decode pool, within --max-input-bytes and --max-input-pixels like every input."""
    data = upload.read(settings().max_input_bytes + 1)
    if len(data) > settings().max_input_bytes:
        compat.refuse("mask", f"must be at most {settings().max_input_bytes} bytes of image data")
    limit = settings().max_input_pixels
    converted = native.call_bounded(lambda: mask_from_alpha(data, limit), "image-decode", DECODE_THREADS)
    if isinstance(converted, str):
        compat.refuse("mask", converted)
    return compat.b64(converted)


def mask_from_alpha(data: bytes, limit: int) -> bytes | str:
    """The PNG of ours for an OpenAI mask (its own bytes when it has no alpha), or what is wrong with it."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > limit:
                return f"is {opened.width}×{opened.height} = {opened.width * opened.height} pixels; at most {limit} " \
                       "are accepted"
            if "A" not in opened.getbands() and opened.mode != "P":
                return data
            alpha = opened.convert("RGBA").getchannel("A")
    except (OSError, ValueError, Image.DecompressionBombError):
        return "is not a readable image"
    out = io.BytesIO()
    alpha.point(lambda a: 255 if a < 128 else 0).save(out, "PNG")
    return out.getvalue()


@blp.route("/images/edits", methods=["POST"])
@blp.doc(requestBody={"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                   "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "integer"},
                   "size": {"type": "string"}, "response_format": {"type": "string"}}}}}},
    responses={"200": {"description": "OpenAI's ImagesResponse"},
    **compat.error_docs(*compat.SYNC_ERRORS)})
def edits() -> dict[str, Any]:
    """Edit an image (with a mask: repaint where it is transparent), waiting for the result (POST /v1/images/edits)."""
    if request.mimetype != "multipart/form-data":
        compat.refuse("image", "send the edit as multipart/form-data with the image as a file part", status=400)
    for name in list(request.form) + list(request.files):
        count = len(request.form.getlist(name)) + len(request.files.getlist(name))
        if count > 1 and name not in ("image", "image[]"):
            compat.refuse(name, f"was given {count} times; give it once")
    form = {name: request.form.get(name) for name in request.form}
    compat.refuse_unknown({**form, **{name: None for name in request.files}}, EDIT_PARAMS)
    images = request.files.getlist("image") + request.files.getlist("image[]")
    if not images:
        compat.refuse("image", "is required: the picture to edit, as a file part")
    mask = request.files.get("mask")
    model = edit_model(form.get("model"), mask is not None)
    kind = response_format(form, form.get("model"))
    native = common(form, model)
    if len(images) == 1:
        native["image"] = images[0]
    else:
        native["images"] = images
    if mask is not None:
        native["mask"] = openai_mask(mask)
    loaded = compat.native_body(native, NAMES)
    task, _ = queue_task(loaded, surface="openai", keep_for=settings().link_ttl, client_user=client_user(form))
    return images_response(task, kind)


@blp.route("/models")
class Models(MethodView):
    """OpenAI's model list."""

    @blp.doc(responses={"200": {"description": "{object: list, data: [{id, object: model, created, owned_by}]}"}})
    def get(self) -> dict[str, Any]:
        """The models live workers serve (the server's --model when none is running)."""
        served = sorted(served_models(live_workers(db()))) or [default_model()]
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "mflux-server"}
                                           for name in served]}

"""Request and response schemas of the generate, status and image endpoints."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from mflux_server.api.context import settings
from mflux_server.api.image_inputs import ImageField, ImageList
from mflux_server.core import catalog, outbound
from mflux_server.core.catalog import CONTROL_TYPES
from mflux_server.core.settings import Settings

FORMATS = {"JPEG": "image/jpeg", "JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
SIZE_STEP = 16
MIN_SIZE = 128
MAX_SEED = 2**32 - 1
TASK_ID_LENGTH = 64  # the longest task id any endpoint takes (ours are 32 hex digits)
MAX_OFFSET = 2**31 - 1  # far past any queue, and within SQLite's 64-bit integers
_DIGITS = re.compile(r"[0-9]+")


def _limit(name: str) -> int:
    limit: int = getattr(settings(), name)
    return limit


class SeedField(fields.Field[int]):
    """A seed given as an integer or as a string of digits, as the original server's examples send it."""

    SPEC = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                      {"type": "string", "pattern": "^ *[0-9]{1,10} *$"}]}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise ma.ValidationError("must be an integer or a string of digits, not a boolean")
        if isinstance(value, str):
            text = value.strip()
            # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '٣' (which int() reads as 3).
            if not _DIGITS.fullmatch(text):
                raise ma.ValidationError(f"must be an integer or a string of the digits 0-9, got {value[:40]!r}")
            if len(text) > len(str(MAX_SEED)) + 10:
                raise ma.ValidationError(f"must be between 0 and {MAX_SEED}, got a number of {len(text)} digits")
            value = int(text)
        if not isinstance(value, int):
            raise ma.ValidationError(f"must be an integer or a string of the digits 0-9, got {str(value)[:40]!r}")
        if not 0 <= value <= MAX_SEED:
            raise ma.ValidationError(f"must be between 0 and {MAX_SEED}, got {value}")
        return value




class FormatField(fields.String):
    """An image format name in any case: JPEG (or JPG), PNG or WEBP."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip().upper()
        if text not in FORMATS:
            raise ma.ValidationError(f"must be one of JPEG, PNG or WEBP (any case), got {value!r}")
        return "JPEG" if text == "JPG" else text


# A rule the server checks against a setting, with what the OpenAPI spec says of it: (check, spec from settings).
Rule = Callable[[Any], None]


def _documented(check: Rule, spec: Callable[[Settings], dict[str, Any]]) -> Rule:
    """Attach the rule's OpenAPI keywords, so the spec states every rule the server checks (openapi_rules reads it)."""
    check.openapi = spec  # type: ignore[attr-defined]
    return check


def _size(limit: str) -> Rule:
    def check(value: int) -> None:
        top = _limit(limit)
        if value % SIZE_STEP or not MIN_SIZE <= value <= top:
            raise ma.ValidationError(f"must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {top}, got {value}")

    return _documented(check, lambda config: {"minimum": MIN_SIZE, "maximum": getattr(config, limit),
                                              "multipleOf": SIZE_STEP})


def _at_most(limit: str, low: int = 1, below: bool = False) -> Rule:
    def check(value: int) -> None:
        top = _limit(limit) - below
        if not low <= value <= top:
            raise ma.ValidationError(f"must be from {low} to {top}, got {value}")

    return _documented(check, lambda config: {"minimum": low, "maximum": getattr(config, limit) - below})


def _check_prompt(value: str) -> None:
    top = _limit("max_prompt_length")
    if not value.strip():
        raise ma.ValidationError("must not be empty")
    if len(value) > top:
        raise ma.ValidationError(f"must be at most {top} characters, got {len(value)}")


_prompt = _documented(_check_prompt, lambda config: {"minLength": 1, "maxLength": config.max_prompt_length,
                                                     "pattern": r"\S"})


def openapi_rules(config: Settings) -> Callable[..., dict[str, Any]]:
    """An apispec attribute function: the OpenAPI keywords of each field's documented rules, at these settings."""

    def rules(converter: Any, field: fields.Field[Any], **kwargs: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for check in field.validators:
            spec = getattr(check, "openapi", None)
            if spec is not None:
                found.update(spec(config))
        if isinstance(field, SeedField):
            found.update(SeedField.SPEC)
        return found

    return rules


def _model(value: str) -> None:
    if catalog.resolve_reference(value) is None:
        raise ma.ValidationError(f"unknown model {value!r}; known models: {', '.join(catalog.names())} "
                                 "(GET /api/models lists them with their aliases)")


class StrictInteger(fields.Integer):
    """An integer that refuses booleans and fractions instead of silently truncating them."""

    default_error_messages = {"invalid": "must be an integer"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=False, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise self.make_error("invalid")
        return super()._validated(value)


def _callback_url(value: str) -> None:
    try:
        outbound.check_url(value, settings().webhook_allow_private)
    except outbound.TargetRefused as refused:
        raise ma.ValidationError(str(refused)) from None


MAX_LORAS = 4  # LoRAs one request may stack (each is a file on the GPU beside the model)
LORA_SCALE = 4.0  # scales outside ±this are not a style any more, only noise


class LoraEntry(ma.Schema):
    """One LoRA of a request: a name from GET /api/loras and its scale."""

    class Meta:
        unknown = ma.RAISE

    error_messages = {"type": "each entry must be an object with name and scale", "unknown": "unknown field"}

    name = fields.String(required=True, validate=validate.Length(1, 255),
                         metadata={"description": "a name from GET /api/loras (its path in the server's --lora-dir, "
                                                  "without .safetensors)", "example": "styles/ink"})
    scale = fields.Float(load_default=1.0, validate=validate.Range(-LORA_SCALE, LORA_SCALE),
                         metadata={"description": f"how strongly it applies, -{LORA_SCALE:g} to {LORA_SCALE:g} "
                                                  "(default 1)"})


class MetadataView(ma.Schema):
    """What a task's images carry about what made them."""

    generation_data = fields.Boolean(metadata={"description": "model, seed, steps, guidance, size, LoRAs, input kinds "
                                                              "and software: PNG text (AUTOMATIC1111's parameters), "
                                                              "EXIF and XMP"})
    prompt = fields.Boolean(metadata={"description": "the prompt and negative prompt are in it (false: private)"})
    digital_source_type = fields.String(metadata={"description": "IPTC DigitalSourceType in XMP, always: the "
                                                                 "AI-generated marking"})
    content_credentials = fields.List(fields.Boolean(), metadata={
        "description": "per stored image, in order: whether it carries signed C2PA Content Credentials (empty "
                       "until the task is done; GET /api/tasks/<task_id>/provenance verifies one)"})


class ControlView(ma.Schema):
    """How a task uses its control image."""

    type = fields.String(metadata={"description": "the control map: canny, depth, pose, hed or mlsd"})
    strength = fields.Float(allow_none=True, metadata={"description": "the ControlNet strength; null where the model "
                                                                      "takes none"})
    preprocess = fields.Boolean(metadata={"description": "the worker turned the image into the map"})


MAX_UPSCALE_FACTOR = 4.0


class UpscaleAfterRequest(ma.Schema):
    """A generate request's `upscale`: each image enlarged once the task is done, by an upscale task of its own."""

    class Meta:
        unknown = ma.RAISE

    error_messages = {"type": "must be an object: {\"factor\": 2} or {\"width\": …, \"height\": …}",
                      "unknown": "unknown field"}

    factor = fields.Float(load_default=None, validate=validate.Range(1, MAX_UPSCALE_FACTOR, min_inclusive=False),
                          metadata={"description": f"how much larger, above 1 and at most {MAX_UPSCALE_FACTOR:g}; "
                                                   "default 2 unless width or height is given"})
    width = StrictInteger(load_default=None, validate=_size("max_width"), metadata={
        "description": "the target width instead of a factor (the height follows the aspect unless given)"})
    height = StrictInteger(load_default=None, validate=_size("max_height"), metadata={
        "description": "the target height instead of a factor (the width follows the aspect unless given)"})
    upscaler = fields.String(load_default=None, metadata={
        "description": "a model with the upscale capability (GET /api/models); default: the first of them"})
    steps = StrictInteger(load_default=None, validate=validate.Range(1, 100), metadata={
        "description": "the upscaler's denoising steps; default: its own"})


class UpscaleAfterView(ma.Schema):
    """The upscale a task asked for, and the tasks that do it once it is done."""

    upscaler = fields.String()
    width = fields.Integer()
    height = fields.Integer()
    steps = fields.Integer()
    task_ids = fields.List(fields.String(), metadata={
        "description": "one upscale task per image, queued the moment this task is done (empty before, and for ever "
                       "if it fails or is canceled); follow each like any task"})


class GenerateRequest(ma.Schema):
    """A text-to-image request; the fields and types of the original mflux-server's examples."""

    class Meta:
        unknown = ma.RAISE

    error_messages = {"type": "the request body must be a JSON object", "unknown": "unknown field"}

    prompt = fields.String(required=True, validate=_prompt,
                           metadata={"description": "what to draw", "example": "A beautiful landscape"})
    seed = SeedField(
        load_default=None,
        metadata={"description": f"0 to {MAX_SEED}, integer or digit string; image k of count uses seed+k. Random when absent.",
                  "example": "1725311496"},
    )
    width = StrictInteger(load_default=None, validate=_size("max_width"),
                          metadata={"description": "pixels; a multiple of 16 from 128 to --max-width (2048). Default 1024, "
                                                   "or the input image's width", "example": 1024})
    height = StrictInteger(load_default=None, validate=_size("max_height"),
                           metadata={"description": "pixels; a multiple of 16 from 128 to --max-height (2048). Default "
                                                    "1024, or the input image's height", "example": 1024})
    steps = StrictInteger(load_default=None, validate=_at_most("max_steps"),
                          metadata={"description": "denoising steps, 1 to --max-steps (100); "
                                                   "default: the model's (schnell 4, dev 25)"})
    guidance = fields.Float(load_default=None, validate=validate.Range(0, 50),
                            metadata={"description": "guidance scale, 0 to 50; default: the model's (GET /api/models). "
                                                     "Models without the guidance capability ignore it"})
    format = FormatField(load_default="JPEG", metadata={"description": "JPEG, PNG or WEBP, any case", "example": "JPEG"})
    quality = StrictInteger(load_default=85, validate=validate.Range(1, 100),
                            metadata={"description": "JPEG/WEBP quality, 1 to 100"})
    priority = fields.Boolean(load_default=False, metadata={"description": "true jumps ahead of every normal task"})
    count = StrictInteger(load_default=1, validate=_at_most("max_count"),
                          metadata={"description": "images to generate, 1 to --max-count (8)"})
    model = fields.String(load_default=None, validate=_model,
                          metadata={"description": "a name or alias from GET /api/models, or a Hugging Face repo / local "
                                                   "folder a worker serves; default: the server's --model"})
    negative_prompt = fields.String(load_default=None, validate=validate.Length(max=4000),
                                    metadata={"description": "what not to draw; only models with the negative_prompt "
                                                             "capability"})
    image = ImageField(load_default=None, metadata={
        "description": "input image as base64 or a data: URL (or a file part in multipart/form-data): the start of "
                       "image-to-image, the reference of an edit, or the picture an inpaint repaints"})
    images = ImageList(max(info.max_reference_images for info in catalog.models()), validate=validate.Length(min=1),
                       load_default=None, metadata={
        "description": "several reference images for one edit (Qwen-Image-Edit, FLUX.2 klein edit), in order; "
                       "GET /api/models gives each model's max_reference_images. In multipart/form-data, repeated "
                       "`images` file parts. Instead of image, not with it"})
    init_image = ImageField(load_default=None, metadata={"description": "the original mflux-server's name for image"})
    image_strength = fields.Float(load_default=None, validate=validate.Range(0, 1), metadata={
        "description": "image-to-image: how much of the input image survives, 0 to 1 (default 0.4). On models that "
                       "also edit, sending it picks image-to-image over edit"})
    image_strengths = fields.List(fields.Float(validate=validate.Range(0, 1)), load_default=None,
                                  validate=validate.Length(min=1, max=max(info.max_reference_images
                                                                          for info in catalog.models())), metadata={
        "description": "variations (capabilities.variation, FLUX.1 Redux): how strongly each image prompt (image, "
                       "or each of images, in order) steers, 0 to 1; one per image; default: the model's"})
    garment_image = ImageField(load_default=None, metadata={
        "description": "try-on (capabilities.try_on, FLUX.1 Fill CatVTON): the garment to dress the person in `image` "
                       "with, where `mask` is white; same encodings as image"})
    mask = ImageField(load_default=None, metadata={
        "description": "inpaint mask, same encoding and size as image: white repaints, black keeps"})
    loras = fields.List(fields.Nested(LoraEntry), load_default=None, validate=validate.Length(max=MAX_LORAS), metadata={
        "description": f"LoRAs to apply, in order, at most {MAX_LORAS}: each a name from GET /api/loras that fits the "
                       "model's family, with its scale. Absent: the workers' default set (--lora-paths)"})
    control_image = ImageField(load_default=None, metadata={
        "description": "ControlNet and depth models (capabilities.control): the image that guides the layout, same "
                       "encodings as image; a photo the worker turns into the control map, or the map itself with "
                       "control_preprocess false. Without width and height, the output takes its size"})
    control_type = fields.String(load_default=None, validate=validate.OneOf(CONTROL_TYPES), metadata={
        "description": f"the control map: {', '.join(CONTROL_TYPES)}, as the model takes (GET /api/models: "
                       "control.types); default: the model's first"})
    control_strength = fields.Float(load_default=None, validate=validate.Range(0, 2), metadata={
        "description": "how strongly the control map steers, 0 to 2; only models whose control.default_strength is "
                       "set (the default)"})
    control_preprocess = fields.Boolean(load_default=None, metadata={
        "description": "true (default): control_image is a photo, turned into the map by mflux's own preprocessor "
                       "(Canny, Depth Pro); false: it is the map already (models whose control.maps is true)"})
    private = fields.Boolean(load_default=False, metadata={
        "description": "true leaves the prompt and negative prompt out of the images' metadata (the AI-generated "
                       "marking stays); the server's --metadata-prompts false does it for every task"})
    callback_url = fields.String(load_default=None, validate=_callback_url, metadata={
        "description": "an http(s) URL POSTed once the task ends (done, error or canceled), signed per Standard "
                       "Webhooks; public addresses only unless the server runs with --webhook-allow-private"})
    upscale = fields.Nested(UpscaleAfterRequest, load_default=None, metadata={
        "description": "generate, then upscale: once the task is done, each of its images is queued for an upscaler "
                       "as a task of its own (its ids in this task's upscale.task_ids), with this task's key, "
                       "priority, format and callback_url. The same fields as POST /api/upscale: factor, or width and "
                       "height; upscaler; steps"})


class Webhook(ma.Schema):
    """The webhook a task sends when it ends."""

    url = fields.String(required=True)
    state = fields.String(required=True, metadata={"description": "pending (due or retrying), delivered or failed"})
    attempts = fields.Integer(metadata={"description": "attempts so far"})
    last_status = fields.Integer(allow_none=True, metadata={"description": "the receiver's last HTTP status"})
    last_error = fields.String(allow_none=True, metadata={"description": "why the last attempt failed"})
    next_attempt_at = fields.Float(allow_none=True, metadata={"description": "Unix time of the next attempt, while pending"})
    delivered_at = fields.Float(allow_none=True)


class Progress(ma.Schema):
    """How far a task has come."""

    image = fields.Integer(metadata={"description": "image being generated, 1-based"})
    count = fields.Integer(metadata={"description": "images in the task"})
    step = fields.Integer(metadata={"description": "denoising steps finished on that image"})
    steps = fields.Integer(metadata={"description": "denoising steps per image"})
    fraction = fields.Float(metadata={"description": "0 to 1, over all images and steps"})


class TaskStatus(ma.Schema):
    """A task's state, queue position and forecast."""

    task_id = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "waiting, processing, done, error or canceled"})
    pos = fields.Integer(metadata={"description": "waiting tasks that will start before this one; 0 when next or running"})
    wait_remaining = fields.Float(metadata={"description": "seconds until this task's images are done (forecast); while "
                                                          "no live worker can run the task, counted from when one does"})
    wait_range = fields.List(fields.Float(), metadata={
        "description": "[p10, p90] seconds around wait_remaining: four tasks in five finish inside it (docs/forecast.md "
                       "says how it is computed); [0, 0] once the task has ended", "example": [31.5, 54.2]})
    waiting_for_worker = fields.Boolean(metadata={"description": "true while no live worker serves the task's model"})
    worker_lost = fields.Boolean(metadata={"description": "true when the worker running it stopped heartbeating; the "
                                                          "task will be retried"})
    note = fields.String(metadata={"description": "why the task cannot start now, for a person"})
    progress = fields.Nested(Progress)
    error = fields.String(allow_none=True, metadata={"description": "why the task failed, when status is error"})
    model = fields.String()
    engine = fields.String(allow_none=True, metadata={"description": "what generated it: mflux or synthetic"})
    seed = fields.Integer()
    width = fields.Integer()
    height = fields.Integer()
    steps = fields.Integer()
    count = fields.Integer()
    format = fields.String()
    priority = fields.Boolean()
    loras = fields.List(fields.Nested(LoraEntry), metadata={"description": "the LoRAs asked for, with their scales"})
    control = fields.Nested(ControlView, allow_none=True, metadata={
        "description": "ControlNet or depth: how its control_image is used; null without one"})
    image_strengths = fields.List(fields.Float(), metadata={"description": "variations: each image prompt's "
                                                                          "strength; empty for the default"})
    metadata = fields.Nested(MetadataView, metadata={"description": "what its images carry about what made them"})
    attempts = fields.Integer(metadata={"description": "times a worker started this task"})
    created_at = fields.Float(metadata={"description": "Unix time"})
    started_at = fields.Float(allow_none=True)
    finished_at = fields.Float(allow_none=True)
    webhook = fields.Nested(Webhook, metadata={"description": "the callback_url and how its delivery went (tasks "
                                                              "submitted with one)"})
    upscale = fields.Nested(UpscaleAfterView, metadata={"description": "the upscale asked for with the request, and "
                                                                       "its tasks (tasks submitted with one)"})
    upscales = fields.Dict(metadata={"description": "an upscale queued by a task's upscale: {task_id, index} of the "
                                                    "image it enlarges"})


class GenerateResponse(TaskStatus):
    """The new task, with the original server's task_length and expected_time_seconds."""

    task_length = fields.Integer(metadata={"description": "unfinished tasks ahead of this one when it was submitted"})
    expected_time_seconds = fields.Float(metadata={"description": "forecast seconds until its images are done"})
    expected_time_range = fields.List(fields.Float(), metadata={
        "description": "[p10, p90] seconds around expected_time_seconds (as wait_range)", "example": [31.5, 54.2]})


class StatusQuery(ma.Schema):
    """Which task."""

    task_id = fields.String(required=True, validate=validate.Length(1, TASK_ID_LENGTH),
                            metadata={"description": f"the id POST /api/generate returned (1 to {TASK_ID_LENGTH} characters)"})


class ImageQuery(StatusQuery):
    """Which image, and how to return it."""

    index = StrictInteger(load_default=0, validate=_at_most("max_count", low=0, below=True),
                          metadata={"description": "image index when count > 1: 0 to count - 1"})
    base64 = fields.Boolean(load_default=False, metadata={"description": "return base64 text instead of bytes"})
    delete = fields.Boolean(
        load_default=True,
        metadata={"description": "remove the task once every one of its images has been served"},
    )

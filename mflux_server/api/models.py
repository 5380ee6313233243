"""GET /api/models: every model the server knows, its family and capabilities, and which live workers serve it;
GET /api/loras: the LoRA library requests may name."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields

from mflux_server.api.context import db, lora_library
from mflux_server.api.request_body import StrictParser
from mflux_server.api.task_view import live_workers
from mflux_server.core import catalog
from mflux_server.core.rows import LoadStat, Worker
from mflux_server.core.scheduling import LORA_CHANGE

blp = Blueprint("models", __name__, description="The models the workers can serve, with what each accepts.")
blp.ARGUMENTS_PARSER = StrictParser()


class CapabilitiesSchema(ma.Schema):
    """Which inputs a model can use."""

    text_to_image = fields.Boolean(metadata={"description": "generates from a prompt alone"})
    image_to_image = fields.Boolean(metadata={"description": "starts from `image`, keeping `image_strength` of it"})
    edit = fields.Boolean(metadata={"description": "applies the prompt as an instruction to the reference `image`"})
    inpaint = fields.Boolean(metadata={"description": "repaints `image` where `mask` is white"})
    negative_prompt = fields.Boolean(metadata={"description": "takes `negative_prompt`"})
    guidance = fields.Boolean(metadata={"description": "`guidance` changes the image (distilled models ignore it)"})
    loras = fields.Boolean(metadata={"description": "takes `loras` (LoRAs per request, from GET /api/loras)"})
    control = fields.Boolean(metadata={"description": "generates guided by `control_image` (ControlNet, depth); "
                                                      "`control` says how"})
    upscale = fields.Boolean(metadata={"description": "an upscaler: POST /api/upscale names it as `upscaler`"})
    variation = fields.Boolean(metadata={"description": "draws variations of `image` or `images` (image prompts, "
                                                        "with `image_strengths`)"})
    try_on = fields.Boolean(metadata={"description": "dresses the person in `image` with `garment_image` where `mask` "
                                                     "is white"})


class ControlSchema(ma.Schema):
    """How a ControlNet or depth model takes control_image."""

    types = fields.List(fields.String(), metadata={"description": "the control_type values it takes; the first is "
                                                                  "the default"})
    maps = fields.Boolean(metadata={"description": "takes a finished map (control_preprocess false); otherwise "
                                                   "mflux always preprocesses the image"})
    default_strength = fields.Float(allow_none=True, metadata={
        "description": "control_strength when none is sent; null: the model takes no control_strength"})


class ServingWorker(ma.Schema):
    """A live worker that may serve the model."""

    id = fields.String()
    engine = fields.String(metadata={"description": "mflux, or synthetic (procedural images, no model)"})
    loaded = fields.Boolean(metadata={"description": "the model is in this worker's memory now"})
    loading = fields.Boolean(metadata={"description": "the worker is loading it now"})
    quantize = fields.Integer(allow_none=True, metadata={"description": "bits, when loaded quantized"})
    max_pixels = fields.Integer(allow_none=True, metadata={
        "description": "largest width × height it runs with this model (its memory need, lowered after out-of-memory)"})


class ModelSchema(ma.Schema):
    """One model."""

    name = fields.String(metadata={"description": "what to send as `model`: a registry name, or the Hugging Face repo "
                                                  "or folder a worker was started with"})
    aliases = fields.List(fields.String(), metadata={"description": "other names accepted for it"})
    family = fields.String(metadata={"description": "the mflux model family that runs it"})
    family_title = fields.String()
    repo = fields.String(metadata={"description": "Hugging Face repository of its weights"})
    default_steps = fields.Integer()
    default_guidance = fields.Float(allow_none=True, metadata={"description": "null: the model picks its own"})
    capabilities = fields.Nested(CapabilitiesSchema)
    control = fields.Nested(ControlSchema, allow_none=True, metadata={"description": "null without the control "
                                                                                     "capability"})
    max_reference_images = fields.Integer(metadata={
        "description": "how many reference images an edit takes (`image` plus `images`); 0 without edit"})
    workers = fields.List(fields.Nested(ServingWorker), metadata={"description": "live workers that may serve it"})
    served = fields.Boolean(metadata={"description": "some live worker may serve it"})
    loaded = fields.Boolean(metadata={"description": "some live worker holds it in memory now"})
    quantize = fields.Integer(allow_none=True, metadata={"description": "quantization of a worker holding it"})
    load_seconds = fields.Float(allow_none=True, metadata={
        "description": "measured mean seconds to load it (and warm it up); charged in the forecast of a switch"})
    lora_change_seconds = fields.Float(allow_none=True, metadata={
        "description": "measured mean seconds to change the LoRA set it holds (mflux reloads the weights)"})


class LoraSchema(ma.Schema):
    """One LoRA of the library."""

    name = fields.String(metadata={"description": "what to send in `loras`: its path under --lora-dir, without "
                                                  ".safetensors", "example": "styles/ink"})
    bytes = fields.Integer(metadata={"description": "the file's size"})
    families = fields.List(fields.String(), metadata={
        "description": "the model families it fits (GET /api/models: family), read from its tensor names; empty when "
                       "it fits none mflux knows"})


class LoraList(ma.Schema):
    """The LoRA library."""

    loras = fields.List(fields.Nested(LoraSchema))
    library = fields.Boolean(metadata={"description": "false when the server runs without --lora-dir"})


class ModelList(ma.Schema):
    """Every model."""

    models = fields.List(fields.Nested(ModelSchema))


def describe(name: str, info: catalog.ModelInfo, workers: list[Worker], loads: dict[str, LoadStat]) -> dict[str, Any]:
    """One model's entry: catalog facts, serving workers and measured load time."""
    serving = [w for w in workers if name in w.servable]
    holding = [w for w in serving if w.model == name and not w.loading]
    load, change = loads.get(name), loads.get(name + LORA_CHANGE)
    return {
        "name": name,
        "aliases": list(info.aliases) if name == info.name else [],
        "family": info.family,
        "family_title": info.family_title,
        "repo": info.repo if name == info.name else name,
        "default_steps": info.default_steps,
        "default_guidance": info.default_guidance,
        "capabilities": info.capabilities.as_dict(),
        "control": info.control.as_dict() if info.control else None,
        "max_reference_images": info.max_reference_images,
        "workers": [{"id": w.id, "engine": w.engine, "loaded": w in holding, "loading": w.loading == name,
                     "quantize": w.quantize, "max_pixels": w.limit_for(name)} for w in serving],
        "served": bool(serving),
        "loaded": bool(holding),
        "quantize": holding[0].quantize if holding else None,
        "load_seconds": load.total / load.n if load else None,
        "lora_change_seconds": change.total / change.n if change else None,
    }


@blp.route("/models")
class ModelCollection(MethodView):
    """The model catalog, built from the installed mflux."""

    @blp.response(200, ModelList)
    def get(self) -> dict[str, Any]:
        """Every known model with its family, default steps, capabilities, serving workers and load time.

        Served Hugging Face repos or local folders that are not registry names come after the registry models.
        """
        workers = live_workers(db())
        loads = db().load_stats()
        entries = [describe(info.name, info, workers, loads) for info in catalog.models()]
        known = {info.name for info in catalog.models()}
        for name in sorted({served for w in workers for served in w.servable} - known):
            resolved = catalog.resolve_reference(name)
            if resolved is not None:
                entries.append(describe(name, resolved.info, workers, loads))
        return {"models": entries}


@blp.route("/loras")
class LoraCollection(MethodView):
    """The LoRA library (--lora-dir)."""

    @blp.response(200, LoraList)
    def get(self) -> dict[str, Any]:
        """Every LoRA file requests may name in `loras`, with its size and the model families it fits."""
        library = lora_library()
        return {"loras": [found.as_dict() for found in library.files().values()], "library": library.folder is not None}

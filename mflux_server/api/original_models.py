"""The original mflux-server's model endpoints, in its shapes: GET /api/ls, GET /api/ps and POST /api/load.

The original held one model and /api/load replaced it. Here the workers hold the models and switch among what they
serve as the queue asks, so /api/load sets the server's default model (for requests that name none, in every
server process), within what the live workers serve; a worker loads it when its first task comes.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask_smorest import Blueprint
from marshmallow import fields

from mflux_server.api.auth import current_key, keys_exist
from mflux_server.api.context import db, settings
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.request_body import StrictParser
from mflux_server.api.submission import default_model, served_models
from mflux_server.api.task_view import live_workers
from mflux_server.core import catalog
from mflux_server.core.rows import Worker

blp = Blueprint("original-models", __name__, description="The original mflux-server's model list and switch.")
blp.ARGUMENTS_PARSER = StrictParser()


class LoadRequest(ma.Schema):
    """What POST /api/load takes."""

    model = fields.String(required=True, validate=ma.validate.Length(min=1, max=500),
                          metadata={"description": "a model name, alias or repo the live workers serve"})
    quantize = fields.Integer(allow_none=True, load_default=None, metadata={
        "description": "bits; each worker's quantization is its --quantize, so only the one it runs is accepted"})


class ModelSettings(ma.Schema):
    """The default model and its defaults (the original's /api/ps and /api/load answer)."""

    model = fields.String()
    quantize = fields.Integer(allow_none=True)
    cache_limit = fields.Integer(metadata={"description": "bytes of freed GPU buffers MLX may keep (0: its default)"})
    default_steps = fields.Integer()


def _quantize_of(model: str, live: list[Worker]) -> int | None:
    """The quantization of a live worker that serves the model (the first found), or None."""
    return next((worker.quantize for worker in live if model in worker.servable), None)


def _settings_of(model: str, live: list[Worker]) -> dict[str, Any]:
    resolved = catalog.resolve_reference(model)
    limit = settings().gpu_cache_limit
    return {"model": model, "quantize": _quantize_of(model, live),
            "cache_limit": int(limit * 2**30) if limit else 0,
            "default_steps": resolved.info.default_steps if resolved else 4}


@blp.route("/ls", methods=["GET"])
@blp.response(200, description="model name → {loader: its family, steps: its default steps}")
def list_models() -> dict[str, Any]:
    """Every model a request may name, with its family (`loader`) and default steps: those the live workers
    serve, or the whole catalog while no worker runs."""
    served = served_models(live_workers(db()))
    names = sorted(served) if served else [info.name for info in catalog.models()]
    listing: dict[str, Any] = {}
    for name in names:
        resolved = catalog.resolve_reference(name)
        if resolved is not None:
            listing[name] = {"loader": resolved.info.family, "steps": resolved.info.default_steps}
    return listing


@blp.route("/ps", methods=["GET"])
@blp.response(200, ModelSettings)
def current_settings() -> dict[str, Any]:
    """The default model (what a request without `model` gets), its quantization and default steps."""
    return _settings_of(default_model(), live_workers(db()))


@blp.route("/load", methods=["POST"])
@blp.arguments(LoadRequest(), location="json")
@blp.response(200, ModelSettings)
@blp.alt_response(400, schema=ErrorSchema, description="a model no live worker serves, or another quantization")
@blp.alt_response(403, schema=ErrorSchema, description="a key that is not an admin key, once keys exist")
def load(body: dict[str, Any]) -> dict[str, Any]:
    """Make a model the default for requests that name none, as the original's model switch did for its one
    model. It must be one the live workers serve; the worker switches to it when its first task comes."""
    key = current_key()
    if keys_exist() and (key is None or not key.admin):
        abort_json(403, code="admin_only", field="Authorization",
                   message="POST /api/load changes the default model of every client: it needs an admin key")
    resolved = catalog.resolve_reference(body["model"])
    if resolved is None:
        abort_json(400, code="invalid_input", field="model", message=f"model: {body['model']!r} is not a model "
                   "this server knows (GET /api/ls lists them)")
    live = live_workers(db())
    served = served_models(live)
    if served and resolved.served not in served:
        abort_json(400, code="model_not_served", field="model",
                   message=f"model: no live worker serves {resolved.served}; they serve {', '.join(sorted(served))}")
    quantize = _quantize_of(resolved.served, live)
    if body["quantize"] is not None and served and body["quantize"] != quantize:
        abort_json(400, code="invalid_input", field="quantize",
                   message=f"quantize: the workers serving {resolved.served} run it at "
                           f"{'full precision' if quantize is None else f'{quantize} bits'} (each worker's --quantize)")
    db().set_server_setting("default_model", resolved.served)
    return _settings_of(resolved.served, live)

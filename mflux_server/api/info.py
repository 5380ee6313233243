"""What is running: workers, engines, models, queue depth and version."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask_smorest import Blueprint
from marshmallow import fields

from mflux_server import __version__
from mflux_server.api.auth import keys_exist
from mflux_server.api.context import db, forecaster, settings
from mflux_server.api.request_body import StrictParser
from mflux_server.api.submission import default_model
from mflux_server.api.task_view import live_workers
from mflux_server.core import catalog

blp = Blueprint("info", __name__, description="Server, workers and queue at a glance.")
blp.ARGUMENTS_PARSER = StrictParser()


class WorkerInfo(ma.Schema):
    """One live worker."""

    id = fields.String()
    hostname = fields.String()
    pid = fields.Integer()
    engine = fields.String(metadata={"description": "mflux, or synthetic (procedural images, no model)"})
    model = fields.String()
    quantize = fields.Integer(allow_none=True)
    started_at = fields.Float()
    heartbeat_at = fields.Float()


class Info(ma.Schema):
    """The server at a glance."""

    version = fields.String()
    workers = fields.List(fields.Nested(WorkerInfo))
    engines = fields.List(fields.String(), metadata={"description": "engines of the live workers"})
    synthetic = fields.Boolean(metadata={"description": "true when any live worker makes synthetic images, not model output"})
    warnings = fields.List(fields.String())
    models = fields.List(fields.String(), metadata={"description": "models a live worker serves"})
    known_models = fields.List(fields.String())
    default_model = fields.String()
    keys_required = fields.Boolean(metadata={"description": "requests need an API key (one exists, or --auth required)"})
    limits = fields.Dict(keys=fields.String(), values=fields.Integer(), metadata={
        "description": "the largest width, height, steps and count a request may ask for (--max-width, …)"})
    queue = fields.Dict(keys=fields.String(), values=fields.Integer(), metadata={"description": "tasks per status"})
    forecast = fields.Dict(metadata={"description": "measured: whether the cost model is fitted to this machine's timings"})


@blp.route("/info", methods=["GET"])
@blp.response(200, Info)
def info() -> dict[str, Any]:
    """Version, live workers with their engine, model and quantization, and the queue depth."""
    workers = live_workers(db())
    synthetic = any(w.engine == "synthetic" for w in workers)
    warnings = []
    if not workers:
        warnings.append("no live worker: tasks will wait until a worker starts")
    if synthetic:
        warnings.append("synthetic engine: images are procedural test patterns, not model output")
    return {
        "version": __version__,
        "workers": workers,
        "engines": sorted({w.engine for w in workers}),
        "synthetic": synthetic,
        "warnings": warnings,
        "models": sorted({name for w in workers for name in w.servable}),
        "known_models": catalog.names(),
        "default_model": default_model(),
        "keys_required": settings().auth == "required" or keys_exist(),
        "limits": {"max_width": settings().max_width, "max_height": settings().max_height,
                   "max_steps": settings().max_steps, "max_count": settings().max_count},
        "queue": db().status_counts(),
        "forecast": {"measured": forecaster().cost_model(db()).measured},
    }


health = Blueprint("health", __name__, description="Health checks for supervisors and load balancers (no key needed).")


@health.route("/healthz")
@health.doc(responses={"200": {"description": "the process is alive"}})
def healthz() -> dict[str, Any]:
    """The server process is alive and answering."""
    return {"status": "ok"}


@health.route("/readyz")
@health.doc(responses={"200": {"description": "ready"}, "503": {"description": "not ready; the body says why"}})
def readyz() -> tuple[dict[str, Any], int]:
    """Ready only when the queue file takes writes and at least one worker is alive."""
    problems = []
    try:
        db().check_writable()
    except Exception as error:  # whatever the storage fault, the answer is "not ready" and why
        problems.append(f"the queue file cannot be written: {error}")
    live = live_workers(db())
    if not live:
        problems.append(f"no worker has heartbeated within {settings().stale_after:g} s")
    body = {"status": "ready" if not problems else "not_ready", "workers": len(live), "problems": problems}
    return body, 200 if not problems else 503

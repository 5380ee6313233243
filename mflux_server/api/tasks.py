"""The queue as a resource: list tasks, show one, cancel or delete one."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate

from mflux_server.api.auth import owner_filter
from mflux_server.api.context import db, settings
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.generation_schemas import MAX_OFFSET, ControlView, LoraEntry, Progress, StrictInteger, TaskStatus
from mflux_server.api.image_inputs import DECODE_THREADS
from mflux_server.api.request_body import StrictParser
from mflux_server.api.task_view import NOT_FOUND, get_task_or_404, summary, task_status
from mflux_server.client import provenance
from mflux_server.core import disk_reserve, native
from mflux_server.core.rows import Status
from mflux_server.store import storage_problem

blp = Blueprint("tasks", __name__, description="List the queue and recent tasks; cancel or delete a task.")
blp.ARGUMENTS_PARSER = StrictParser()


class TaskListQuery(ma.Schema):
    """Filter and page."""

    # No load_default: a None default would put null among the values the spec offers.
    status = fields.String(validate=validate.OneOf([s.value for s in Status]),
                           metadata={"description": "only tasks with this status; all tasks when absent"})
    limit = StrictInteger(load_default=50, validate=validate.Range(1, 500), metadata={"description": "page size, 1 to 500"})
    offset = StrictInteger(load_default=0, validate=validate.Range(0, MAX_OFFSET),
                           metadata={"description": f"tasks to skip, 0 to {MAX_OFFSET}"})


class TaskSummary(ma.Schema):
    """One task in a listing (no forecast: ask /api/status for that)."""

    task_id = fields.String()
    status = fields.String()
    prompt = fields.String()
    model = fields.String()
    width = fields.Integer()
    height = fields.Integer()
    steps = fields.Integer()
    count = fields.Integer()
    format = fields.String()
    priority = fields.Boolean()
    loras = fields.List(fields.Nested(LoraEntry), metadata={"description": "the LoRAs asked for, with their scales"})
    control = fields.Nested(ControlView, allow_none=True, metadata={"description": "how its control_image is used"})
    image_strengths = fields.List(fields.Float(), metadata={"description": "variations: each image prompt's strength"})
    progress = fields.Nested(Progress)
    error = fields.String(allow_none=True)
    created_at = fields.Float()
    finished_at = fields.Float(allow_none=True)


class TaskList(ma.Schema):
    """A page of tasks: running first, then waiting in claim order, then the newest finished."""

    tasks = fields.List(fields.Nested(TaskSummary))
    total = fields.Integer(metadata={"description": "tasks matching the filter"})
    limit = fields.Integer()
    offset = fields.Integer()
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), metadata={"description": "tasks per status"})


class DeleteResult(ma.Schema):
    """What DELETE did."""

    task_id = fields.String()
    result = fields.String(metadata={"description": "canceled (it was waiting or processing) or deleted"})


@blp.route("/tasks")
class TaskCollection(MethodView):
    """The queue and recent tasks."""

    @blp.arguments(TaskListQuery(), location="query")
    @blp.response(200, TaskList)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List tasks, filtered by status and paginated."""
        status = Status(query["status"]) if "status" in query else None
        tasks, total = db().list_tasks(status, query["limit"], query["offset"], owner_filter())
        return {"tasks": [summary(task) for task in tasks], "total": total, "limit": query["limit"],
                "offset": query["offset"], "counts": db().status_counts()}


@blp.route("/tasks/<string:task_id>")
class TaskItem(MethodView):
    """One task."""

    @blp.response(200, TaskStatus)
    @blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
    def get(self, task_id: str) -> dict[str, Any]:
        """One task's status, as /api/status gives it."""
        return task_status(db(), get_task_or_404(task_id))

    @blp.response(200, DeleteResult)
    @blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
    def delete(self, task_id: str) -> dict[str, Any]:
        """Cancel a waiting or running task (a running one stops at its next step), or delete a finished one."""
        get_task_or_404(task_id)  # first: another key's task must not be touched
        try:
            result = db().cancel_or_delete(task_id)
        except Exception as error:  # a full disk: the reserve's bytes let this delete's WAL frames land
            if storage_problem(error) != "full" or not disk_reserve.release(settings().db):
                raise
            result = db().cancel_or_delete(task_id)
        if result is None:
            get_task_or_404(task_id)
        return {"task_id": task_id, "result": result}


class ProvenanceQuery(ma.Schema):
    """Which image of the task."""

    index = StrictInteger(load_default=0, validate=validate.Range(0, 63), metadata={"description": "from 0"})


class Provenance(ma.Schema):
    """What one stored image says about what made it, read back from its bytes."""

    format = fields.String()
    digital_source_type = fields.String(allow_none=True, metadata={"description": "IPTC DigitalSourceType (XMP)"})
    generation_data = fields.Dict(allow_none=True, metadata={"description": "the generation data its XMP carries"})
    content_credentials = fields.Dict(allow_none=True, metadata={
        "description": "the C2PA manifest as c2pa's Reader verifies it: state (Valid, Invalid), failures, "
                       "claim_generator, actions; null when the image carries none"})


@blp.route("/tasks/<string:task_id>/provenance")
class TaskProvenance(MethodView):
    """What a finished task's image carries."""

    @blp.arguments(ProvenanceQuery(), location="query")
    @blp.response(200, Provenance)
    @blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
    @blp.alt_response(409, schema=ErrorSchema, description="the task has no image yet")
    def get(self, query: dict[str, Any], task_id: str) -> dict[str, Any]:
        """Read one image's generation data, marking and Content Credentials back from its stored bytes (the
        verification runs off the event loop)."""
        task = get_task_or_404(task_id)
        if task.status is not Status.DONE:
            abort_json(409, code="image_not_ready", field="task_id", status=str(task.status),
                       message=f"task {task.id} is {task.status}, not done")
        stored = db().fetch_image(task.id, query["index"])
        if stored is None:
            abort_json(404, code="image_gone", field="index",
                       message=f"task {task.id} has no image {query['index']} (fetched with delete, or past count)")
        return native.call_bounded(lambda: provenance.read(stored.data), "image-decode", DECODE_THREADS)

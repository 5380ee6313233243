"""Server-Sent Events: a task's status, progress, previews and outcome as they happen, resumable by Last-Event-ID."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import marshmallow as ma
from flask import Response, request, stream_with_context, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate

from mflux_server.api.auth import owner_filter
from mflux_server.api.context import db, event_hub
from mflux_server.api.errors import ErrorSchema, abort_json
from mflux_server.api.generation_schemas import StrictInteger
from mflux_server.api.request_body import StrictParser
from mflux_server.api.task_view import NOT_FOUND, get_task_or_404, task_status
from mflux_server.core.rows import Event, Status

blp = Blueprint("events", __name__, description="Live events (text/event-stream) of one task or of the queue.")
blp.ARGUMENTS_PARSER = StrictParser()

KEEP_ALIVE = 15.0  # seconds between comment lines on a quiet stream, so proxies and dead clients are noticed
RETRY_MS = 2000  # how soon EventSource reconnects after a dropped connection
MAX_WATCHED = 100
ENDED = {Status.DONE.value, Status.ERROR.value, Status.CANCELED.value, "deleted"}
MAX_EVENT_ID = 2**63 - 1  # SQLite's largest rowid
EVENT_KINDS = ("status", "progress", "preview", "done", "error", "deleted")
# Each message of the stream, as an SSE parser (EventSource, or a spec-driven client) reads it.
SSE_DOC = {"responses": {"200": {
    "description": "an event stream (see docs/api.md: Live events); each message has an id, an event kind and JSON data",
    "content": {"text/event-stream": {"schema": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}, "event": {"type": "string", "enum": list(EVENT_KINDS)},
                       "data": {"type": "string", "description": "the event's JSON body"},
                       "retry": {"type": "integer"}}}}}}}}


class TaskEventsQuery(ma.Schema):
    """Where to resume."""

    last_event_id = StrictInteger(validate=validate.Range(0, MAX_EVENT_ID), metadata={
        "description": "resume after this event id (what the Last-Event-ID header carries; the header wins)"})


class EventsQuery(TaskEventsQuery):
    """Which tasks, and where to resume."""

    # 100 of our 32-character ids with their commas, which fits gunicorn's 4 KB request line.
    task_ids = fields.String(validate=validate.Length(1, MAX_WATCHED * 33), metadata={
        "description": f"comma-separated task ids to watch (at most {MAX_WATCHED}): their position and forecast "
                       "are sent as the queue moves. All tasks when absent"})


def resume_point(query: dict[str, Any]) -> int | None:
    """The event id a reconnecting client last saw: the Last-Event-ID header, else the query's last_event_id."""
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        if not header.isascii() or not header.isdigit() or len(header) > 18:
            abort_json(422, field="Last-Event-ID", message=f"Last-Event-ID must be an event id (digits), got {header!r}")
        return int(header)
    value: int | None = query.get("last_event_id")
    return value


def frame(event_id: int, kind: str, payload: dict[str, Any]) -> str:
    """One SSE message."""
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def payload(event: Event, task_view: dict[str, Any] | None) -> dict[str, Any]:
    """What an event says: its own data, the task's position and forecast, and on done where the images are."""
    body: dict[str, Any] = {"task_id": event.task_id, **json.loads(event.data), "at": event.at}
    if task_view is not None and event.kind in ("status", "progress"):
        body["position"] = task_view["pos"]
        body["wait_remaining"] = task_view["wait_remaining"]
        body["wait_range"] = task_view["wait_range"]
        body.update({key: task_view[key] for key in ("waiting_for_worker", "worker_lost", "note") if key in task_view})
        if event.kind == "status":
            body["progress"] = task_view["progress"]
    if event.kind == "done" and task_view is not None:
        body["images"] = [url_for("generation.image", task_id=event.task_id, index=i, delete="false")
                          for i in range(task_view["count"])]
        if "upscale" in task_view:  # asked with the task: the upscale tasks it queued, one per image
            body["upscale"] = task_view["upscale"]
    if event.kind == "preview":
        body["url"] = url_for("events.TaskPreview", task_id=event.task_id)
    return body


def view_of(task_id: str) -> dict[str, Any] | None:
    """The task's status view now, or None once it is deleted."""
    task = db().get(task_id)
    return None if task is None else task_status(db(), task)


def render(event: Event) -> tuple[str, dict[str, Any] | None]:
    """An event's message with the task's view as of now (and that view)."""
    view = view_of(event.task_id) if event.kind != "deleted" else None
    return frame(event.id, event.kind, payload(event, view)), view


def follow(watched: set[str] | None, after: int | None, single: bool, owner: int | None = None) -> Iterator[str]:
    """The stream: the current state (unless resuming), then every event as it happens, and keep-alives; with an
    owner, only that key's tasks."""
    hub = event_hub()
    owned: set[str] = set()  # this key's tasks seen on the stream, so their 'deleted' events still pass
    yield f"retry: {RETRY_MS}\n\n"
    positions: dict[str, tuple[int, float]] = {}
    if after is None:
        after = hub.last_id
        for task_id in sorted(watched or ()):
            view = view_of(task_id)
            if view is not None and owner is not None and view["owner_key"] != owner:
                continue
            if view is not None:
                positions[task_id] = (view["pos"], view["wait_remaining"])
                kind = {"done": "done", "error": "error"}.get(view["status"], "status")
                state = Event(after, task_id, kind, json.dumps({"status": view["status"], "error": view["error"]}), 0.0)
                yield frame(after, kind, {**payload(state, view), "at": None})
                if single and view["status"] in ENDED:
                    return
    while not hub.closed:  # the process is stopping: end here, the client reconnects from its Last-Event-ID
        if hub.covers(after):
            events = hub.wait(after, KEEP_ALIVE)
        else:  # resuming from before what the hub holds: read the database
            events = db().events_after(after, next(iter(watched)) if single and watched else None)
        if not events:
            yield ": keep-alive\n\n"
            continue
        queue_moved = False
        for event in events:
            queue_moved |= event.kind in ("status", "done", "error", "deleted")
            if watched is not None and event.task_id not in watched:
                continue
            message, view = hub.rendered(event, render)
            if owner is not None:
                if view is None and event.task_id not in owned or view is not None and view["owner_key"] != owner:
                    continue
                owned.add(event.task_id)
            if view is not None:
                positions[event.task_id] = (view["pos"], view["wait_remaining"])
            yield message
            if single and (event.kind in ("done", "error", "deleted") or json.loads(event.data).get("status") in ENDED):
                return
        after = events[-1].id
        if queue_moved and watched:
            yield from moved_positions(watched, positions, after, owner)


def moved_positions(watched: set[str], positions: dict[str, tuple[int, float]], event_id: int,
                    owner: int | None = None) -> Iterator[str]:
    """A progress event for each watched waiting task whose position changed as the queue moved; with an owner,
    only that key's tasks (another key's task id, guessed or leaked, shows nothing)."""
    for task_id in sorted(watched):
        task = db().get(task_id)
        if task is None or task.status is not Status.WAITING or (owner is not None and task.key_id != owner):
            continue
        view = task_status(db(), task)
        now = (view["pos"], view["wait_remaining"])
        if positions.get(task_id, (None, None))[0] != now[0]:
            positions[task_id] = now
            yield frame(event_id, "progress", {"task_id": task_id, "status": "waiting", "position": now[0],
                                               "wait_remaining": now[1], "wait_range": view["wait_range"], "at": None})


def event_stream(body: Iterator[str]) -> Response:
    """A text/event-stream response that proxies do not buffer; HEAD gets the headers alone."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":  # the server sends no body for HEAD, so an endless stream would never end
        body.close()  # type: ignore[attr-defined]
        return Response(mimetype="text/event-stream", headers=headers)
    return Response(stream_with_context(body), mimetype="text/event-stream", headers=headers)


@blp.route("/tasks/<string:task_id>/events")
class TaskEvents(MethodView):
    """One task's live events."""

    @blp.arguments(TaskEventsQuery(), location="query")
    @blp.doc(**SSE_DOC)
    @blp.alt_response(404, schema=ErrorSchema, description=NOT_FOUND)
    def get(self, query: dict[str, Any], task_id: str) -> Response:
        """Stream a task's events: status, progress (step, image, position, wait_remaining), preview, done or error.

        Each message has an `id:`; a reconnecting EventSource sends it back as Last-Event-ID and resumes after
        it. Without one, the stream opens with the task's current state. It ends after done, error, canceled
        or deleted.
        """
        get_task_or_404(task_id)
        return event_stream(follow({task_id}, resume_point(query), single=True))


@blp.route("/events")
class QueueEvents(MethodView):
    """The whole queue's live events."""

    @blp.arguments(EventsQuery(), location="query")
    @blp.doc(**SSE_DOC)
    def get(self, query: dict[str, Any]) -> Response:
        """Stream every task's events (or those of `task_ids`, with their moving positions); never ends by itself."""
        watched = None
        if "task_ids" in query:
            watched = {part.strip() for part in query["task_ids"].split(",") if part.strip()}
            if not watched or len(watched) > MAX_WATCHED:
                abort_json(422, field="task_ids", message=f"give 1 to {MAX_WATCHED} comma-separated task ids")
        return event_stream(follow(watched, resume_point(query), single=False, owner=owner_filter()))


@blp.route("/tasks/<string:task_id>/preview")
class TaskPreview(MethodView):
    """The latest preview of a running task."""

    @blp.doc(responses={"200": {"description": "a small JPEG of the image forming",
                                "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
    @blp.alt_response(404, schema=ErrorSchema, description="no such task, or no preview yet (not running)")
    def get(self, task_id: str) -> Response:
        """The newest preview of the task's current image; a 404 until its worker publishes one."""
        get_task_or_404(task_id)  # another key's preview is not this key's to see
        found = db().preview(task_id)
        if found is None:
            abort_json(404, code="preview_not_found", field="task_id",
                       message="no preview yet: previews exist while the task is processing")
        return Response(found.data, mimetype=found.mime, headers={
            "Cache-Control": "no-store", "X-Preview-Image": str(found.image), "X-Preview-Step": str(found.step)})

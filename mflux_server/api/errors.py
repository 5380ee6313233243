"""Every error as JSON: an HTTP status, a stable code, a human message and the field at fault."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import flask_smorest
import marshmallow as ma
from flask import has_request_context, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

# Stable, documented codes per HTTP status when the view did not name a more specific one.
DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    408: "request_timeout",
    414: "url_too_long",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    507: "storage_full",
}


# "named": the field is already in the surface's own parameter names (compat.refuse), so no envelope renames it.
PASSTHROUGH = ("field", "status", "named")


class ErrorSchema(ma.Schema):
    """The body of every error response."""

    code = ma.fields.String(
        required=True, metadata={"description": "stable machine-readable code, e.g. invalid_input, task_not_found"}
    )
    message = ma.fields.String(required=True, metadata={"description": "what went wrong, for a person"})
    field = ma.fields.String(allow_none=True, metadata={"description": "the request field at fault, if any"})
    errors = ma.fields.Dict(metadata={"description": "every invalid field and its messages, by location"})
    status = ma.fields.String(metadata={"description": "the task's status, on image_not_ready errors (409)"})


def flatten_messages(messages: Any, path: str = "") -> list[tuple[str, str]]:
    """Turn webargs' nested {location: {field: [messages]}} into (field, message) pairs."""
    if isinstance(messages, dict):
        pairs = []
        for key, value in messages.items():
            name = str(key)
            if name in ("json", "query", "form", "view_args", "files", "headers") and not path:
                pairs += flatten_messages(value, "")
            elif name == "_schema":
                pairs += flatten_messages(value, path)
            else:
                pairs += flatten_messages(value, f"{path}.{name}" if path else name)
        return pairs
    if isinstance(messages, (list, tuple)):
        return [pair for item in messages for pair in flatten_messages(item, path)]
    return [(path, str(messages))]


JsonError = tuple[dict[str, Any], int, dict[str, str]]


def error_payload(error: HTTPException) -> JsonError:
    """Build the JSON body, status and headers for an HTTP error."""
    code = error.code or 500
    data = dict(getattr(error, "data", None) or {})
    headers = dict(data.pop("headers", {}) or {})
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(sorted(error.valid_methods))  # RFC 9110 requires it on every 405
    explicit = data.get("message")  # a view that aborted with a 5xx said what happened: keep it
    messages = data.pop("messages", None) or data.pop("errors", None)
    payload: dict[str, Any] = {"code": data.pop("code", None) or DEFAULT_CODES.get(code, "http_error"), "field": None}
    if messages:
        pairs = flatten_messages(messages)
        named = [(f, m) for f, m in pairs if f]
        payload["field"] = named[0][0] if named else None
        payload["message"] = "; ".join(f"{f}: {m}" if f else m for f, m in pairs) or error.description
        payload["errors"] = messages
    else:
        payload["message"] = data.pop("message", None) or error.description or error.name
    if code >= 500 and not explicit and not messages:
        payload["message"] = "the server hit an unexpected error; it has been logged"
    # Views may add these through abort(); webargs also leaves its schema object here, which must not leak.
    payload.update({k: data[k] for k in PASSTHROUGH if data.get(k) is not None})
    return payload, code, headers


def abort_json(http_status: int, /, **details: Any) -> NoReturn:
    """Stop the request with our JSON error: flask-smorest's abort, typed as the raise it always is."""
    flask_smorest.abort(http_status, **details)
    raise AssertionError("flask_smorest.abort returned")  # it raises an HTTPException; this line never runs


# The error bodies of the compatible surfaces, by path prefix: each turns our payload into its own envelope.
Envelope = Callable[[dict[str, Any], int], tuple[dict[str, Any], int]]
ENVELOPES: dict[str, Envelope] = {}


def register_envelope(prefix: str, envelope: Envelope) -> None:
    """Answer errors under this path prefix in a surface's own envelope (OpenAI's, AceDataCloud's, ...)."""
    ENVELOPES[prefix] = envelope


def in_envelope(error: JsonError) -> JsonError:
    """An error in the envelope of the surface its request came through; ours everywhere else."""
    payload, status, headers = error
    path = request.path if has_request_context() else ""
    for prefix, envelope in ENVELOPES.items():
        if path.startswith(prefix):
            body, status = envelope(payload, status)
            return body, status, headers
    return error


def renamed(payload: dict[str, Any], names: dict[str, str]) -> tuple[str | None, str]:
    """The field at fault and the message in a surface's own parameter names (width and height are its size)."""
    field = payload.get("field")
    message = str(payload.get("message", ""))
    if field in names and not payload.get("named"):
        message = message.replace(f"{field}: ", f"{names[field]}: ", 1)
        field = names[field]
    return field, message

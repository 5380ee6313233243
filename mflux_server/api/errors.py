"""Every error as JSON: an HTTP status, a stable code, a human message and the field at fault."""

from __future__ import annotations

from typing import Any, NoReturn

import flask_smorest
import marshmallow as ma
from werkzeug.exceptions import HTTPException, MethodNotAllowed

# Stable, documented codes per HTTP status when the view did not name a more specific one.
DEFAULT_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    408: "request_timeout",
    414: "url_too_long",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    507: "storage_full",
}


PASSTHROUGH = ("field", "status")


class ErrorSchema(ma.Schema):
    """The body of every error response."""

    code = ma.fields.String(
        required=True, metadata={"description": "stable machine-readable code, e.g. invalid_input, task_not_found"}
    )
    message = ma.fields.String(required=True, metadata={"description": "what went wrong, for a person"})
    field = ma.fields.String(allow_none=True, metadata={"description": "the request field at fault, if any"})
    errors = ma.fields.Dict(metadata={"description": "every invalid field and its messages, by location"})
    status = ma.fields.String(metadata={"description": "the task's status, on image_not_ready errors (409)"})


def _flatten(messages: Any, path: str = "") -> list[tuple[str, str]]:
    """Turn webargs' nested {location: {field: [messages]}} into (field, message) pairs."""
    if isinstance(messages, dict):
        pairs = []
        for key, value in messages.items():
            name = str(key)
            if name in ("json", "query", "form", "view_args", "files", "headers") and not path:
                pairs += _flatten(value, "")
            elif name == "_schema":
                pairs += _flatten(value, path)
            else:
                pairs += _flatten(value, f"{path}.{name}" if path else name)
        return pairs
    if isinstance(messages, (list, tuple)):
        return [pair for item in messages for pair in _flatten(item, path)]
    return [(path, str(messages))]


JsonError = tuple[dict[str, Any], int, dict[str, str]]


def error_payload(error: HTTPException) -> JsonError:
    """Build the JSON body, status and headers for an HTTP error."""
    code = error.code or 500
    data = dict(getattr(error, "data", None) or {})
    headers = dict(data.pop("headers", {}) or {})
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(sorted(error.valid_methods))  # RFC 9110 requires it on every 405
    messages = data.pop("messages", None) or data.pop("errors", None)
    payload: dict[str, Any] = {"code": data.pop("code", None) or DEFAULT_CODES.get(code, "http_error"), "field": None}
    if messages:
        pairs = _flatten(messages)
        named = [(f, m) for f, m in pairs if f]
        payload["field"] = named[0][0] if named else None
        payload["message"] = "; ".join(f"{f}: {m}" if f else m for f, m in pairs) or error.description
        payload["errors"] = messages
    else:
        payload["message"] = data.pop("message", None) or error.description or error.name
    if code >= 500 and "message" not in data:
        payload["message"] = "the server hit an unexpected error; it has been logged"
    # Views may add these through abort(); webargs also leaves its schema object here, which must not leak.
    payload.update({k: data[k] for k in PASSTHROUGH if data.get(k) is not None})
    return payload, code, headers


def abort_json(http_status: int, /, **details: Any) -> NoReturn:
    """Stop the request with our JSON error: flask-smorest's abort, typed as the raise it always is."""
    flask_smorest.abort(http_status, **details)
    raise AssertionError("flask_smorest.abort returned")  # it raises an HTTPException; this line never runs

"""Reading request arguments strictly: JSON that Python parses but no field should hold, and repeated parameters.

Python's json module accepts lone UTF-16 surrogates (which SQLite cannot store as UTF-8), numbers of any
length (past 4,300 digits int() refuses them), nesting down to its recursion limit, the NUL character (which
PostgreSQL cannot store in text, so one rule refuses it on both stores) and a key given twice (the last one
would silently win, where a repeated query or form field is refused). Each of these gets a 422 that names the
field and the rule here, before any schema or store sees the value.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from flask import Request
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.routing import RequestRedirect

from mflux_server.api.errors import abort_json
from mflux_server.api.upload_lane import offloaded

LARGE_JSON = 256 * 1024  # bytes past which a JSON body is parsed off the loop (upload_lane.offloaded)
PARSE_THREADS = 2  # such parses at once per server process
MAX_DEPTH = 8  # our deepest body is a list of images inside the object: 2 levels
MAX_DIGITS = 40  # any of our numbers fits in 20 digits; this leaves room for spelled-out zeros
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON string (one token, so brackets inside it do not count), marked as a key when a colon follows; or a bracket.
_NESTING_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?|[\[\]{}]')


class TooManyDigits(str):
    """A number literal longer than MAX_DIGITS, kept as its text so the check below can name its field."""


def _number(text: str) -> Any:
    return TooManyDigits(text) if len(text.lstrip("-")) > MAX_DIGITS else int(text)


def _float(text: str) -> Any:
    return TooManyDigits(text) if len(text) > MAX_DIGITS + 20 else float(text)


def _constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _refuse(location: str, field: str, rule: str) -> NoReturn:
    abort_json(422, errors={location: {field or "_body": [rule]}})


def _too_deep_at(raw: bytes) -> str | None:
    """The top-level field under which raw JSON nests past MAX_DEPTH, '' when outside any, None when it does not."""
    depth, field = 0, ""
    for token in _NESTING_TOKEN.finditer(raw):
        text = token.group()
        if text in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return field
        elif text in (b"]", b"}"):
            depth -= 1
        elif depth == 1 and token.group(2):
            field = json.loads(b'"' + token.group(1) + b'"')
    return None


NUL_RULE = "contains the NUL character (U+0000), which no text here may hold"


class Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that had a key more than once: the key is kept to be named in the 422."""

    repeated: str = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a dict, or a Repeated one when a key came twice."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            repeated = Repeated(pairs)
            repeated.repeated = key
            return repeated
        value[key] = item
    return value


def _check(value: Any, path: str, surrogates_possible: bool, nul_possible: bool = False) -> None:
    """Refuse over-long numbers, lone surrogates, NUL and repeated keys anywhere in a parsed body, by dotted path."""
    if isinstance(value, TooManyDigits):
        _refuse("json", path, f"is a number of {len(value)} digits; numbers here have at most {MAX_DIGITS}")
    if isinstance(value, str):
        if surrogates_possible and _SURROGATE.search(value):
            _refuse("json", path, "contains a lone UTF-16 surrogate (\\ud800 to \\udfff), which is not text")
        if nul_possible and "\x00" in value:
            _refuse("json", path, NUL_RULE)
        return
    if isinstance(value, Repeated):
        key = f"{path}.{value.repeated}" if path else value.repeated
        _refuse("json", key, "was given more than once in the same object; give it once")
    if isinstance(value, dict):
        for key, item in value.items():
            if surrogates_possible and _SURROGATE.search(key):
                _refuse("json", path, "has a field name with a lone UTF-16 surrogate, which is not text")
            if nul_possible and "\x00" in key:
                _refuse("json", path, f"has a field name that {NUL_RULE}")
            _check(item, f"{path}.{key}" if path else key, surrogates_possible, nul_possible)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{path}.{index}" if path else str(index), surrogates_possible, nul_possible)


def parse_json_body(raw: bytes) -> Any:
    """Parse a JSON body, or stop the request with a 400 (not JSON) or 422 (JSON no field may hold)."""
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        field = _too_deep_at(raw)
        if field is not None:
            _refuse("json", field, f"nests deeper than {MAX_DEPTH} levels of arrays and objects")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_int=_number, parse_float=_float, parse_constant=_constant,
                           object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        abort_json(400, code="invalid_json", message=f"the request body is not valid JSON: {error}")
    # JSON can carry NUL only as an escape: raw control characters inside strings are invalid JSON.
    _check(value, "", bool(_SURROGATE_ESCAPE.search(raw)), b"\\u0000" in raw)
    return value


def refuse_odd_paths(req: Request) -> None:
    """A NUL in the path is a 404 (nothing is named so), in a query parameter a 422 naming it: on both stores. A
    path Werkzeug would redirect (a doubled slash) is a JSON 404 too: its 308 page built Location from the
    client's Host header, for POSTs as well."""
    if isinstance(req.routing_exception, RequestRedirect):
        abort_json(404, message="no such path (paths here have no empty segments, such as a doubled slash)")
    if "\x00" in req.path:
        abort_json(404, message="no such path: it contains the NUL character (U+0000)")
    for name, value in req.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            _refuse("query", name.replace("\x00", "\\u0000"), NUL_RULE)


# Multipart form fields whose value is a JSON list, with an example for the error.
JSON_FORM_FIELDS = {"loras": '[{"name": "…", "scale": 1.0}]', "image_strengths": "[0.8, 0.3]"}


class StrictParser(FlaskParser):
    """webargs' Flask parser, with strict JSON, a repeated parameter refused, and multipart forms read as fields."""

    def _raw_load_json(self, req: Request) -> Any:
        if not is_json_request(req):
            return core.missing
        raw = req.get_data(cache=True)
        if len(raw) > LARGE_JSON:  # a body full of base64 images: tens of milliseconds of parsing, off the loop
            return offloaded(parse_json_body, raw, pool="json-parse", threads=PARSE_THREADS)
        return parse_json_body(raw)

    def load_querystring(self, req: Request, schema: Any) -> Any:
        """The query parameters, once each."""
        self._refuse_repeats("query", req.args)
        return super().load_querystring(req, schema)

    def load_json(self, req: Request, schema: Any) -> Any:
        """The JSON body, or a multipart/form-data upload (form fields and file parts) flattened into one mapping."""
        if req.mimetype == "multipart/form-data":
            self._refuse_repeats("form", req.form, lists=("images",))
            self._refuse_repeats("form", req.files, lists=("images",))
            for name, value in req.form.items(multi=True):
                if "\x00" in name or "\x00" in value:
                    _refuse("form", name.replace("\x00", "\\u0000"), NUL_RULE)
            fields = {**req.form.to_dict(), **req.files.to_dict()}
            both = sorted(set(req.form) & set(req.files) - {"images"})
            if both:
                _refuse("form", both[0], "was sent both as a form field and as a file part; send it once")
            # Several reference images come as repeated `images` parts (files or base64 text).
            listed = req.files.getlist("images") + req.form.getlist("images")
            if listed:
                fields["images"] = listed
            for name, example in JSON_FORM_FIELDS.items():
                text = fields.get(name)
                if isinstance(text, str):  # a list travels as one JSON text field
                    try:
                        fields[name] = json.loads(text, parse_constant=_constant)
                    except (ValueError, RecursionError):
                        _refuse("form", name, f"must be JSON text: {example}")
            return fields
        return super().load_json(req, schema)

    @staticmethod
    def _refuse_repeats(location: str, values: Any, lists: tuple[str, ...] = ()) -> None:
        for name in values:
            count = len(values.getlist(name))
            if count > 1 and name not in lists:
                _refuse(location, name, f"was given {count} times; give it once")
